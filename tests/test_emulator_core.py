"""Emulator core: sandwich split, uniform keep rule, build, plug-in, artifacts (Offsite-Tuning, 2302.04870)."""

from __future__ import annotations

import copy

import pytest
import torch

from privtune.emulator import (
    EmulatorPlan,
    OriginalTensorError,
    SandwichSplit,
    build_emulator,
    check_base_model,
    compress_kept_blocks,
    extract_adapters,
    find_original_tensors,
    freeze_except_adapters,
    load_adapter_artifact,
    load_emulator_artifact,
    plug_adapters,
    save_adapter_artifact,
    save_emulator_artifact,
    uniform_drop_plan,
    uniform_keep_indices,
    uniform_keep_layers,
)
from privtune.models import get_blocks, load_model

FAMILIES = ("tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-bert")


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    model = load_model(name, task="base" if name == "tiny-bert" else "causal_lm", seed=seed)
    return model.eval()


def _ids(batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch, use_cache=False)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# The five index rows of the Offsite-Tuning table (docs/offsite_tuning.md, spec §2.2).
KEEP_CASES = [
    (24, 8, [2, 5, 7, 10, 13, 16, 18, 21]),
    (48, 16, [2, 5, 8, 11, 13, 16, 19, 22, 25, 28, 31, 34, 36, 39, 42, 45]),
    (32, 18, [2, 4, 5, 7, 8, 10, 12, 13, 15, 16, 18, 19, 21, 23, 24, 26, 27, 29]),
    (30, 12, [2, 4, 7, 9, 11, 13, 16, 18, 20, 22, 25, 27]),
    (30, 8, [2, 6, 9, 13, 16, 20, 23, 27]),
]


@pytest.mark.parametrize(("num_layers", "k", "expected"), KEEP_CASES)
def test_uniform_keep_rule_matches_published_configs(num_layers: int, k: int, expected: list[int]) -> None:
    assert uniform_keep_layers(num_layers, k, 2, 2) == expected


def test_uniform_keep_rule_edges() -> None:
    assert uniform_keep_indices(5, 5) == [0, 1, 2, 3, 4]
    assert uniform_keep_indices(5, 1) == [0]
    assert uniform_keep_indices(5, 2) == [0, 4]
    assert uniform_keep_indices(6, 3) == [0, 2, 5]  # 2.5 rounds half to even -> 2
    with pytest.raises(ValueError, match="emulator_layers=0"):
        uniform_keep_indices(5, 0)
    with pytest.raises(ValueError, match="emulator_layers=6"):
        uniform_keep_indices(5, 6)


def test_split_with_no_middle_is_rejected() -> None:
    with pytest.raises(ValueError, match="leaves no middle block"):
        SandwichSplit(4, 2, 2)
    with pytest.raises(ValueError, match="adapter_bottom=-1"):
        SandwichSplit(4, -1, 1)
    split = SandwichSplit(6, 1, 2)
    assert (split.bottom_indices, split.middle_indices, split.top_indices) == ([0], [1, 2, 3], [4, 5])


def test_plan_round_trip_and_validation() -> None:
    plan = uniform_drop_plan(30, 2, 2, 8)
    assert plan.layer_map == [0, 1, 2, 6, 9, 13, 16, 20, 23, 27, 28, 29]
    assert plan.adapter_positions == {0: 0, 1: 1, 10: 28, 11: 29}
    assert EmulatorPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ValueError, match="middle range"):
        EmulatorPlan(6, 1, 1, [(0, "block")])
    with pytest.raises(ValueError, match="strictly increasing"):
        EmulatorPlan(6, 1, 1, [(3, "block"), (2, "block")])


@pytest.mark.parametrize("name", FAMILIES)
def test_build_keeps_original_untouched_and_is_deterministic(name: str) -> None:
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = uniform_drop_plan(4, 1, 1, 1)
    emu_a, emu_b = build_emulator(model, plan), build_emulator(model, copy.deepcopy(plan))
    assert len(get_blocks(emu_a)) == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # No shared storage with the original: training the emulator cannot touch the owner's weights.
    original_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not original_ptrs & {p.data_ptr() for p in emu_a.parameters()}
    state_a, state_b = emu_a.state_dict(), emu_b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    batch = _ids()
    emu_a.eval()
    assert _out(emu_a, batch).shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("name", FAMILIES)
def test_full_keep_emulator_equals_original(name: str) -> None:
    model = _model(name)
    emulator = build_emulator(model, uniform_drop_plan(4, 1, 1, 2)).eval()
    batch = _ids()
    assert torch.equal(_out(emulator, batch), _out(model, batch))


