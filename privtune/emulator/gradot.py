"""GradOT: a gradient-preserving, training-free emulator (arXiv 2507.04455; no official code).

A good emulator keeps the gradients the adapters receive (``∇_A L(A; E*) ≈ ∇_A L(A; E)``) while raising the
emulator's own loss. For a candidate weight perturbation ``δ`` (drop one singular component of an
attention matrix, or one MLP channel) GradOT scores::

    GCS(δ) = ‖H δ‖₁ − λ ⟨g, δ⟩

``H δ`` approximates the gradient shift (K-FAC: ``H δ ≈ S_b δ S_a`` with ``S_a = mean(a aᵀ)`` over the
layer's inputs and ``S_b = mean(b bᵀ)`` over its per-token output gradients; ``‖·‖₁`` entrywise) and
``⟨g, δ⟩`` the first-order loss change. The perturbations with the **lowest** GCS are applied (dropped).
Closed forms (reconstruction, documented in docs/offsite_tuning.md):

* SVD component ``k`` of ``W = Σ σ_k u_k v_kᵀ``: ``GCS_k = σ_k ‖S_b u_k‖₁ ‖S_a v_k‖₁ + λ σ_k u_kᵀ g v_k``.
* MLP channel ``c``: sum over the input linears (row ``c`` zeroed) and the output linear (column ``c``
  zeroed) of ``‖S_b δ S_a‖₁ − λ ⟨g, δ⟩``.

Dynamic Rank Decomposition (attention) always keeps the top ``keep_top_frac`` (5 %) of singular values by
magnitude and fills ``rank_budget`` with the highest-GCS components; Selective Channel Pruning (MLP) keeps
the ``channel_budget`` fraction of channels with the highest GCS. Threat model: as Offsite-Tuning; the
calibration text is the model owner's public data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from privtune.emulator.build import _record, build_emulator
from privtune.emulator.layer_stack import as_linear, block_linears, get_submodule, linear_weight, set_submodule
from privtune.emulator.low_rank import factored_linear
from privtune.emulator.plan import EmulatorPlan, uniform_drop_plan
from privtune.models import get_blocks, unwrap


@dataclass
class KFACStats:
    """Calibration statistics of one linear layer (``nn.Linear`` layout ``W [d_out, d_in]``)."""

    s_a: Tensor  # [d_in, d_in]   mean a aᵀ over tokens
    s_b: Tensor  # [d_out, d_out] mean b bᵀ over tokens (per-token output gradients)
    grad: Tensor  # [d_out, d_in] gradient of the mean loss w.r.t. W


def kfac_statistics(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]], targets: Mapping[str, nn.Module]
) -> dict[str, KFACStats]:
    """One forward-backward pass per batch over ``model``; K-FAC factors and gradients of ``targets``.

    Args:
        model: the full causal LM (its parameters' ``requires_grad`` flags are restored afterwards).
        batches: dicts with ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding).
        targets: ``{name: linear module inside model}``.

    Per-token output gradients are the gradient of the mean loss times the number of scored tokens, so
    they are on the scale of one token's loss gradient whatever the batch size.
    """
    sums: dict[str, list] = {n: [None, None, 0] for n in targets}
    scale = {"tokens": 1.0}
    handles = []

    def forward_hook(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            a = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [N, d_in]

            def on_grad(grad: Tensor) -> None:  # grad of the mean loss w.r.t. the output, [..., d_out]
                b = grad.detach().reshape(a.shape[0], -1).double() * scale["tokens"]  # [N, d_out]
                s = sums[name]
                s[0] = a.T @ a if s[0] is None else s[0] + a.T @ a
                s[1] = b.T @ b if s[1] is None else s[1] + b.T @ b
                s[2] += a.shape[0]

            output.register_hook(on_grad)

        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for module in targets.values():
        module.weight.requires_grad_(True)
        module.weight.grad = None
    for name, module in targets.items():
        handles.append(module.register_forward_hook(forward_hook(name)))
    grads: dict[str, Tensor] = {}
    n_batches = 0
    try:
        for batch in batches:
            labels = batch["labels"]
            scale["tokens"] = float((labels[:, 1:] != -100).sum().clamp_min(1))
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            out.loss.backward()
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
    for name, module in targets.items():
        weight_grad = module.weight.grad
        if type(module).__name__ == "Conv1D":
            weight_grad = weight_grad.T
        grads[name] = weight_grad.detach().double() / max(n_batches, 1)
        module.weight.grad = None
    for p, flag in flags.items():
        p.requires_grad_(flag)
    return {name: KFACStats(s[0] / s[2], s[1] / s[2], grads[name]) for name, s in sums.items() if s[0] is not None}


def svd_gcs(weight: Tensor, stats: KFACStats, lam: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GCS of every singular component of ``weight [d_out, d_in]``: returns ``(gcs [r], U, S, Vh)``."""
    u, s, vh = (t.double() for t in torch.linalg.svd(weight.detach().float(), full_matrices=False))
    shift = s * (stats.s_b @ u).abs().sum(0) * (stats.s_a @ vh.T).abs().sum(0)  # ‖S_b δ_k S_a‖₁
    first_order = s * ((u.T @ stats.grad) * vh).sum(1)  # σ_k u_kᵀ g v_k = −⟨g, δ_k⟩
    return shift + lam * first_order, u, s, vh


