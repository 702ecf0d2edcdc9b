"""Emulator distillation with Offsite-Tuning's normalised KD loss (arXiv 2302.04870, official code).

Teacher and student receive the same ``h_in`` (output of the frozen, pretrained bottom adapter); the
teacher is the original middle, the student the emulator middle; only the emulator middle is trained::

    L = λ_lm · CE(next token | Emb -> A_bottom -> E* -> A_top -> H) + λ_kd · mean(((h_T - h_S) / rms(h_T))²)

with ``h_T = E(h_in)``, ``h_S = E*(h_in)`` read at the input of the first top-adapter block, and
``rms(h_T) = sqrt(mean(h_T²))`` one scalar over the whole batch tensor. Defaults λ_lm = 1, λ_kd = 30.
Threat model: distillation runs at the model owner on public text; the data owner only gets the result.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import cycle, islice
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from privtune.emulator.plan import EmulatorPlan
from privtune.models import base_model, get_blocks, unwrap

KDNorm = Literal["global", "per_dim", "global+per_dim"]


def normalized_kd_loss(
    h_teacher: Tensor, h_student: Tensor, mask: Tensor | None = None, norm: KDNorm = "global"
) -> Tensor:
    """``mean(((h_T − h_S) / rms(h_T))²)``; exactly 0 when the student equals the teacher.

    ``norm="global"`` is Offsite-Tuning's loss: one ``rms`` over the whole tensor. ``norm="per_dim"`` divides each
    hidden dimension by its own ``rms_d`` over the tokens (privtune's option). Decision and why: in small decoders
    a few "massive activation" dimensions carry nearly all the energy of the residual stream (on SmolLM2-135M, 5 of
    576 dimensions hold 98 % of it at the top-adapter input), so the global loss can reach 0.02 while the other
    dimensions stay unmatched: the per-dimension loss of that emulator was 1.05, and a zero output scores 1.0.
    The per-dimension loss weighs every dimension equally, and so all but ignores the massive ones (which the
    global loss matches); ``norm="global+per_dim"`` is the sum of the two.

    Args:
        h_teacher: ``[B, T, d]``.
        h_student: ``[B, T, d]``.
        mask: optional ``[B, T]`` attention mask; padded positions are left out of both means.
        norm: ``global``, ``per_dim`` or ``global+per_dim``.
    """
    if norm == "global+per_dim":
        return normalized_kd_loss(h_teacher, h_student, mask, "global") + normalized_kd_loss(
            h_teacher, h_student, mask, "per_dim"
        )
    if mask is not None:
        keep = mask.bool()
        h_teacher, h_student = h_teacher[keep], h_student[keep]  # [N, d]
    if norm == "global":
        rms = h_teacher.detach().pow(2).mean().sqrt().clamp_min(1e-8)
    elif norm == "per_dim":
        flat = h_teacher.detach().reshape(-1, h_teacher.shape[-1])  # [N, d]
        rms = flat.pow(2).mean(0).sqrt().clamp_min(1e-8)  # [d]
    else:
        raise ValueError(f"`norm={norm!r}` must be 'global', 'per_dim' or 'global+per_dim'.")
    return ((h_teacher - h_student) / rms).pow(2).mean()


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed hidden state is captured."""


@contextmanager
def capture_block_input(model: nn.Module, position: int, stop: bool = False) -> Iterator[dict[str, Tensor]]:
    """Record the hidden states entering block ``position`` as ``captured["h"]`` ``[B, T, d]``.

    With ``stop=True`` the forward pass is cut right there (the caller catches nothing: use
    :func:`run_until_block`).
    """
    captured: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        if stop:
            raise _Stop

    handle = get_blocks(unwrap(model))[position].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def run_until_block(model: nn.Module, position: int, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Hidden states ``[B, T, d]`` entering block ``position``, without running the blocks after it or the head."""
    with capture_block_input(model, position, stop=True) as captured, suppress(_Stop):
        base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return captured["h"]


def distillation_loss(
    teacher: nn.Module,
    emulator: nn.Module,
    plan: EmulatorPlan,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    lm_weight: float = 1.0,
    kd_weight: float = 30.0,
    kd_norm: KDNorm = "global",
) -> dict[str, Tensor]:
    """One batch of the OT distillation objective.

    Args:
        teacher: the original full model (frozen; run without gradients up to its top adapter).
        emulator: the student, built by :func:`~privtune.emulator.build.build_emulator` from ``teacher``.
        plan: the emulator's plan (gives the first top-adapter position in both models).
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.
        labels: ``[B, T]`` with -100 on padding.
        lm_weight: ``λ_lm``.
        kd_weight: ``λ_kd``.
        kd_norm: see :func:`normalized_kd_loss`.

    Returns:
        ``{"loss", "lm", "kd"}`` scalars; ``loss`` carries the gradient.
    """
    with torch.no_grad():
        h_teacher = run_until_block(teacher, plan.num_layers - plan.adapter_top, input_ids, attention_mask)
    student_pos = plan.depth - plan.adapter_top
    with capture_block_input(emulator, student_pos) as captured:
        out = emulator(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
    kd = normalized_kd_loss(h_teacher, captured["h"], attention_mask, kd_norm)
    return {"loss": lm_weight * out.loss + kd_weight * kd, "lm": out.loss.detach(), "kd": kd.detach()}


def middle_parameters(emulator: nn.Module, plan: EmulatorPlan) -> list[nn.Parameter]:
    """Freeze everything but the emulator's middle positions and return their parameters (OT §2.3)."""
    unwrap(emulator).requires_grad_(False)
    blocks = get_blocks(unwrap(emulator))
    params: list[nn.Parameter] = []
    for pos, kind in enumerate(plan.kinds):
        if kind != "adapter":
            blocks[pos].requires_grad_(True)
            params.extend(blocks[pos].parameters())
    return params


@dataclass(frozen=True)
class DistillCheckpoint:
    """Where :func:`distill_emulator` saves its state every ``every`` steps, and resumes from when the file exists.

    The file holds the middle's trainable tensors, the AdamW state, the CPU random state, the step reached, the
    per-step history and the loop's seconds so far, plus a key of the run (steps, learning rate, loss weights,
    the plan's layer kinds and a digest of the batches): a file written for another distillation is refused, not
    resumed. It is written atomically (a temporary file renamed over it) and read with ``weights_only=True``.
    """

    path: Path
    every: int = 50

    def __post_init__(self) -> None:
        if self.every <= 0:
            raise ValueError(f"DistillCheckpoint: `every={self.every}` must be > 0.")


@dataclass
class DistillProgress:
    """What a resumed distillation restored: the step reached, ``{"loss", "lm", "kd"}`` per step so far, and the
    loop's seconds over the earlier runs."""

    step: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "lm": [], "kd": []})
    seconds: float = 0.0


