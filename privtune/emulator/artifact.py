"""Artifact folders exchanged by the two parties, and the check that an emulator ships no original weight.

* **Emulator artifact** (model owner -> data owner): ``emulator_plan.json``, ``config.json`` (the emulator's
  own config, ``plan.depth`` blocks), ``emulator.pt`` (its state dict) and ``meta.json``. Saving runs
  :func:`find_original_tensors` against the owner's model and refuses to write if any emulator tensor equals
  an original middle-block matrix, directly or after a permutation of its rows.
* **Adapter artifact** (data owner -> model owner): ``adapters.pt`` (``"<original index>.<param>"``) and
  ``emulator_plan.json`` (the plan the adapters were trained with, which names the base model's fingerprint).

Scope of the check: tensors with two or more dimensions (weight matrices, i.e. essentially all middle
parameters). One-dimensional tensors (norm gains, biases: ``O(d)`` numbers per block) are not checked. Threat
model (Offsite-Tuning, arXiv 2302.04870): a data owner who unpacks the emulator must not find the owner's
middle weights in it; the privacy gap measures how much of their function still leaks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from privtune.emulator.build import emulator_skeleton, model_fingerprint
from privtune.emulator.harmonizer import LayerSwitch
from privtune.emulator.plan import EmulatorPlan
from privtune.models import get_blocks, unwrap

PLAN_FILE, CONFIG_FILE, STATE_FILE, META_FILE, ADAPTER_FILE = (
    "emulator_plan.json",
    "config.json",
    "emulator.pt",
    "meta.json",
    "adapters.pt",
)


class OriginalTensorError(ValueError):
    """An emulator holds a tensor of the original middle blocks."""


def _canonical(tensor: Tensor) -> bytes:
    """Bytes of ``tensor`` with its rows in a canonical order (so a row permutation hashes the same)."""
    t = tensor.detach().float().cpu().reshape(tensor.shape[0], -1)
    probe = torch.linspace(1.0, 2.0, t.shape[1], dtype=torch.float64)
    key = t.double() @ probe  # one number per row; ties between different rows are practically impossible
    order = torch.argsort(key, stable=True)
    return hashlib.sha256(t[order].contiguous().numpy().tobytes()).digest()


def _is_constant(tensor: Tensor) -> bool:
    return bool((tensor == tensor.reshape(-1)[0]).all())


def find_original_tensors(emulator_state: Mapping[str, Tensor], original: nn.Module, plan: EmulatorPlan) -> list[str]:
    """Names of emulator tensors equal to an original middle-block matrix, or to a row permutation of one.

    Every 2-D+ tensor of the emulator (wherever it sits) is compared with every 2-D+ tensor of the original
    middle blocks ``[l, L - r)``. Constant tensors (all entries equal, e.g. a zero-initialised matrix) carry no
    information and are skipped.
    """
    # Stage-1 models hold LayerSwitch wrappers: compare with the original blocks only, not their harmonizers.
    blocks = [b.block if isinstance(b, LayerSwitch) else b for b in get_blocks(unwrap(original))]
    originals: set[tuple[tuple[int, ...], bytes]] = set()
    for idx in plan.split.middle_indices:
        for tensor in blocks[idx].state_dict().values():
            if tensor.dim() >= 2 and not _is_constant(tensor):
                originals.add((tuple(tensor.shape), _canonical(tensor)))
    shapes = {s for s, _ in originals}
    hits = []
    for name, tensor in emulator_state.items():
        if tensor.dim() < 2 or tuple(tensor.shape) not in shapes or _is_constant(tensor):
            continue
        if (tuple(tensor.shape), _canonical(tensor)) in originals:
            hits.append(name)
    return hits


def save_emulator_artifact(folder: str | Path, emulator: nn.Module, plan: EmulatorPlan, original: nn.Module) -> Path:
    """Write the emulator artifact after checking it holds no original middle matrix.

    Raises:
        OriginalTensorError: if :func:`find_original_tensors` finds any (nothing is written).
        ValueError: if ``original`` is not the model the plan was built from.
    """
    hf = unwrap(emulator)
    if plan.base_fingerprint and plan.base_fingerprint != model_fingerprint(original):
        raise ValueError("`original` is not the model this emulator was built from (fingerprints differ).")
    state = {k: v.detach().cpu() for k, v in hf.state_dict().items()}
    hits = find_original_tensors(state, original, plan)
    if hits:
        raise OriginalTensorError(
            f"The emulator holds {len(hits)} original middle-block tensor(s), e.g. {hits[:3]}; refusing to export. "
            "HINT: distil the emulator, or compress every kept block (ScaleOT `beta` < 1 and `beta_mlp` < 1, "
            "or GradOT budgets < 1)."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(folder)
    torch.save(state, folder / STATE_FILE)
    (folder / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2))
    meta = {"architecture": type(hf).__name__, "kind": "emulator"}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def read_plan(folder: str | Path) -> EmulatorPlan:
    """The plan stored in an emulator or adapter artifact folder.

    Raises:
        ValueError: if the folder holds no plan.
    """
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        raise ValueError(f"`{folder}` is not an emulator or adapter artifact folder: {PLAN_FILE} is missing.")
    return EmulatorPlan.from_dict(json.loads(path.read_text()))


def load_emulator_artifact(folder: str | Path) -> tuple[nn.Module, EmulatorPlan]:
    """Rebuild the emulator from its artifact alone (the data owner never needs the original weights)."""
    from transformers import AutoConfig

    folder = Path(folder)
    plan = read_plan(folder)
    meta = json.loads((folder / META_FILE).read_text())
    config = AutoConfig.from_pretrained(folder)
    model = emulator_skeleton(config, plan, meta["architecture"])
    model.load_state_dict(torch.load(folder / STATE_FILE, weights_only=True), strict=True)
    model.train()
    return model, plan


def check_base_model(plan: EmulatorPlan, model: nn.Module, what: str = "artifact") -> None:
    """Fail fast if ``model`` is not the base model ``plan`` was built from.

    Raises:
        ValueError: naming both models when the depth or the fingerprint differs.
    """
    depth = len(get_blocks(unwrap(model)))
    found = model_fingerprint(model)
    if depth != plan.num_layers or (plan.base_fingerprint and plan.base_fingerprint != found):
        raise ValueError(
            f"The {what} was built from base model `{plan.base_model}` ({plan.num_layers} blocks, fingerprint "
            f"{plan.base_fingerprint}) but the given model has {depth} blocks and fingerprint {found}. "
            "HINT: pass the same `model_name` that built the emulator."
        )


def save_adapter_artifact(folder: str | Path, adapters: Mapping[str, Tensor], plan: EmulatorPlan) -> Path:
    """Write the adapter artifact (adapter tensors + the plan they were trained with)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in adapters.items()}, folder / ADAPTER_FILE)
    (folder / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2))
    (folder / META_FILE).write_text(json.dumps({"kind": "adapters"}, indent=2))
    return folder


def load_adapter_artifact(folder: str | Path) -> tuple[dict[str, Tensor], EmulatorPlan]:
    """``(adapters, plan)`` from an adapter artifact folder.

    Raises:
        ValueError: if the folder is not an adapter artifact.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_FILE).is_file():
        raise ValueError(f"`{folder}` is not an adapter artifact folder: {ADAPTER_FILE} is missing.")
    return torch.load(folder / ADAPTER_FILE, weights_only=True), read_plan(folder)


def artifact_summary(folder: str | Path) -> dict[str, Any]:
    """Small description of an artifact (kind, method, layer map) for logs."""
    plan = read_plan(folder)
    return {"folder": str(folder), "method": plan.method, "layer_map": plan.layer_map, "kinds": plan.kinds}
