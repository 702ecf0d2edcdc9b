"""The leak check by closeness: every disguised copy of an original middle matrix is refused, compression passes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from privtune.emulator import (
    OriginalTensorError,
    build_emulator,
    build_scaleot_emulator,
    compress_kept_blocks,
    find_original_tensors,
    make_harmonizers,
    save_emulator_artifact,
    uniform_drop_plan,
)
from privtune.emulator.artifact import artifact_summary, leak_check_path
from privtune.emulator.leak_check import (
    DEFAULT_MIN_REL_ERROR,
    check_no_original,
    emulator_matrices,
    kept_matrix_closeness,
    nearest_originals,
    original_middle_matrices,
)
from privtune.models import get_blocks, load_model


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _row_perm(w: Tensor) -> Tensor:
    return w[torch.randperm(w.shape[0], generator=_gen(1))]


def _col_perm(w: Tensor) -> Tensor:
    return w[:, torch.randperm(w.shape[1], generator=_gen(2))]


VARIANTS: dict[str, Callable[[Tensor], Tensor]] = {
    "exact_copy": lambda w: w.clone(),
    "row_permutation": _row_perm,
    "column_permutation": _col_perm,
    "scaled_1e-6": lambda w: w * (1 + 1e-6),
    "bf16_round_trip": lambda w: w.to(torch.bfloat16).float(),
    "noise_1e-9": lambda w: w + 1e-9 * torch.randn(w.shape, generator=_gen(3)),
    "negation": lambda w: -w,
    "doubled": lambda w: 2 * w,
    "transpose": lambda w: w.T.contiguous(),
    "row_permuted_negated_noise_1e-3": lambda w: -_row_perm(w) + 1e-3 * w.std() * torch.randn(w.shape),
    "transposed_column_permutation": lambda w: _col_perm(w).T.contiguous(),
}


def _compressed(model: torch.nn.Module, beta: float = 0.5, beta_mlp: float = 0.75):
    plan = uniform_drop_plan(4, 1, 1, 2)
    emulator = build_emulator(model, plan)
    compress_kept_blocks(emulator, plan, beta=beta, beta_mlp=beta_mlp)
    return emulator, plan


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("matrix", ["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"])
def test_each_injected_variant_is_refused_naming_tensor_and_original(variant: str, matrix: str, tmp_path) -> None:
    model = load_model("tiny-llama", seed=0)
    emulator, plan = _compressed(model)
    source = get_blocks(model)[2].get_submodule(matrix).weight.detach()
    state = {k: v.clone() for k, v in emulator.state_dict().items()}
    state["smuggled.weight"] = VARIANTS[variant](source)
    assert find_original_tensors(state, model, plan) == ["smuggled.weight"]
    with pytest.raises(OriginalTensorError, match=rf"`smuggled.weight` matches original `layers.2.{matrix}.weight`"):
        check_no_original(state, model, plan)
    # Through the artifact writer: refused, nothing written.
    emulator.register_buffer("smuggled", VARIANTS[variant](source).clone())
    with pytest.raises(OriginalTensorError, match="refusing to export"):
        save_emulator_artifact(tmp_path / "emu", emulator, plan, model)
    assert not (tmp_path / "emu").exists()


def test_a_full_rank_low_rank_factorisation_is_refused_as_its_product() -> None:
    model = load_model("tiny-llama", seed=0)
    w = get_blocks(model)[1].mlp.down_proj.weight.detach()  # 32 x 64, rank 32
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    state = {"x.down.weight": s[:, None] * vh, "x.up.weight": u}
    assert find_original_tensors(state, model, uniform_drop_plan(4, 1, 1, 1)) == ["x.(up@down)"]


def test_compressed_and_unrelated_matrices_pass_with_their_distance_recorded() -> None:
    model = load_model("tiny-llama", seed=0)
    emulator, plan = _compressed(model)
    near = check_no_original(emulator.state_dict(), model, plan)
    assert near and min(c.rel_error for c in near.values()) >= DEFAULT_MIN_REL_ERROR
    # The adapters (original non-middle blocks) and another model's middle are far from every middle matrix.
    other = load_model("tiny-llama", seed=1)
    state = {f"o.{k}": v for k, v in get_blocks(other)[1].state_dict().items()}
    near = nearest_originals(emulator_matrices(state), original_middle_matrices(model, plan))
    assert near and all(c.rel_error > 0.5 for c in near.values())


def test_threshold_is_documented_default_and_validated() -> None:
    model = load_model("tiny-llama", seed=0)
    emulator, plan = _compressed(model)
    with pytest.raises(ValueError, match="min_rel_error"):
        check_no_original(emulator.state_dict(), model, plan, min_rel_error=0.0)
    # A near-full-rank truncation (rank 31 of 32 for q/o, 15 of 16 for k/v) is within 1e-2 here: refused.
    near_full, plan2 = _compressed(model, beta=0.96, beta_mlp=0.75)
    with pytest.raises(OriginalTensorError, match="self_attn"):
        check_no_original(near_full.state_dict(), model, plan2)


def test_default_scaleot_export_passes_and_summary_records_closeness(tmp_path) -> None:
    model = load_model("tiny-llama", seed=0)
    harmonizers = make_harmonizers(32, [1, 2], 8, seed=0)
    scores = torch.tensor([0.3, -0.2], dtype=torch.float64)
    emulator, plan = build_scaleot_emulator(model, scores, harmonizers, 2, 0.5, 0.8, 0.9, 8)
    folder = save_emulator_artifact(tmp_path / "emu", emulator, plan, model)
    summary = artifact_summary(folder)
    kept = summary["closeness"]["kept_matrices"]
    assert plan.kinds == ["adapter", "block", "harmonizer", "adapter"] and plan.layer_map[1] == 1
    paths = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")  # fmt: skip
    assert set(kept) == {f"1.{p}" for p in paths}
    for key, row in kept.items():
        assert row["original"] == "layers.1." + key.partition(".")[2]
        assert DEFAULT_MIN_REL_ERROR < row["rel_error"] < 1.0 and 0.0 < row["cosine"] < 1.0
        assert row["rel_error"] ** 2 + row["cosine"] ** 2 == pytest.approx(1.0, abs=1e-4)  # SVD truncation: orthogonal
    lo, hi = summary["closeness"]["kept_rel_error_range"]
    assert lo == min(r["rel_error"] for r in kept.values()) and hi >= lo
    assert summary["closeness"]["nearest"]["rel_error"] <= lo + 1e-6
    # The record stays with the owner: beside the shipped folder, not inside it.
    assert leak_check_path(folder) == tmp_path / "emu.leak_check.json"
    assert json.loads(leak_check_path(folder).read_text())["min_rel_error"] == DEFAULT_MIN_REL_ERROR
    assert "closeness" not in json.loads((folder / "meta.json").read_text())
    assert all("leak_check" not in p.name for p in folder.iterdir())


def test_kept_matrix_closeness_of_an_uncompressed_block_is_zero() -> None:
    model = load_model("tiny-llama", seed=0)
    plan = uniform_drop_plan(4, 1, 1, 1)
    kept = kept_matrix_closeness(build_emulator(model, plan), model, plan)
    assert kept and all(r["rel_error"] == 0.0 and r["cosine"] == pytest.approx(1.0) for r in kept.values())


@pytest.mark.assets
def test_smollm2_default_scaleot_export_passes_quickly() -> None:
    # ScaleOT's default SRC (beta 0.8 / 0.9) on the two kept blocks with the closest originals (block 23's q
    # projection is the nearest of all, benchmarks/results/leak_check/smollm2.json); alpha 0.9 keeps only them, so
    # the test builds 14 SVDs instead of 91. Every emulator matrix is still checked against all 182 originals.
    model = load_model("smollm2-135m-instruct")
    middle = list(range(2, 28))
    harmonizers = make_harmonizers(576, middle, 64, seed=0)
    scores = torch.tensor([1.0 if i in (20, 23) else -1.0 for i in middle], dtype=torch.float64)
    emulator, plan = build_scaleot_emulator(model, scores, harmonizers, 4, 0.9, 0.8, 0.9, 64)
    assert [s for s, k in plan.middle if k == "block"] == [20, 23]
    start = time.perf_counter()
    near = check_no_original(emulator.state_dict(), model, plan)
    assert time.perf_counter() - start < 60
    assert 0.019 < min(c.rel_error for c in near.values()) < 0.02
    state = dict(emulator.state_dict())
    state["smuggled"] = get_blocks(model)[9].mlp.gate_proj.weight.detach()[:, torch.randperm(576)]
    assert find_original_tensors(state, model, plan) == ["smuggled"]
