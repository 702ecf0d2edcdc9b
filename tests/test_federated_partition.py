"""Partitioners, client sampling and accounting."""

from __future__ import annotations

import numpy as np
import pytest

from privtune.federated import (
    CommLedger,
    Partition,
    mean_tv_distance,
    partition_labels,
    partition_like,
    plan_round,
    prefix_transfer_elements,
)

LABELS = [i % 4 for i in range(400)]


@pytest.mark.parametrize("mode", ["iid", "dirichlet_label", "dirichlet_quantity"])
def test_every_example_assigned_once_and_seed_deterministic(mode: str, tmp_path) -> None:
    p = partition_labels(LABELS, 20, mode=mode, alpha=0.5, seed=3)
    flat = sorted(i for idx in p.indices for i in idx)
    assert flat == list(range(len(LABELS)))
    assert min(p.sizes()) >= 1
    assert partition_labels(LABELS, 20, mode=mode, alpha=0.5, seed=3).indices == p.indices
    assert partition_labels(LABELS, 20, mode=mode, alpha=0.5, seed=4).indices != p.indices
    p.save(tmp_path / "p.json", labels=LABELS)
    assert Partition.load(tmp_path / "p.json").indices == p.indices


def test_label_skew_falls_as_alpha_grows() -> None:
    tv = [mean_tv_distance(partition_labels(LABELS, 20, alpha=a, seed=0), LABELS) for a in (0.1, 1.0, 100.0)]
    assert tv[0] > tv[1] > tv[2]


def test_eval_split_follows_the_train_priors() -> None:
    train = partition_labels(LABELS, 10, alpha=0.1, seed=0)
    test = partition_like([i % 4 for i in range(200)], train)
    assert sorted(i for idx in test.indices for i in idx) == list(range(200))
    hist_train = np.array(train.label_histograms(LABELS, 4))
    hist_test = np.array(test.label_histograms([i % 4 for i in range(200)], 4))
    # the majority class of most clients agrees between the train and test shards
    agree = (hist_train.argmax(1) == hist_test.argmax(1))[hist_test.sum(1) > 3].mean()
    assert agree >= 0.7


def test_bad_partition_arguments_fail_before_work() -> None:
    with pytest.raises(ValueError, match=r"`num_clients=500` exceeds the 400 examples"):
        partition_labels(LABELS, 500)
    with pytest.raises(ValueError, match=r"`alpha`.*> 0; got 0"):
        partition_labels(LABELS, 10, alpha=0)
    with pytest.raises(ValueError, match=r"`alpha`.*got -1"):
        partition_labels(LABELS, 10, alpha=-1)
    with pytest.raises(ValueError, match="mode"):
        partition_labels(LABELS, 10, mode="shards")  # type: ignore[arg-type]


def test_round_plan_sampling_dropout_stragglers() -> None:
    plan = plan_round(3, 100, 0.1, seed=42, dropout_fraction=0.3, straggler_fraction=0.5)
    assert len(plan.sampled) == 10
    assert len(set(plan.sampled)) == 10
    assert len(plan.dropped) == 3
    assert set(plan.dropped) <= set(plan.sampled)
    assert len(plan.reporting) == 7
    assert len(plan.stragglers) == 3
    assert plan_round(3, 100, 0.1, seed=42).sampled == plan_round(3, 100, 0.1, seed=42).sampled
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"`sample_fraction` must be in \(0, 1\]"):
            plan_round(1, 10, bad, seed=0)
    assert len(plan_round(1, 10, 1.0, seed=0, dropout_fraction=0.99).reporting) == 1  # someone always reports


def test_accounting_bytes_and_round_time() -> None:
    # RoBERTa-large at 12 of 24 layers: 491,520 elements = 1.97 MB per client (spec §11)
    elems = prefix_transfer_elements(20, 12, 1024)
    assert elems == 491_520
    ledger = CommLedger()
    rec = ledger.record(1, [1, 2, 3], [1, 3], elems, {1: 2.0, 2: 9.0, 3: 5.0})
    assert rec.up_bytes == 4 * elems * 2
    assert rec.down_bytes == 4 * elems * 3
    assert rec.round_seconds == 5.0
    assert rec.serial_seconds == 7.0
    ledger.record(2, [1], [1], elems, {1: 1.0}, factor=2)
    assert ledger.total_up_bytes == 4 * elems * 2 + 8 * elems
    copy = CommLedger()
    copy.load_state_dict(ledger.state_dict())
    assert copy.summary() == ledger.summary()


def test_report_summary_table_and_plots(tmp_path) -> None:
    from privtune.federated.report import summarize, write_comparison

    def run(label: str, accs: list[float], bytes_per_round: int) -> dict:
        hist = [
            {
                "round": float(r + 1),
                "fed/personalized_acc": a,
                "fed/global_acc": a - 0.1,
                "comm/cum_up_bytes": bytes_per_round * (r + 1),
                "comm/cum_down_bytes": bytes_per_round * (r + 1),
            }
            for r, a in enumerate(accs)
        ]
        total = 2 * bytes_per_round * len(accs)
        ledger = {"up_bytes": total // 2, "down_bytes": total // 2, "total_bytes": total, "round_seconds_total": 1.0}
        return {"server": label, "label": label, "history": hist, "ledger": ledger, "selected_layers": [0]}

    a = run("a", [0.2, 0.7, 0.6], 10)
    s = summarize(a, target=0.65)
    assert (s["final_acc"], s["best_acc"], s["rounds_to_target"], s["total_bytes"]) == (0.6, 0.7, 2, 60)
    assert s["final_global_acc"] == pytest.approx(0.5) and s["rounds_to_target_global"] is None
    assert summarize(a, target=0.9)["rounds_to_target"] is None
    table = write_comparison(tmp_path, [a, run("b", [0.1, 0.2, 0.3], 20)], target=0.65, title="t")
    assert "| a | 1 | 0.6000 | 0.7000 | 0.5000 | 2 | 60 |" in table
    assert "not reached" in table and "epsilon" not in table
    assert (tmp_path / "comparison.json").exists()
    private = run("dp", [0.3, 0.4, 0.5], 10)
    for h, eps in zip(private["history"], [1.0, 1.5, 2.0]):
        h["privacy/epsilon"] = eps
    assert summarize(private)["epsilon"] == 2.0
    table = write_comparison(tmp_path, [a, private], target=0.65, title="t")
    assert "client-level epsilon |" in table
    assert "| dp | 1 | 0.5000 | 0.5000 | 0.4000 | not reached | 60 | 1.0 | 2.0000 |" in table
    assert "| a | 1 | 0.6000 | 0.7000 | 0.5000 | 2 | 60 | 1.0 | n/a |" in table