def _run_key(plan: EmulatorPlan, batches: list[Mapping[str, Tensor]], **settings: Any) -> dict[str, Any]:
    """What a distillation checkpoint must match to be resumed: the settings, the layer kinds, the batches."""
    digest = hashlib.sha256()
    for batch in batches:
        for name in ("input_ids", "attention_mask", "labels"):
            digest.update(batch[name].detach().cpu().contiguous().numpy().tobytes())
    return {**settings, "kinds": list(plan.kinds), "batches": f"{len(batches)}:{digest.hexdigest()[:16]}"}


def _load_checkpoint(
    checkpoint: DistillCheckpoint, key: Mapping[str, Any], params: Mapping[str, nn.Parameter], optimizer: Any
) -> DistillProgress:
    """Restore ``params`` and ``optimizer`` from ``checkpoint`` (a fresh :class:`DistillProgress` without a file).

    Raises:
        ValueError: if the file was written for another distillation, naming the difference and the fix.
    """
    if not checkpoint.path.is_file():
        return DistillProgress()
    state = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
    if state.get("key") != dict(key):
        differ = sorted(k for k in set(key) | set(state.get("key", {})) if state.get("key", {}).get(k) != key.get(k))
        raise ValueError(
            f"distill_emulator: {checkpoint.path} holds another distillation's state (it differs in {differ}). "
            "HINT: resume with the same emulator, batches and settings, or delete the file to start afresh."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state["middle"][name])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return DistillProgress(int(state["step"]), {k: list(v) for k, v in state["history"].items()}, state["seconds"])


def _save_checkpoint(
    checkpoint: DistillCheckpoint,
    key: Mapping[str, Any],
    params: Mapping[str, nn.Parameter],
    optimizer: Any,
    progress: DistillProgress,
) -> None:
    """Write the state atomically: a run killed while writing keeps the previous checkpoint."""
    state = {
        "key": dict(key),
        "step": progress.step,
        "middle": {name: param.detach().cpu().clone() for name, param in params.items()},
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "history": progress.history,
        "seconds": progress.seconds,
    }
    checkpoint.path.parent.mkdir(parents=True, exist_ok=True)
    partial = checkpoint.path.with_name(checkpoint.path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, checkpoint.path)