def select_components(gcs: Tensor, keep: int, keep_top_frac: float = 0.05) -> Tensor:
    """Indices (sorted) of the ``keep`` components kept: top ``⌈frac·r⌉`` by σ (indices 0..), then highest GCS.

    Raises:
        ValueError: if ``keep`` is outside ``[1, r]``.
    """
    rank = gcs.numel()
    if not 1 <= keep <= rank:
        raise ValueError(f"`rank={keep}` must be in [1, {rank}].")
    top = min(keep, max(1, math.ceil(keep_top_frac * rank)))
    rest = torch.argsort(gcs[top:], descending=True, stable=True)[: keep - top] + top
    return torch.sort(torch.cat([torch.arange(top), rest])).values


def channel_gcs(ins: list[tuple[Tensor, KFACStats]], out: tuple[Tensor, KFACStats], lam: float) -> Tensor:
    """GCS ``[I]`` of zeroing each MLP channel (rows of the input linears, the column of the output linear)."""
    score = torch.zeros(())
    for weight, st in ins:  # W [I, d]: δ = −e_c w_cᵀ, ‖S_b δ S_a‖₁ = ‖S_b[:, c]‖₁ ‖S_a w_c‖₁, −⟨g, δ⟩ = g_c · w_c
        w = weight.detach().double()
        score = score + st.s_b.abs().sum(0) * (w @ st.s_a).abs().sum(1) + lam * (st.grad * w).sum(1)
    w, st = out[0].detach().double(), out[1]  # W [d, I]: δ = −w_c e_cᵀ, ‖S_b w_c‖₁ ‖S_a[:, c]‖₁
    score = score + (st.s_b @ w).abs().sum(0) * st.s_a.abs().sum(0) + lam * (st.grad * w).sum(0)
    return score


