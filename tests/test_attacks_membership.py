"""Membership inference: metric correctness, bootstrap intervals, splits, and both controls on a tiny model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from privtune.attacks.membership import (
    AttackResult,
    ExampleStatistics,
    Interval,
    MembershipReport,
    attack_scores,
    audit_model,
    best_valid_attack,
    bootstrap_metrics,
    control_verdicts,
    example_statistics,
    half_split,
    member_split,
    membership_report,
    roc_auc,
    tpr_at_fpr,
)
from privtune.data import PadCollator
from privtune.models import load_model, tiny_tokenizer
from privtune.models.tiny import _WORDS


# ---------------------------------------------------------------------------------------------- metrics
def test_auc_of_perfect_inverse_and_tied_separators():
    members, nonmembers = np.arange(10, 20.0), np.arange(0, 10.0)
    assert roc_auc(members, nonmembers) == 1.0
    assert roc_auc(nonmembers, members) == 0.0
    assert roc_auc(np.ones(7), np.ones(5)) == 0.5  # every pair tied counts one half


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    m, n = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pairwise = np.mean([(a > b) + 0.5 * (a == b) for a in m for b in n])
    assert roc_auc(m, n) == pytest.approx(pairwise, abs=1e-12)


def test_auc_of_random_scores_is_near_one_half():
    rng = np.random.default_rng(1)
    assert abs(roc_auc(rng.normal(size=4000), rng.normal(size=4000)) - 0.5) < 0.02


def test_tpr_at_fpr_on_hand_made_scores():
    nonmembers = np.arange(100.0)  # 0..99
    members = np.array([99.5, 98.5, 97.5, 50.0, 10.0])
    # 1% of 100 non-members: one may be flagged, the threshold is the 2nd largest (98) -> members > 98
    assert tpr_at_fpr(members, nonmembers, 0.01) == pytest.approx(2 / 5)
    # 0.1%: none may be flagged, the threshold is the largest (99)
    assert tpr_at_fpr(members, nonmembers, 0.001) == pytest.approx(1 / 5)
    assert tpr_at_fpr(members, nonmembers, 0.5) == pytest.approx(4 / 5)  # members > 49
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(members, nonmembers, 1.0)


def test_metrics_refuse_empty_or_non_finite_scores():
    with pytest.raises(ValueError, match="empty"):
        roc_auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([float("nan"), 1.0], [0.0])


def test_bootstrap_interval_brackets_estimate_and_has_the_analytic_width():
    rng = np.random.default_rng(2)
    small = bootstrap_metrics(rng.normal(0.5, 1, 50), rng.normal(0, 1, 50), draws=1000, seed=0)
    large = bootstrap_metrics(rng.normal(0.5, 1, 600), rng.normal(0, 1, 600), draws=1000, seed=0)
    for res in (small, large):
        assert res["auc"].low <= res["auc"].value <= res["auc"].high
        assert set(res) == {"auc", "tpr@1%", "tpr@0.1%"}
    assert (large["auc"].high - large["auc"].low) < (small["auc"].high - small["auc"].low) / 2
    # Hanley & McNeil (1982) standard error of an AUC estimate: the 95% interval spans about 2 x 1.96 SE
    a, n = large["auc"].value, 600
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + (n - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (n * n))
    assert (large["auc"].high - large["auc"].low) == pytest.approx(2 * 1.96 * se, rel=0.2)


def _same(_: object) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(9)
    return rng.normal(size=10), rng.normal(size=10)


def test_bootstrap_is_deterministic_per_seed_and_refuses_too_few_draws():
    m, n = _same(None)
    assert bootstrap_metrics(m, n, draws=1000, seed=5) == bootstrap_metrics(m, n, draws=1000, seed=5)
    assert bootstrap_metrics(m, n, draws=1000, seed=5) != bootstrap_metrics(m, n, draws=1000, seed=6)
    with pytest.raises(ValueError, match="draws=999"):
        bootstrap_metrics(m, n, draws=999)


def test_perfect_separator_interval_is_degenerate_at_one():
    res = bootstrap_metrics(np.arange(10, 20.0), np.arange(10.0), draws=1000)
    assert res["auc"] == Interval(1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------- splits
def test_member_split_is_equal_disjoint_and_seeded():
    m, n = member_split(100, 60, size=40, seed=1)
    assert len(m) == len(n) == 40 and len(set(m)) == 40 and len(set(n)) == 40
    m2, n2 = member_split(100, 60, size=40, seed=1)
    assert (m == m2).all() and (n == n2).all()
    assert not (member_split(100, 60, size=40, seed=2)[0] == m).all()
    assert len(member_split(100, 60)[0]) == 60
    with pytest.raises(ValueError, match="size=61"):
        member_split(100, 60, size=61)
    a, b = half_split(11, seed=0)
    assert len(a) == len(b) == 5 and not set(a) & set(b)


def test_report_round_trips_and_refuses_half_a_reference():
    stats = ExampleStatistics(np.linspace(0, 1, 20))
    with pytest.raises(ValueError, match="both"):
        membership_report(stats, stats, member_reference=stats)
    rep = membership_report(stats, stats)
    assert MembershipReport.from_dict(rep.to_dict()).to_dict() == rep.to_dict()
    assert set(rep.attacks) == {"loss"}  # no reference, no token statistics, no texts
    assert "| loss |" in rep.markdown()


def test_verdicts_mark_failed_controls_invalid():
    def result(low: float, high: float) -> AttackResult:
        return AttackResult({"auc": Interval((low + high) / 2, low, high)}, 10, 10)

    pos = MembershipReport(
        {"loss": result(0.7, 0.9), "zlib": result(0.45, 0.6), "min_k": result(0.8, 0.95)},
        {"loss": result(0.4, 0.6), "zlib": result(0.4, 0.6), "min_k": result(0.55, 0.7)},
    )
    verdict = control_verdicts(pos)
    assert verdict["loss"]["valid"]
    assert not verdict["zlib"]["valid"] and "positive control failed" in verdict["zlib"]["reason"]
    assert not verdict["min_k"]["valid"] and "negative control failed" in verdict["min_k"]["reason"]
    assert best_valid_attack(pos, verdict) == "loss"
    assert best_valid_attack(pos, []) is None


# ------------------------------------------------------------------------------------- controls on a tiny model
@pytest.fixture(scope="module")
def memorised() -> dict[str, ExampleStatistics]:
    """A tiny Llama trained 300 full-batch steps on 32 random word strings; 32 more held out."""
    tok = tiny_tokenizer()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(10)) for _ in range(64)]
    collate = PadCollator(tok.pad_token_id)

    def batches(part: list[str]) -> list[dict[str, torch.Tensor]]:
        items = [{"input_ids": tok(t)["input_ids"]} for t in part]
        return [collate(items[s : s + 16]) for s in range(0, len(items), 16)]

    torch.manual_seed(0)
    model = load_model("tiny-llama", task="causal_lm")
    base = load_model("tiny-llama", task="causal_lm")
    base.load_state_dict(model.state_dict())
    members, nonmembers = texts[:32], texts[32:]
    full = collate([{"input_ids": tok(t)["input_ids"]} for t in members])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        loss = model(**full).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {
        "member": example_statistics(model, batches(members), tokenizer=tok),
        "nonmember": example_statistics(model, batches(nonmembers), tokenizer=tok),
        "member_ref": example_statistics(base, batches(members), tokenizer=tok),
        "nonmember_ref": example_statistics(base, batches(nonmembers), tokenizer=tok),
        "base_member": example_statistics(base, batches(members), tokenizer=tok),
    }


def test_positive_control_excludes_one_half_for_every_attack(memorised):
    rep = membership_report(
        memorised["member"], memorised["nonmember"], memorised["member_ref"], memorised["nonmember_ref"], seed=0
    )
    assert set(rep.attacks) == {"loss", "reference", "min_k", "zlib"}
    for name, res in rep.attacks.items():
        assert res.auc.low > 0.5, (name, res.auc)
        assert res.n_members == res.n_nonmembers == 32
    verdict = control_verdicts(rep)
    assert all(v["valid"] for v in verdict.values()), verdict
    assert best_valid_attack(rep, verdict) in rep.attacks


def test_negative_control_contains_one_half(memorised):
    rep = membership_report(memorised["member"], memorised["nonmember"], seed=0)
    for name, res in rep.negative.items():
        assert res.auc.contains(0.5), (name, res.auc)
        assert res.n_members == res.n_nonmembers == 16


def test_untuned_model_does_not_separate_members(memorised):
    # the base model never saw the members: the loss attack on it must not find them
    scores_in = attack_scores(memorised["base_member"])["loss"]
    scores_out = attack_scores(memorised["nonmember_ref"])["loss"]
    assert bootstrap_metrics(scores_in, scores_out, draws=1000)["auc"].contains(0.5)


def test_statistics_refuse_bad_task_and_missing_keys():
    model = load_model("tiny-llama", task="causal_lm")
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="task='bogus'"):
        example_statistics(model, [{"input_ids": ids}], task="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attention_mask"):
        example_statistics(model, [{"input_ids": ids}])
    with pytest.raises(ValueError, match="class index `labels`"):
        example_statistics(model, [{"input_ids": ids, "attention_mask": ids}], task="label_word")
    with pytest.raises(ValueError, match="k=0"):
        example_statistics(model, [], k=0.0)


def test_audit_model_matches_the_step_by_step_report():
    tok = tiny_tokenizer()
    collate = PadCollator(tok.pad_token_id)
    rng = random.Random(1)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(6)) for _ in range(8)]
    batches = [collate([{"input_ids": tok(t)["input_ids"]} for t in texts[i : i + 4]]) for i in (0, 4)]
    model, base = load_model("tiny-llama", task="causal_lm"), load_model("tiny-llama", task="causal_lm")
    report = audit_model(model, batches[:1], batches[1:], reference_model=base, tokenizer=tok, seed=3)
    stats = [
        example_statistics(m, b, tokenizer=t) for m, b, t in ((model, batches[:1], tok), (model, batches[1:], tok))
    ]
    refs = [example_statistics(base, b) for b in (batches[:1], batches[1:])]
    assert report.to_dict()["attacks"] == membership_report(*stats, *refs, seed=3).to_dict()["attacks"]


def test_label_word_loss_and_min_k_from_one_pass_equal_the_two_pass_computation():
    """A decoder classifier's label-word loss and min-k % come from one forward pass on each example followed by its
    gold label word; by value they equal the label-word scoring pass plus a separate pass on the extended rows."""
    import torch.nn.functional as F

    from privtune.attacks.membership import _append_label, _min_k_mean, _token_logprobs
    from privtune.models.scoring import classification_logits

    torch.manual_seed(0)
    model = load_model("tiny-llama", task="causal_lm").eval()
    ids = torch.randint(3, 200, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding of different lengths
    mask[3, 3:] = 0
    ids = ids * mask
    labels = torch.tensor([0, 2, 1, 2])
    words = torch.tensor([11, 12, 13])
    stats = example_statistics(
        model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}], task="label_word",
        label_token_ids=words, k=0.5,
    )  # fmt: skip
    with torch.no_grad():
        loss = F.cross_entropy(classification_logits(model, ids, mask, words).float(), labels, reduction="none")
        full_ids, full_mask = _append_label(ids, mask, words[labels], 0)
        logp, tmask = _token_logprobs(model, full_ids, full_mask)
    np.testing.assert_allclose(stats.loss, loss.double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.min_k, _min_k_mean(logp, tmask, 0.5).numpy(), rtol=1e-5, atol=1e-6)