@pytest.mark.parametrize("name", FAMILIES)
def test_plug_in_of_untouched_adapters_is_exact(name: str) -> None:
    model = _model(name)
    batch = _ids()
    reference = _out(model, batch)
    plan = uniform_drop_plan(4, 1, 1, 1)
    emulator = build_emulator(model, plan)
    plug_adapters(model, extract_adapters(emulator, plan), plan)
    assert torch.equal(_out(model, batch), reference)


def test_plug_in_changes_only_adapter_blocks() -> None:
    model = _model("tiny-llama")
    plan = uniform_drop_plan(4, 1, 1, 1)
    emulator = build_emulator(model, plan)
    params = freeze_except_adapters(emulator, plan)
    assert {id(p) for p in params} == {id(p) for p in emulator.parameters() if p.requires_grad}
    with torch.no_grad():
        for p in params:
            p.add_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plug_adapters(model, extract_adapters(emulator, plan), plan)
    changed = {k.split(".")[2] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"0", "3"}  # model.layers.<i>.*: blocks 0 and L-1 only


def test_plug_in_rejects_wrong_keys_before_changing_anything() -> None:
    model = _model("tiny-llama")
    plan = uniform_drop_plan(4, 1, 1, 1)
    adapters = extract_adapters(build_emulator(model, plan), plan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(adapters)
    bad["2.mlp.up_proj.weight"] = bad.pop("3.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="names no adapter block"):
        plug_adapters(model, bad, plan)
    bad = {k: v for k, v in adapters.items() if k != "0.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="missing"):
        plug_adapters(model, bad, plan)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_artifact_check_finds_copied_and_row_permuted_tensors() -> None:
    model = _model("tiny-llama")
    plan = uniform_drop_plan(4, 1, 1, 1)
    emulator = build_emulator(model, plan)
    state = emulator.state_dict()
    hits = find_original_tensors(state, model, plan)
    assert "model.layers.1.self_attn.q_proj.weight" in hits  # plain layer drop ships the original block
    # Disguise one original matrix by permuting its rows: still found.
    perm = torch.randperm(64)
    disguised = {"x": get_blocks(model)[2].mlp.up_proj.weight.detach()[perm].clone()}
    assert find_original_tensors(disguised, model, plan) == ["x"]
    with pytest.raises(OriginalTensorError, match="refusing to export"):
        save_emulator_artifact("unused", emulator, plan, model)


def test_compressed_emulator_artifact_round_trip(tmp_path) -> None:
    model = _model("tiny-llama")
    plan = uniform_drop_plan(4, 1, 1, 2)
    emulator = build_emulator(model, plan)
    compress_kept_blocks(emulator, plan, beta=0.5, beta_mlp=0.75)
    assert find_original_tensors(emulator.state_dict(), model, plan) == []
    folder = save_emulator_artifact(tmp_path / "emu", emulator, plan, model)
    # The saved files hold no original middle matrix either (checked again from disk).
    loaded, loaded_plan = load_emulator_artifact(folder)
    assert loaded_plan == plan
    assert find_original_tensors(loaded.state_dict(), model, plan) == []
    batch = _ids()
    assert torch.equal(_out(loaded.eval(), batch), _out(emulator.eval(), batch))
    # Adapter artifact: plug into the original, refuse another base model.
    adapters = extract_adapters(loaded, loaded_plan)
    back, back_plan = load_adapter_artifact(save_adapter_artifact(tmp_path / "ad", adapters, loaded_plan))
    check_base_model(back_plan, model)
    other = _model("tiny-llama", seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        check_base_model(back_plan, other)
    with pytest.raises(ValueError, match="not an adapter artifact"):
        load_adapter_artifact(tmp_path / "emu")
    reference = _out(model, batch)
    plug_adapters(model, back, back_plan)
    assert torch.equal(_out(model, batch), reference)


@pytest.mark.assets
def test_smollm2_2_8_2_keep_rule_and_exact_plug_in() -> None:
    model = load_model("smollm2-135m-instruct").eval()
    plan = uniform_drop_plan(30, 2, 2, 8)
    assert plan.layer_map[2:-2] == [2, 6, 9, 13, 16, 20, 23, 27]
    emulator = build_emulator(model, plan).eval()
    assert len(get_blocks(emulator)) == 12
    batch = {
        "input_ids": torch.tensor([[504, 3458, 282, 4649, 314]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
    }
    with torch.no_grad():
        reference = model(**batch).logits
        plug_adapters(model, extract_adapters(emulator, plan), plan)
        assert torch.equal(model(**batch).logits, reference)