def gradot_compress(
    emulator: nn.Module,
    plan: EmulatorPlan,
    stats: Mapping[str, KFACStats],
    rank_budget: float = 0.5,
    channel_budget: float = 0.5,
    lambda_attn: float = 1.0,
    lambda_mlp: float = 1.0,
    keep_top_frac: float = 0.05,
) -> None:
    """DRD on the attention and SCP on the MLP of every kept block of ``emulator`` (in place; plan updated).

    ``stats`` keys are ``"<original index>.<module path>"`` (from :func:`kfac_statistics` on the original
    model). A budget of 1.0 leaves that part untouched.
    """
    linears = block_linears(emulator)
    blocks = get_blocks(unwrap(emulator))
    for pos, (orig, kind) in enumerate(zip(plan.layer_map, plan.kinds)):
        if kind != "block":
            continue
        block = blocks[pos]
        if rank_budget < 1.0:
            for path in linears.attention:
                weight, bias = linear_weight(get_submodule(block, path))
                gcs, u, s, vh = svd_gcs(weight, stats[f"{orig}.{path}"], lambda_attn)
                idx = select_components(gcs, max(1, round(rank_budget * s.numel())), keep_top_frac)
                new = factored_linear(u[:, idx], s[idx], vh[idx], bias, weight.dtype)
                set_submodule(block, path, new)
                _record(plan, f"{pos}.{path}", new)
        if channel_budget < 1.0:
            ins = [(linear_weight(get_submodule(block, p))[0], stats[f"{orig}.{p}"]) for p in linears.mlp_in]
            out_w = linear_weight(get_submodule(block, linears.mlp_out))[0]
            gcs = channel_gcs(ins, (out_w, stats[f"{orig}.{linears.mlp_out}"]), lambda_mlp)
            keep = torch.sort(torch.argsort(gcs, descending=True)[: max(1, round(channel_budget * gcs.numel()))]).values
            for path in linears.mlp_in:
                weight, bias = linear_weight(get_submodule(block, path))
                new = as_linear(weight[keep], None if bias is None else bias[keep])
                set_submodule(block, path, new)
                _record(plan, f"{pos}.{path}", new)
            weight, bias = linear_weight(get_submodule(block, linears.mlp_out))
            new = as_linear(weight[:, keep], bias)
            set_submodule(block, linears.mlp_out, new)
            _record(plan, f"{pos}.{linears.mlp_out}", new)
    plan.info |= {
        "rank_budget": rank_budget,
        "channel_budget": channel_budget,
        "lambda_attn": lambda_attn,
        "lambda_mlp": lambda_mlp,
        "keep_top_frac": keep_top_frac,
    }


def build_gradot_emulator(
    model: nn.Module,
    calib_batches: Iterable[Mapping[str, Tensor]],
    adapter_bottom: int = 2,
    adapter_top: int = 2,
    emulator_layers: int | None = None,
    rank_budget: float = 0.5,
    channel_budget: float = 0.5,
    lambda_attn: float = 1.0,
    lambda_mlp: float = 1.0,
    keep_top_frac: float = 0.05,
) -> tuple[nn.Module, EmulatorPlan]:
    """GradOT emulator: optional uniform drop to ``emulator_layers`` blocks, then DRD + SCP on each kept block.

    Raises:
        ValueError: on a budget outside ``(0, 1]``, ``keep_top_frac`` outside ``[0, 1]`` or a bad split,
            before any forward pass.
    """
    for name, value in (("rank_budget", rank_budget), ("channel_budget", channel_budget)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"`{name}={value}` (kept fraction) must be in (0, 1].")
    if not 0.0 <= keep_top_frac <= 1.0:
        raise ValueError(f"`keep_top_frac={keep_top_frac}` must be in [0, 1].")
    depth = len(get_blocks(unwrap(model)))
    middle = depth - adapter_bottom - adapter_top
    plan = uniform_drop_plan(depth, adapter_bottom, adapter_top, middle if emulator_layers is None else emulator_layers)
    plan.method = "gradot"
    linears = block_linears(model)
    paths = (*linears.attention, *linears.mlp_in, linears.mlp_out)
    blocks = get_blocks(unwrap(model))
    targets = {f"{i}.{p}": get_submodule(blocks[i], p) for i, _ in plan.middle for p in paths}
    was_training = model.training
    model.eval()  # no dropout in the calibration pass
    stats = kfac_statistics(model, calib_batches, targets)
    model.train(was_training)
    emulator = build_emulator(model, plan)
    gradot_compress(emulator, plan, stats, rank_budget, channel_budget, lambda_attn, lambda_mlp, keep_top_frac)
    return emulator, plan
