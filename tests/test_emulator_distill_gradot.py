"""Emulator distillation (Offsite-Tuning KD, 2302.04870) and GradOT scores (2507.04455)."""

from __future__ import annotations

import pytest
import torch

from privtune.emulator import (
    DistillCheckpoint,
    DistillProgress,
    KFACStats,
    build_emulator,
    build_gradot_emulator,
    channel_gcs,
    distill_emulator,
    distillation_loss,
    find_original_tensors,
    kfac_statistics,
    middle_parameters,
    normalized_kd_loss,
    select_components,
    svd_gcs,
    uniform_drop_plan,
)
from privtune.models import get_blocks, load_model


def _batch(seed: int = 0, length: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 500, (4, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_normalized_kd_loss_definition() -> None:
    h_t = torch.randn(2, 3, 4)
    assert normalized_kd_loss(h_t, h_t.clone()) == 0
    h_s = h_t + 0.1
    expected = ((h_t - h_s) ** 2).mean() / (h_t**2).mean()
    torch.testing.assert_close(normalized_kd_loss(h_t, h_s), expected)


def test_per_dim_kd_weighs_every_dimension_and_global_kd_is_dominated_by_massive_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    h_t = torch.randn(2, 8, 16, generator=gen)
    h_t[..., 0] += 300.0  # one massive-activation dimension, as in small decoders' residual streams
    h_s = torch.zeros_like(h_t)
    h_s[..., 0] = h_t[..., 0]  # the student matches only that dimension
    assert normalized_kd_loss(h_t, h_t.clone(), norm="per_dim") == 0
    assert float(normalized_kd_loss(h_t, h_s)) < 1e-3
    rms = h_t.reshape(-1, 16).pow(2).mean(0).sqrt()
    expected = ((h_t - h_s) / rms).pow(2).mean()
    torch.testing.assert_close(normalized_kd_loss(h_t, h_s, norm="per_dim"), expected)
    assert float(expected) > 0.9  # 15 of 16 dimensions unmatched
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    keep = mask.bool()
    rms = h_t[keep].pow(2).mean(0).sqrt()
    torch.testing.assert_close(
        normalized_kd_loss(h_t, h_s, mask, norm="per_dim"), ((h_t[keep] - h_s[keep]) / rms).pow(2).mean()
    )
    both = normalized_kd_loss(h_t, h_s, norm="global+per_dim")
    torch.testing.assert_close(both, normalized_kd_loss(h_t, h_s) + normalized_kd_loss(h_t, h_s, norm="per_dim"))
    with pytest.raises(ValueError, match="norm='rms'"):
        normalized_kd_loss(h_t, h_s, norm="rms")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_kd_term_is_zero_for_a_full_emulator_and_positive_after_drop(name: str) -> None:
    model = load_model(name).eval()
    batch = _batch()
    full_plan = uniform_drop_plan(4, 1, 1, 2)
    out = distillation_loss(model, build_emulator(model, full_plan).eval(), full_plan, **batch)
    assert float(out["kd"]) == 0.0
    plan = uniform_drop_plan(4, 1, 1, 1)
    out = distillation_loss(model, build_emulator(model, plan).eval(), plan, **batch)
    assert float(out["kd"]) > 0.0


def test_distillation_trains_only_the_middle_and_lowers_the_loss() -> None:
    model = load_model("tiny-llama").eval()
    plan = uniform_drop_plan(4, 1, 1, 1)
    emulator = build_emulator(model, plan)
    params = middle_parameters(emulator, plan)
    frozen = {k: v.clone() for k, v in emulator.state_dict().items() if not k.startswith("model.layers.1.")}
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = _batch()
    losses = []
    for _ in range(15):
        out = distillation_loss(model, emulator, plan, **batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["kd"]))
    assert losses[-1] < losses[0]
    state = emulator.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert find_original_tensors(state, model, plan) == []  # every kept matrix moved


def test_svd_gcs_matches_the_explicit_kfac_product() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 4, dtype=torch.float64)
    a, b = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64)
    stats = KFACStats(a.T @ a / 30, b.T @ b / 30, torch.randn(5, 4, dtype=torch.float64))
    gcs, u, s, vh = svd_gcs(w, stats, lam=0.7)
    for k in range(4):
        delta = -s[k] * torch.outer(u[:, k], vh[k])
        expected = (stats.s_b @ delta @ stats.s_a).abs().sum() - 0.7 * (stats.grad * delta).sum()
        torch.testing.assert_close(gcs[k], expected)


def test_channel_gcs_matches_the_explicit_kfac_product() -> None:
    torch.manual_seed(0)
    w_in, w_out = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)

    def stats(d_out: int, d_in: int) -> KFACStats:
        a, b = torch.randn(20, d_in, dtype=torch.float64), torch.randn(20, d_out, dtype=torch.float64)
        return KFACStats(a.T @ a / 20, b.T @ b / 20, torch.randn(d_out, d_in, dtype=torch.float64))

    st_in, st_out = stats(6, 3), stats(3, 6)
    gcs = channel_gcs([(w_in, st_in)], (w_out, st_out), lam=0.5)
    for c in range(6):
        d_in = torch.zeros_like(w_in)
        d_in[c] = -w_in[c]
        d_out = torch.zeros_like(w_out)
        d_out[:, c] = -w_out[:, c]
        expected = sum(
            (st.s_b @ d @ st.s_a).abs().sum() - 0.5 * (st.grad * d).sum() for d, st in ((d_in, st_in), (d_out, st_out))
        )
        torch.testing.assert_close(gcs[c], expected)


