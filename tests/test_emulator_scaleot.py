"""ScaleOT core (arXiv 2412.09812): harmonizers, Dynamic LayerReplace, RL importance, SRC, emulator knobs."""

from __future__ import annotations

import math

import pytest
import torch

from privtune.emulator import (
    Harmonizer,
    LayerImportance,
    LowRankLinear,
    build_scaleot_emulator,
    compress_linear,
    find_original_tensors,
    install_switches,
    least_important,
    make_harmonizers,
    rank_compress_modules,
    reinforce_update,
    remove_switches,
    rewards,
    sample_keep_mask,
    save_emulator_artifact,
    set_replace_mask,
    stage1_step,
    truncated_svd,
    warm_start_harmonizers,
)
from privtune.models import get_blocks, load_model

FAMILIES = ("tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-bert")


def _model(name: str) -> torch.nn.Module:
    return load_model(name, task="base" if name == "tiny-bert" else "causal_lm").eval()


def _batch(length: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 500, (2, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _out(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_fresh_harmonizer_is_identity() -> None:
    h = Harmonizer(32, 8)
    x = torch.randn(2, 5, 32)
    assert torch.equal(h(x, None, position_ids=None), x)
    with pytest.raises(ValueError, match="harmonizer_rank=0"):
        Harmonizer(32, 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_warm_start_fits_each_harmonizer_to_its_block(name: str) -> None:
    model = _model(name)
    batch = _batch(12)
    reference = _out(model, batch)
    harmonizers = make_harmonizers(32, [1, 2], rank=8)
    switches = install_switches(model, harmonizers)
    before, after = warm_start_harmonizers(model, switches, [batch] * 10, steps_per_batch=5, lr=1e-2)
    assert before == pytest.approx(1.0)  # a fresh harmonizer is the identity: the whole residual is missed
    assert after < 0.9 * before
    assert all(not s.replaced for s in switches.values())  # the original blocks run again afterwards
    assert torch.equal(_out(model, batch), reference)  # and the frozen blocks are untouched
    # block activations are detached: only the harmonizers get gradients
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    assert not any(g for n, g in grads.items() if ".harmonizer." not in n)
    assert any(g for n, g in grads.items() if ".harmonizer." in n)
    with pytest.raises(ValueError, match="no batch"):
        warm_start_harmonizers(model, switches, [])


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_replace_keeps_shapes_and_runs_on_each_family(name: str) -> None:
    model = _model(name)
    batch = _batch()
    reference = _out(model, batch)
    harmonizers = make_harmonizers(32, [1, 2], rank=8)
    switches = install_switches(model, harmonizers)
    assert torch.equal(_out(model, batch), reference)  # nothing replaced yet
    set_replace_mask(switches, {1: True, 2: False})  # keep block 1, replace block 2
    replaced = _out(model, batch)
    assert replaced.shape == reference.shape
    assert not torch.allclose(replaced, reference)
    # A fresh (identity) harmonizer equals dropping the block.
    with torch.no_grad():
        harmonizers["2"].up.weight.normal_()
    assert not torch.allclose(_out(model, batch), replaced)
    remove_switches(model)
    assert torch.equal(_out(model, batch), reference)


def test_sample_mask_keeps_half_of_each_group() -> None:
    keep = sample_keep_mask(torch.zeros(10), 4, torch.Generator().manual_seed(0))
    assert [int(keep[i : i + 4].sum()) for i in (0, 4, 8)] == [2, 2, 1]
    with pytest.raises(ValueError, match="group_size=0"):
        sample_keep_mask(torch.zeros(4), 0)


def test_rl_update_moves_importance_toward_layers_whose_removal_hurts() -> None:
    # Constructed case: replacing layer 2 costs 2.0 nats, layer 5 costs 0.5, the others nothing.
    penalty = torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0, 0.5, 0.0, 0.0])
    importance = LayerImportance(list(range(8)), group_size=4, seed=0)
    for _ in range(300):
        masks = [importance.sample() for _ in range(3)]
        losses = [1.0 + float((penalty * (1 - torch.tensor([m[i] for i in range(8)]).float())).sum()) for m in masks]
        importance.update(masks, losses, lr=0.5)
    scores = importance.scores
    assert int(scores.argmax()) == 2
    assert scores[5] > scores[[0, 1, 3, 4, 6, 7]].max()
    # The least important layers are those that cost nothing.
    assert set(least_important(scores, list(range(8)), 0.5)) <= {0, 1, 3, 4, 6, 7}


def test_reinforce_update_sign_on_one_step() -> None:
    scores = torch.zeros(2)
    masks = torch.tensor([[True, False], [False, True]])
    new = reinforce_update(scores, masks, [1.0, 3.0], lr=1.0)  # keeping layer 0 gave the lower loss
    assert new[0] > 0 > new[1]


def _learned_scores(offset: float, reward: str, steps: int = 100) -> torch.Tensor:
    """Scores after ``steps`` RL steps where replacing layer 2 costs 0.5 nats over a base loss of ``offset``."""
    penalty = torch.tensor([0.0, 0.0, 0.5, 0.0])
    importance = LayerImportance(list(range(4)), group_size=4, seed=0, reward=reward)  # type: ignore[arg-type]
    for _ in range(steps):
        masks = [importance.sample() for _ in range(3)]
        drops = [1 - torch.tensor([m[i] for i in range(4)]).float() for m in masks]
        importance.update(masks, [offset + float((penalty * d).sum()) for d in drops], lr=0.1)
    return importance.scores


def test_exp_reward_vanishes_at_a_language_model_loss_and_the_relative_one_does_not() -> None:
    # ScaleOT's reward exp(-L_j) - mean exp(-L_c) shrinks with exp(-L): at L = 6 the same loss gaps move the
    # scores about exp(6) ~ 400 times less than at L = 0; the relative reward moves them the same at both levels
    at_0, at_6 = _learned_scores(0.0, "exp"), _learned_scores(6.0, "exp")
    assert at_6.abs().max() < at_0.abs().max() / 100
    rel_0, rel_6 = _learned_scores(0.0, "relative"), _learned_scores(6.0, "relative")
    torch.testing.assert_close(rel_0, rel_6)
    assert int(rel_6.argmax()) == 2 and rel_6[2] > 100 * at_6[2] > 0
    # one step: the relative reward is exp(-L_j) / mean exp(-L_c) - 1, whatever the level
    expected = torch.tensor([1.0, math.exp(-1)], dtype=torch.float64)
    torch.testing.assert_close(rewards([6.0, 7.0], "relative"), expected / expected.mean() - 1)
    with pytest.raises(ValueError, match="reward='log'"):
        LayerImportance([1, 2], reward="log")  # type: ignore[arg-type]
    a = LayerImportance([1, 2], reward="relative")
    with pytest.raises(ValueError, match="reward='relative'"):
        LayerImportance([1, 2]).load_state_dict(a.state_dict())


def test_least_important_validates_alpha() -> None:
    for alpha in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"alpha={alpha}"):
            least_important(torch.zeros(4), [2, 3, 4, 5], alpha)
    assert least_important(torch.tensor([0.3, -1.0, 2.0, 0.0]), [2, 3, 4, 5], 0.5) == [3, 5]
    assert least_important(torch.zeros(4), [2, 3, 4, 5], 0.0) == []


def test_importance_state_round_trip_resumes_same_draws() -> None:
    a = LayerImportance([2, 3, 4, 5], seed=7)
    a.update([a.sample(), a.sample()], [1.0, 2.0], 0.3)
    b = LayerImportance([2, 3, 4, 5], seed=0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.scores, b.scores)
    assert [a.sample() for _ in range(5)] == [b.sample() for _ in range(5)]
    with pytest.raises(ValueError, match="differ"):
        LayerImportance([1, 2]).load_state_dict(a.state_dict())


def test_rank_compression_full_rank_is_identity_and_rank_r_keeps_top_singular_values() -> None:
    layer = torch.nn.Linear(12, 8)
    x = torch.randn(4, 12)
    full = compress_linear(layer, 8)
    torch.testing.assert_close(full(x), layer(x), rtol=1e-5, atol=1e-5)
    low = compress_linear(layer, 3)
    assert isinstance(low, LowRankLinear)
    s_orig = torch.linalg.svdvals(layer.weight.double())
    s_low = torch.linalg.svdvals(low.weight.double())
    torch.testing.assert_close(s_low[:3], s_orig[:3], rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(low.up.weight.double() @ low.down.weight.double()) == 3
    torch.testing.assert_close(low.bias, layer.bias)
    with pytest.raises(ValueError, match="rank=9"):
        compress_linear(layer, 9)
    with pytest.raises(ValueError, match="rank=0"):
        truncated_svd(layer.weight, 0)


def test_rank_compression_handles_gpt2_conv1d_and_validates_paths() -> None:
    model = _model("tiny-gpt2")
    block = get_blocks(model)[1]
    x = torch.randn(2, 3, 32)
    before = block.attn.c_attn(x)
    ranks = rank_compress_modules(block, ["attn.c_attn"], 1.0)
    assert ranks == {"attn.c_attn": 32}
    torch.testing.assert_close(block.attn.c_attn(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not name a linear"):
        rank_compress_modules(block, ["attn.nothing"], 0.5)
    with pytest.raises(ValueError, match="beta=1.5"):
        rank_compress_modules(block, ["attn.c_attn"], 1.5)


@pytest.mark.parametrize("name", FAMILIES)
def test_scaleot_emulator_on_each_family(name: str) -> None:
    model = _model(name)
    harmonizers = make_harmonizers(32, [1, 2], rank=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emulator, plan = build_scaleot_emulator(model, torch.tensor([1.0, -1.0]), harmonizers, 2, 0.5, 0.5, 0.75, 8)
    assert plan.kinds == ["adapter", "block", "harmonizer", "adapter"]
    assert isinstance(get_blocks(emulator)[2], Harmonizer)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # SRC never touches originals
    assert find_original_tensors(emulator.state_dict(), model, plan) == []
    assert _out(emulator.eval(), _batch()).shape[:2] == (2, 8)


def test_scaleot_knob_errors_before_work() -> None:
    model = _model("tiny-llama")
    harmonizers = make_harmonizers(32, [1, 2], rank=8)
    with pytest.raises(ValueError, match="alpha=1.0"):
        build_scaleot_emulator(model, torch.zeros(2), harmonizers, 2, alpha=1.0)
    with pytest.raises(ValueError, match="leaves no middle"):
        build_scaleot_emulator(model, torch.zeros(0), harmonizers, 4, alpha=0.5)
    with pytest.raises(ValueError, match="beta=0.0"):
        build_scaleot_emulator(model, torch.zeros(2), harmonizers, 2, beta=0.0)


def test_stage1_step_trains_only_harmonizers(tmp_path) -> None:
    model = _model("tiny-llama").train()
    model.requires_grad_(False)
    harmonizers = make_harmonizers(32, [1, 2], rank=8)
    switches = install_switches(model, harmonizers)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "harmonizer" not in k}
    importance = LayerImportance([1, 2], group_size=2, seed=0)
    opt = torch.optim.AdamW(harmonizers.parameters(), lr=1e-2)
    out = stage1_step(model, switches, importance, opt, _batch(), _batch(6), num_candidates=3, rl_lr=0.1)
    assert len(out["rl_losses"]) == 3
    assert any(h.up.weight.abs().sum() > 0 for h in harmonizers.values())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    remove_switches(model)
    emulator, plan = build_scaleot_emulator(model, importance.scores, harmonizers, 2, 0.5, 0.5, 0.5, 8)
    save_emulator_artifact(tmp_path / "emu", emulator, plan, model)
