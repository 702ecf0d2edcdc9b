"""Build the emulator model from a full model and an :class:`EmulatorPlan`; rebuild its shapes from a config.

:func:`build_emulator` is the one function that turns (original model, plan, harmonizers) into the model
the data owner trains on and that the Emulator ZS / Emulator FT settings evaluate. It deep-copies only what
the emulator holds (embedding, adapters, kept blocks, harmonizers, final norm, head): the owner's model is
never modified and the emulator shares no tensor with it. Kept blocks are then optionally rank-compressed
with :func:`compress_kept_blocks` (ScaleOT's SRC), which records its surgery in the plan so that
:func:`emulator_skeleton` can rebuild the same module shapes on the data owner's side from a config only.

Threat model (Offsite-Tuning, arXiv 2302.04870; ScaleOT, arXiv 2412.09812): the emulator is what the data
owner receives; it must be weak enough not to replace the original, close enough for adapter tuning.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping

import transformers
from torch import nn

from privtune.emulator.harmonizer import Harmonizer, LayerSwitch
from privtune.emulator.layer_stack import BlockLinears, block_linears, get_submodule, linear_weight, set_submodule
from privtune.emulator.low_rank import LowRankLinear, full_rank_message, rank_compress_modules
from privtune.emulator.plan import EmulatorPlan
from privtune.models import get_blocks, get_input_embeddings, set_blocks, unwrap


def model_fingerprint(model: nn.Module) -> str:
    """A short hash that identifies a base model: its type, widths and its token-embedding values.

    The embedding is shared by the original model and every emulator built from it (and is not trained in
    Offsite-Tuning), so an emulator or adapter artifact can be matched to the model it came from.
    """
    hf = unwrap(model)
    config = hf.config
    digest = hashlib.sha256()
    digest.update(f"{config.model_type}|{getattr(config, 'hidden_size', '')}|{config.vocab_size}".encode())
    digest.update(get_input_embeddings(hf).weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _original_block(block: nn.Module) -> nn.Module:
    return block.block if isinstance(block, LayerSwitch) else block


def build_emulator(
    model: nn.Module,
    plan: EmulatorPlan,
    harmonizers: Mapping[str, nn.Module] | None = None,
) -> nn.Module:
    """The emulator model of ``plan``: adapters and kept blocks copied, harmonizers in the replaced positions.

    Args:
        model: the original Hugging Face model (it may hold :class:`LayerSwitch` wrappers from stage 1).
        plan: which blocks to keep; ``plan.num_layers`` must match the model depth.
        harmonizers: ``{"<original index>": Harmonizer}``; required when the plan has harmonizer positions.

    Returns:
        A new model of the same class with ``plan.depth`` blocks, in train mode, sharing no tensor with
        ``model``. ``plan.base_fingerprint`` is filled in if empty.

    Raises:
        ValueError: if the depth does not match or a needed harmonizer is missing.
    """
    hf = unwrap(model)
    blocks = [_original_block(b) for b in get_blocks(hf)]
    if len(blocks) != plan.num_layers:
        raise ValueError(f"The plan is for {plan.num_layers} blocks but the model has {len(blocks)}.")
    needed = [str(s) for s, k in plan.middle if k == "harmonizer"]
    missing = [i for i in needed if harmonizers is None or i not in harmonizers]
    if missing:
        raise ValueError(f"`harmonizers` has no entry for the replaced blocks {missing}.")
    # Deep-copy the model without its blocks (the memo maps each block to a placeholder), then put in copies of
    # only the blocks the emulator keeps: the middle blocks that are dropped are never copied.
    memo: dict[int, object] = {id(b): nn.Identity() for b in get_blocks(hf)}
    shell = copy.deepcopy(hf, memo)
    new_blocks: list[nn.Module] = []
    for orig, kind in zip(plan.layer_map, plan.kinds):
        source = harmonizers[str(orig)] if kind == "harmonizer" else blocks[orig]  # type: ignore[index]
        new_blocks.append(copy.deepcopy(source))
    set_blocks(shell, new_blocks)
    if not plan.base_fingerprint:
        plan.base_fingerprint = model_fingerprint(hf)
    if not plan.base_model:
        plan.base_model = str(getattr(hf.config, "_name_or_path", "") or "")
    shell.train()
    return shell


def _record(plan: EmulatorPlan, key: str, module: nn.Module) -> None:
    if isinstance(module, LowRankLinear):
        spec = {"type": "low_rank", "rank": module.rank, "bias": module.bias is not None}
        spec |= {"in_features": module.in_features, "out_features": module.out_features}
    else:
        out_features, in_features = module.weight.shape
        spec = {"type": "linear", "in_features": in_features, "out_features": out_features}
        spec |= {"rank": None, "bias": getattr(module, "bias", None) is not None}
    plan.modules[key] = spec


def compress_kept_blocks(emulator: nn.Module, plan: EmulatorPlan, beta: float = 1.0, beta_mlp: float = 1.0) -> None:
    """Selective Rank Compression of the original blocks kept in the emulator (in place; plan updated).

    Args:
        emulator: the model from :func:`build_emulator`.
        plan: its plan; the surgery is recorded in ``plan.modules`` and ``plan.info``.
        beta: kept rank fraction of the attention matrices (ScaleOT's β); 1.0 leaves them untouched.
        beta_mlp: kept rank fraction of the MLP matrices. ScaleOT leaves the FFN untouched (1.0). A value
            below 1 is a privtune addition: with it no kept block ships an original weight matrix, which the
            emulator artifact requires (see :mod:`privtune.emulator.artifact`).

    Raises:
        ValueError: if ``beta`` or ``beta_mlp`` is outside ``(0, 1]``, or is below 1 but rounds to full rank for
            a matrix (a no-op that would ship the original), before any module changes.
    """
    for name, value in (("beta", beta), ("beta_mlp", beta_mlp)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"`{name}={value}` (kept rank fraction) must be in (0, 1].")
    linears = block_linears(emulator)
    blocks = get_blocks(emulator)
    kept = [pos for pos, kind in enumerate(plan.kinds) if kind == "block"]
    if kept:
        problems = [
            msg
            for option, value, shapes in _kept_shapes(blocks[kept[0]], linears, beta, beta_mlp)
            if value < 1.0 and (msg := full_rank_message(option, value, shapes))
        ]
        if problems:
            raise ValueError("compress_kept_blocks: " + "; ".join(problems) + ".")
    for pos, kind in enumerate(plan.kinds):
        if kind != "block":
            continue
        for paths, ratio in ((linears.attention, beta), ((*linears.mlp_in, linears.mlp_out), beta_mlp)):
            if ratio < 1.0:
                for path in rank_compress_modules(blocks[pos], paths, ratio):
                    _record(plan, f"{pos}.{path}", get_submodule(blocks[pos], path))
    plan.info |= {"beta": beta, "beta_mlp": beta_mlp}


def _kept_shapes(
    block: nn.Module, linears: BlockLinears, beta: float, beta_mlp: float
) -> list[tuple[str, float, dict[str, tuple[int, int]]]]:
    """``[(option, value, {path: shape})]`` for the attention (``beta``) and MLP (``beta_mlp``) linears of a block."""
    block = _original_block(block)
    groups = (("beta", beta, linears.attention), ("beta_mlp", beta_mlp, (*linears.mlp_in, linears.mlp_out)))
    out = []
    for option, value, paths in groups:
        shapes = {}
        for path in paths:
            weight, _ = linear_weight(get_submodule(block, path))
            shapes[path] = (int(weight.shape[0]), int(weight.shape[1]))
        out.append((option, value, shapes))
    return out


def compression_problems(model: nn.Module, beta: float, beta_mlp: float) -> list[str]:
    """What a SRC setting ``(beta, beta_mlp)`` would ship of ``model``'s kept blocks, in plain words (empty: none).

    ``1.0`` leaves the matrices as they are; a value below 1 whose rounded rank is the full rank
    (:func:`~privtune.emulator.low_rank.rank_from_ratio`, e.g. ``beta=0.99`` on a 32-wide model, or
    ``beta >= 0.9975`` on SmolLM2's 192-row k/v projections) does too. For a setup check before training.
    """
    hf = unwrap(model)
    linears = block_linears(hf)
    problems = []
    for option, value, shapes in _kept_shapes(get_blocks(hf)[0], linears, beta, beta_mlp):
        if value >= 1.0:
            problems.append(
                f"`{option}={value}` leaves the kept blocks' {', '.join(shapes)} matrices uncompressed, i.e. ships "
                f"the originals; allowed: {option} < 1"
            )
        elif msg := full_rank_message(option, value, shapes):
            problems.append(msg)
    return problems


def emulator_skeleton(config: transformers.PretrainedConfig, plan: EmulatorPlan, architecture: str) -> nn.Module:
    """A randomly initialised emulator with exactly the module shapes of ``plan`` (data-owner side).

    Args:
        config: the emulator's config (``plan.depth`` blocks), as saved in the emulator artifact.
        plan: the emulator plan, with its recorded module surgery.
        architecture: the transformers class name, e.g. ``LlamaForCausalLM``.
    """
    model_cls = getattr(transformers, architecture, None)
    if model_cls is None:
        raise ValueError(f"`architecture={architecture!r}` is not a transformers model class.")
    model = model_cls(config)
    blocks = list(get_blocks(model))
    if len(blocks) != plan.depth:
        raise ValueError(f"The config has {len(blocks)} blocks but the plan describes {plan.depth}.")
    for pos, kind in enumerate(plan.kinds):
        if kind == "harmonizer":
            blocks[pos] = Harmonizer(config.hidden_size, plan.harmonizer_rank)
    set_blocks(model, blocks)
    for key, spec in plan.modules.items():
        pos, _, path = key.partition(".")
        if spec["type"] == "low_rank":
            module: nn.Module = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"])
        else:
            module = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
        set_submodule(blocks[int(pos)], path, module)
    return model


def freeze_except_adapters(emulator: nn.Module, plan: EmulatorPlan) -> list[nn.Parameter]:
    """Freeze everything but the adapter blocks (Offsite-Tuning: embedding, emulator, norm, head frozen).

    Returns the trainable parameters.
    """
    unwrap(emulator).requires_grad_(False)
    blocks = get_blocks(emulator)
    params: list[nn.Parameter] = []
    for pos in plan.adapter_positions:
        blocks[pos].requires_grad_(True)
        params.extend(blocks[pos].parameters())
    return params


def count_parameters(model: nn.Module, middle_only_plan: EmulatorPlan | None = None) -> int:
    """Number of parameters (tied tensors once); with a plan, only those of the middle positions."""
    if middle_only_plan is None:
        return sum(p.numel() for p in {id(p): p for p in unwrap(model).parameters()}.values())
    blocks = get_blocks(model)
    middle = [pos for pos, kind in enumerate(middle_only_plan.kinds) if kind != "adapter"]
    return sum(p.numel() for pos in middle for p in blocks[pos].parameters())