def distill_emulator(
    teacher: nn.Module,
    emulator: nn.Module,
    plan: EmulatorPlan,
    batches: Iterable[Mapping[str, Tensor]],
    steps: int,
    lr: float = 1e-4,
    lm_weight: float = 1.0,
    kd_weight: float = 30.0,
    kd_norm: KDNorm = "global",
    on_step: Callable[[int, Mapping[str, float]], None] | None = None,
    checkpoint: DistillCheckpoint | None = None,
    on_resume: Callable[[DistillProgress], None] | None = None,
) -> tuple[float, float]:
    """Distil ``emulator``'s middle towards ``teacher`` for ``steps`` AdamW steps, cycling ``batches``.

    The OT objective of :func:`distillation_loss`, as a plain loop, so that any emulator (uniform drop, ScaleOT,
    GradOT) can be distilled after it is built. Only the middle positions train (:func:`middle_parameters`);
    the adapters and the teacher stay frozen, and the emulator is left in eval mode with no gradients enabled.
    With ``checkpoint`` the loop saves its state every ``checkpoint.every`` steps and after the last, and a run
    that finds the file continues after the step it holds: the batches cycle in a fixed order and the random state
    is restored, so a resumed run ends with the weights an uninterrupted one would have (one process's CPU
    random state; a CUDA run's dropout, if the model has any, is not restored).

    Args:
        teacher: the original model (frozen; stage-1 switches, if installed, must keep every block).
        emulator: the student, on the teacher's device.
        plan: the emulator's plan.
        batches: LM batches (``input_ids``, ``attention_mask``, ``labels``) on that device; cycled.
        steps: optimiser steps (> 0).
        lr: AdamW learning rate.
        lm_weight: ``λ_lm``.
        kd_weight: ``λ_kd``.
        kd_norm: see :func:`normalized_kd_loss`.
        on_step: called after each step with its number (from 1) and ``{"loss", "lm", "kd"}`` (for curves and
            progress); a resumed run calls it for its own steps only.
        checkpoint: where to save and resume the loop's state (:class:`DistillCheckpoint`); ``None`` saves nothing.
        on_resume: called once, before the first step, with what a resumed run restored (:class:`DistillProgress`).

    Returns:
        ``(kd first, kd last)``: the normalised KD term on the first and the last step (over every run).

    Raises:
        ValueError: for ``steps <= 0`` or ``lr <= 0``, when ``batches`` is empty, or for a checkpoint written by
            another distillation.
    """
    if steps <= 0 or lr <= 0:
        raise ValueError(f"distill_emulator: `steps={steps}` and `lr={lr}` must both be > 0.")
    batches = list(batches)
    if not batches:
        raise ValueError("distill_emulator got no batch.")
    params = middle_parameters(emulator, plan)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    named = {name: p for name, p in emulator.named_parameters() if p.requires_grad}
    key = _run_key(plan, batches, steps=steps, lr=lr, lm_weight=lm_weight, kd_weight=kd_weight, kd_norm=kd_norm)
    done = _load_checkpoint(checkpoint, key, named, optimizer) if checkpoint is not None else DistillProgress()
    if done.step and on_resume is not None:
        on_resume(done)
    teacher_mode = teacher.training
    teacher.eval()  # the teacher's dropout off: h_T is the function the emulator must imitate
    emulator.train()
    start = time.perf_counter()
    with torch.enable_grad():
        for step, batch in enumerate(islice(cycle(batches), done.step, steps), start=done.step + 1):
            out = distillation_loss(
                teacher, emulator, plan, batch["input_ids"], batch["attention_mask"], batch["labels"],
                lm_weight, kd_weight, kd_norm,
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            values = {name: float(value.detach()) for name, value in out.items()}
            for name in ("loss", "lm", "kd"):
                done.history[name].append(values[name])
            if on_step is not None:
                on_step(step, values)
            if checkpoint is not None and (step % checkpoint.every == 0 or step == steps):
                saved = DistillProgress(step, done.history, done.seconds + time.perf_counter() - start)
                _save_checkpoint(checkpoint, key, named, optimizer, saved)
    emulator.requires_grad_(False)
    emulator.eval()
    teacher.train(teacher_mode)
    return done.history["kd"][0], done.history["kd"][-1]
