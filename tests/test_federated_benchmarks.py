"""The federated benchmarks run end to end on the tiny config, resume from finished runs, and summarise over seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path: Path, **federated: object) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/fed_prompt/tiny_debug.yaml").read_text())
    cfg["trainer"]["strategy"]["init_args"]["federated"].update({"num_rounds": 2, **federated})
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_the_controls_run_over_seeds_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_benchmark: Any
) -> None:
    bench = load_benchmark("federated_compare")
    out = tmp_path / "out"
    methods = ["FedAvg (FedPepTAO's layers, no personal layers)"]
    argv = ["x", "--config", str(_tiny(tmp_path)), "--out", str(out), "--seeds", "0", "1", "--target", "0.5"]
    monkeypatch.setattr(sys, "argv", [*argv, "--methods", *methods])
    bench.main()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == 0.5 and summary["seeds"] == [0, 1]
    assert [r["label"] for r in summary["rows"]] == methods and all(r["seeds"] == [0, 1] for r in summary["rows"])
    frozen = json.loads((out / "seed1" / "fedavg_selected_frozen" / "report.json").read_text())
    assert frozen["config"]["personal_layers"] is False and frozen["seed"] == 1
    # seeds get their own partitions
    parts = [(out / f"seed{s}" / "fedavg_selected_frozen" / "partition_train.json").read_text() for s in (0, 1)]
    assert parts[0] != parts[1]
    # --resume reuses the finished runs: nothing is trained again
    monkeypatch.setattr(bench, "run_one", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(sys, "argv", [*argv, "--methods", *methods, "--resume"])
    bench.main()


def test_the_controls_refuse_an_unknown_method_before_any_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, load_benchmark: Any
) -> None:
    bench = load_benchmark("federated_compare")
    monkeypatch.setattr(sys, "argv", ["x", "--config", "c.yaml", "--out", str(tmp_path), "--methods", "FedMagic"])
    with pytest.raises(SystemExit):
        bench.main()
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_client_dp_table_runs_each_epsilon_and_reports_the_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_benchmark: Any
) -> None:
    bench = load_benchmark("federated_client_dp")
    base = _tiny(tmp_path, client_dp={"clipping_norm": 0.5, "target_epsilon": 8.0, "delta": 1e-3})
    out = tmp_path / "dp"
    argv = ["x", "--base", str(base), "--out", str(out), "--seeds", "0", "--methods", "fedavg"]
    monkeypatch.setattr(sys, "argv", [*argv, "--epsilons", "3", "inf"])
    bench.main()
    rows = {r["target_epsilon"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["3"]["epsilon_spent"] <= 3.0 and rows["3"]["noise_multiplier"] > 0
    assert rows["3"]["cohort_for_snr_1"] >= 1 and rows["3"]["noise_to_signal"] > 0
    assert rows["inf"]["noise_multiplier"] is None
    assert "| FedAvg (all layers) | 3 | 1 |" in (out / "summary.md").read_text()


def test_the_client_dp_table_refuses_a_base_without_client_dp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_benchmark: Any
) -> None:
    bench = load_benchmark("federated_client_dp")
    monkeypatch.setattr(sys, "argv", ["x", "--base", str(_tiny(tmp_path)), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        bench.main()
    assert not (tmp_path / "o" / "seed0").exists()


def test_a_generated_block_is_replaced_between_its_markers_only(tmp_path: Path) -> None:
    from privtune.eval.includes import replace_block

    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- t -->\nold 0.5\n<!-- /t -->\noutro\n")
    assert replace_block(doc, "t", "| a | 0.9 |", ["benchmarks/results/x/summary.md"])
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- /t -->\noutro\n") and "old" not in text
    assert "<!-- result: benchmarks/results/x/summary.md -->\n| a | 0.9 |" in text
    assert not replace_block(doc, "t", "| a | 0.9 |", ["benchmarks/results/x/summary.md"])  # idempotent
    assert replace_block(doc, "t", "text 1.5\n\n| a | 0.9 |\n| b | 0.8 |\n", ["r.md"])  # each part cited
    assert doc.read_text().count("<!-- result: r.md -->\n") == 2
    assert "<!-- result: r.md -->\n| a | 0.9 |\n| b | 0.8 |" in doc.read_text()
    with pytest.raises(ValueError, match="markers"):
        replace_block(doc, "missing", "x", ["y"])


def test_a_federated_run_reports_membership_inference_on_its_global_and_personal_models(tmp_path: Path) -> None:
    from train import main as train_main

    config = _tiny(tmp_path, num_rounds=1, membership_audit=True, membership_examples=16)
    fed = "--trainer.strategy.init_args.federated."
    train_main(["fit", "--config", str(config), f"{fed}report_dir={tmp_path / 'r'}", "--data.init_args.partition_dir="
                f"{tmp_path / 'r'}", f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    audit = report["membership"]
    assert audit["n_members"] == audit["n_nonmembers"] == 16
    for name in ("global", "personalised"):
        assert 0.0 <= audit[name]["attacks"]["loss"]["auc"]["value"] <= 1.0


@pytest.mark.slow
def test_the_drift_benchmark_logs_the_server_step_against_fedavg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_benchmark: Any
) -> None:
    bench = load_benchmark("fedpeptao_drift")
    out = tmp_path / "drift"
    argv = ["x", "--base", str(_tiny(tmp_path, num_rounds=3)), "--out", str(out), "--seeds", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--variants", "code", "round_start"])
    bench.main()
    rows = {r["variant"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert set(rows) == {"code", "round_start"}
    for row in rows.values():
        curve = row["curves"][0]
        assert curve["correction_over_fedavg"][0] is None  # round 1 is FedAvg (the code skips the server step)
        assert all(c >= 0 for c in curve["correction_over_fedavg"][1:]) and row["mean_local_steps"] > 0
    config = yaml.safe_load((out / "seed0" / "round_start" / "config.yaml").read_text())
    fed = config["trainer"]["strategy"]["init_args"]["federated"]
    assert fed["server"]["init_args"]["options"]["momentum_mode"] == "round_start" and fed["client_dp"] is None
