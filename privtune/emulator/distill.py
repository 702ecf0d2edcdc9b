"""Emulator distillation with Offsite-Tuning's normalised KD loss (arXiv 2302.04870, official code).

Teacher and student receive the same ``h_in`` (output of the frozen, pretrained bottom adapter); the
teacher is the original middle, the student the emulator middle; only the emulator middle is trained::

    L = λ_lm · CE(next token | Emb -> A_bottom -> E* -> A_top -> H) + λ_kd · mean(((h_T - h_S) / rms(h_T))²)

with ``h_T = E(h_in)``, ``h_S = E*(h_in)`` read at the input of the first top-adapter block, and
``rms(h_T) = sqrt(mean(h_T²))`` one scalar over the whole batch tensor. Defaults λ_lm = 1, λ_kd = 30.
Threat model: distillation runs at the model owner on public text; the data owner only gets the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from itertools import cycle, islice
from typing import Literal

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
) -> tuple[float, float]:
    """Distil ``emulator``'s middle towards ``teacher`` for ``steps`` AdamW steps, cycling ``batches``.

    The OT objective of :func:`distillation_loss`, as a plain loop, so that any emulator (uniform drop, ScaleOT,
    GradOT) can be distilled after it is built. Only the middle positions train (:func:`middle_parameters`);
    the adapters and the teacher stay frozen, and the emulator is left in eval mode with no gradients enabled.

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
            progress).

    Returns:
        ``(kd first, kd last)``: the normalised KD term on the first and the last step.

    Raises:
        ValueError: for ``steps <= 0`` or ``lr <= 0``, or when ``batches`` is empty.
    """
    if steps <= 0 or lr <= 0:
        raise ValueError(f"distill_emulator: `steps={steps}` and `lr={lr}` must both be > 0.")
    params = middle_parameters(emulator, plan)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    teacher_mode = teacher.training
    teacher.eval()  # the teacher's dropout off: h_T is the function the emulator must imitate
    emulator.train()
    kd: list[float] = []
    with torch.enable_grad():
        for step, batch in enumerate(islice(cycle(list(batches)), steps), start=1):
            out = distillation_loss(
                teacher, emulator, plan, batch["input_ids"], batch["attention_mask"], batch["labels"],
                lm_weight, kd_weight, kd_norm,
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            kd.append(float(out["kd"]))
            if on_step is not None:
                on_step(step, {name: float(value.detach()) for name, value in out.items()})
    if not kd:
        raise ValueError("distill_emulator got no batch.")
    emulator.requires_grad_(False)
    emulator.eval()
    teacher.train(teacher_mode)
    return kd[0], kd[-1]
