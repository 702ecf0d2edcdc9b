"""Artifact folders exchanged by the two parties, and the check that an emulator ships no original weight.

* **Emulator artifact** (model owner -> data owner): ``emulator_plan.json``, ``config.json`` (the emulator's
  own config, ``plan.depth`` blocks), ``emulator.pt`` (its state dict) and ``meta.json``. Saving runs the
  leak check by closeness (:mod:`privtune.emulator.leak_check`) against the owner's model and refuses to
  write if any emulator matrix is within a relative error of ``1e-2`` of an original middle-block matrix,
  after the best scale and sign and after row or column matching, in its layout or transposed.
  The model owner's record of the check (per kept matrix its relative error and cosine to the original) goes to
  ``<folder>.leak_check.json`` beside the folder, not into it: the data owner receives the folder, and the
  errors would tell it the norms of the original matrices.
* **Adapter artifact** (data owner -> model owner): ``adapters.pt`` (``"<original index>.<param>"``) and
  ``emulator_plan.json`` (the plan the adapters were trained with, which names the base model's fingerprint).

Scope of the check: tensors with two or more dimensions (weight matrices, i.e. essentially all middle
parameters). One-dimensional tensors (norm gains, biases: ``O(d)`` numbers per block) are not checked. Threat
model (Offsite-Tuning, arXiv 2302.04870): a data owner who unpacks the emulator must not find the owner's
middle weights in it; the privacy gap measures how much of their function still leaks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from privtune.emulator.build import emulator_skeleton, model_fingerprint
from privtune.emulator.leak_check import (
    DEFAULT_MIN_REL_ERROR,
    check_no_original,
    emulator_matrices,
    kept_matrix_closeness,
    nearest_originals,
    original_middle_matrices,
)
from privtune.emulator.leak_check import (
    OriginalTensorError as OriginalTensorError,  # re-exported: raised by save_emulator_artifact
)
from privtune.emulator.plan import EmulatorPlan
from privtune.models import get_blocks, unwrap

PLAN_FILE, CONFIG_FILE, STATE_FILE, META_FILE, ADAPTER_FILE = (
    "emulator_plan.json",
    "config.json",
    "emulator.pt",
    "meta.json",
    "adapters.pt",
)


def find_original_tensors(
    emulator_state: Mapping[str, Tensor],
    original: nn.Module,
    plan: EmulatorPlan,
    min_rel_error: float = DEFAULT_MIN_REL_ERROR,
) -> list[str]:
    """Names of emulator tensors within ``min_rel_error`` of an original middle-block matrix.

    Closeness, not bytes (:mod:`privtune.emulator.leak_check`): every 2-D+ tensor of the emulator (and the
    product of each factored pair) is compared with every 2-D+ tensor of the original middle blocks
    ``[l, L - r)`` of the same or the transposed shape, after the best scale and sign and after row or column
    matching. Constant tensors carry no information and are skipped.
    """
    originals = original_middle_matrices(original, plan)
    shapes = {tuple(w.shape) for w in originals.values()} | {tuple(w.shape[::-1]) for w in originals.values()}
    near = nearest_originals(emulator_matrices(emulator_state, shapes), originals)
    return [name for name, c in near.items() if c.rel_error < min_rel_error]


def save_emulator_artifact(
    folder: str | Path,
    emulator: nn.Module,
    plan: EmulatorPlan,
    original: nn.Module,
    min_rel_error: float = DEFAULT_MIN_REL_ERROR,
) -> Path:
    """Write the emulator artifact after the leak check; record beside it how close each kept matrix is.

    Nothing is written unless every emulator matrix is at least ``min_rel_error`` (relative Frobenius error,
    best alignment) away from every original middle matrix. The owner's record, :func:`leak_check_path`
    (beside the folder, never shipped), then holds per kept matrix its relative error and cosine to the original
    it came from, and the smallest error the check found (see :func:`artifact_summary`).

    Raises:
        OriginalTensorError: naming the emulator tensor, the original it matches and the error (nothing written).
        ValueError: if ``original`` is not the model the plan was built from.
    """
    hf = unwrap(emulator)
    if plan.base_fingerprint and plan.base_fingerprint != model_fingerprint(original):
        raise ValueError("`original` is not the model this emulator was built from (fingerprints differ).")
    state = {k: v.detach().cpu() for k, v in hf.state_dict().items()}
    near = check_no_original(state, original, plan, min_rel_error)
    nearest = min(near.values(), key=lambda c: c.rel_error, default=None)
    closeness = {
        "min_rel_error": min_rel_error,
        "nearest": None if nearest is None else nearest.to_dict(),
        "kept_matrices": kept_matrix_closeness(hf, original, plan),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(folder)
    torch.save(state, folder / STATE_FILE)
    (folder / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2))
    meta = {"architecture": type(hf).__name__, "kind": "emulator"}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    leak_check_path(folder).write_text(json.dumps(closeness, indent=2))
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


def leak_check_path(folder: str | Path) -> Path:
    """The model owner's leak-check record of an emulator artifact: ``<folder>.leak_check.json``, beside the folder.

    Kept outside the folder the data owner receives (relative errors would reveal the originals' norms).
    """
    folder = Path(folder)
    return folder.with_name(folder.name + ".leak_check.json")


def artifact_summary(folder: str | Path) -> dict[str, Any]:
    """Small description of an artifact for logs and reports.

    Kind, method, layer map and, for an emulator artifact the owner wrote (its :func:`leak_check_path` record is
    present), ``closeness``: per kept matrix its relative error and cosine to the original it came from
    (``kept_matrices``), their ranges, and the nearest original any emulator matrix came to in the leak check
    (``nearest``), so the owner sees how much is shared.
    """
    folder = Path(folder)
    plan = read_plan(folder)
    out: dict[str, Any] = {"folder": str(folder), "method": plan.method, "layer_map": plan.layer_map}
    out["kinds"] = plan.kinds
    record = leak_check_path(folder)
    closeness = json.loads(record.read_text()) if record.is_file() else None
    if closeness is not None:
        kept = closeness.get("kept_matrices", {})
        errors = [m["rel_error"] for m in kept.values()]
        cosines = [m["cosine"] for m in kept.values()]
        out["closeness"] = {
            **closeness,
            "kept_rel_error_range": [min(errors), max(errors)] if errors else None,
            "kept_cosine_range": [min(cosines), max(cosines)] if cosines else None,
        }
    return out