def test_select_components_always_keeps_the_top_singular_values() -> None:
    gcs = torch.tensor([-5.0, -4.0, 3.0, 2.0, 1.0, 0.0, 9.0, 8.0, -1.0, -2.0] * 4)  # rank 40, top 5% = 2
    kept = select_components(gcs, 5, keep_top_frac=0.05)
    assert kept[:2].tolist() == [0, 1]  # lowest GCS, but the largest singular values: kept anyway
    assert set(kept[2:].tolist()) <= {6, 16, 26, 36, 7, 17}
    with pytest.raises(ValueError, match="rank=41"):
        select_components(gcs, 41)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_gradot_emulator_runs_and_ships_no_original_matrix(name: str) -> None:
    model = load_model(name).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emulator, plan = build_gradot_emulator(model, [_batch(1), _batch(2)], 1, 1, None, 0.5, 0.5)
    assert plan.method == "gradot"
    assert len(plan.modules) > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert find_original_tensors(emulator.state_dict(), model, plan) == []
    out = emulator.eval()(input_ids=_batch()["input_ids"]).logits
    assert out.shape == (4, 10, 512)


def test_kfac_statistics_shapes() -> None:
    model = load_model("tiny-llama").eval()
    block = get_blocks(model)[1]
    stats = kfac_statistics(model, [_batch()], {"down": block.mlp.down_proj, "q": block.self_attn.q_proj})
    assert stats["down"].s_a.shape == (64, 64)
    assert stats["down"].s_b.shape == (32, 32)
    assert stats["q"].grad.shape == (32, 32)


def test_gradot_rejects_bad_budgets_before_work() -> None:
    model = load_model("tiny-llama")
    with pytest.raises(ValueError, match="rank_budget=0"):
        build_gradot_emulator(model, [], rank_budget=0)
    with pytest.raises(ValueError, match="keep_top_frac=2"):
        build_gradot_emulator(model, [], keep_top_frac=2)


def test_distill_emulator_lowers_kd_and_leaves_adapters_and_teacher_alone() -> None:
    model = load_model("tiny-llama").eval()
    teacher_state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = uniform_drop_plan(4, 1, 1, 1)
    emulator = build_emulator(model, plan)
    adapters = {
        k: v.clone() for k, v in emulator.state_dict().items() if k.startswith(("model.layers.0.", "model.layers.2."))
    }
    first, last = distill_emulator(model, emulator, plan, [_batch(0), _batch(1)], steps=11, lr=3e-3)
    per_dim = distill_emulator(model, build_emulator(model, plan), plan, [_batch(0)], 11, 3e-3, kd_norm="per_dim")
    assert per_dim[1] < per_dim[0]
    assert last < first  # the same batch (0) on the first and the last of 11 steps
    assert all(torch.equal(model.state_dict()[k], v) for k, v in teacher_state.items())
    assert all(torch.equal(emulator.state_dict()[k], v) for k, v in adapters.items())
    assert not any(p.requires_grad for p in emulator.parameters()) and not emulator.training
    with pytest.raises(ValueError, match="steps=0"):
        distill_emulator(model, emulator, plan, [_batch()], steps=0)


def test_a_killed_distillation_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path) -> None:
    """Saved every 3 steps, killed in step 5, resumed: the same weights, history and KD as 7 steps in one go."""
    model = load_model("tiny-llama").eval()
    plan = uniform_drop_plan(4, 1, 1, 1)
    batches = [_batch(0), _batch(1), _batch(2)]
    whole = build_emulator(model, plan)
    first, last = distill_emulator(model, whole, plan, batches, steps=7, lr=3e-3)

    class Killed(Exception):
        pass

    def kill_in_step_5(step: int, values) -> None:  # noqa: ANN001 - the loop's values
        if step == 5:
            raise Killed

    checkpoint = DistillCheckpoint(tmp_path / "state" / "drop.pt", every=3)
    torch.manual_seed(0)
    with pytest.raises(Killed):
        distill_emulator(model, build_emulator(model, plan), plan, batches, 7, 3e-3, on_step=kill_in_step_5,
                         checkpoint=checkpoint)  # fmt: skip
    saved = torch.load(checkpoint.path, weights_only=True)  # plain tensors and numbers: no code to run
    assert saved["step"] == 3 and len(saved["history"]["kd"]) == 3 and saved["seconds"] > 0
    restored: list[DistillProgress] = []
    seen: list[int] = []
    resumed = build_emulator(model, plan)
    again = distill_emulator(model, resumed, plan, batches, 7, 3e-3, on_step=lambda s, v: seen.append(s),
                             checkpoint=checkpoint, on_resume=restored.append)  # fmt: skip
    assert [r.step for r in restored] == [3] and seen == [4, 5, 6, 7]
    assert again == pytest.approx((first, last), rel=1e-6)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    final = torch.load(checkpoint.path, weights_only=True)
    assert final["step"] == 7 and len(final["history"]["loss"]) == 7
    # a finished state resumes to nothing left to do; another run's state is refused, not resumed
    done = distill_emulator(model, build_emulator(model, plan), plan, batches, 7, 3e-3, checkpoint=checkpoint,
                            on_step=lambda s, v: seen.append(s))  # fmt: skip
    assert done == again and seen == [4, 5, 6, 7]
    with pytest.raises(ValueError, match=r"another distillation's state .*\['lr'\].*delete the file"):
        distill_emulator(model, build_emulator(model, plan), plan, batches, 7, 1e-3, checkpoint=checkpoint)
    with pytest.raises(ValueError, match=r"\['batches'\]"):
        distill_emulator(model, build_emulator(model, plan), plan, batches[:2], 7, 3e-3, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="every=0"):
        DistillCheckpoint(tmp_path / "x.pt", every=0)
