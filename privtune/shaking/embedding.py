"""Shake and recover a model's representation layer: input embedding rows and LM-head rows.

CypherTalk (arXiv 2403.07283) shakes the representation layer so that the cloud tunes and serves a model
whose token space it cannot read. With ``E`` ``[V, d]`` the input embedding, ``W`` ``[V, d]`` the LM head,
``pi`` the key's permutation and ``Vert`` its vertical chain (spec §2.2)::

    E_s[pi(t)] = Vert(E)[t]        i.e.  E_s = Vert(E)[pi^-1]
    W_s[pi(t)] = W[t]              (the head gets the permutation only, by default)

Horizontal shaking alone is lossless: lookup and head rows are only re-indexed, so the shaken model on
``pi(x)`` gives the plain logits permuted. A tied head is untied (``W`` cloned into its own parameter) before
a vertical chain is applied, because the head must not receive the vertical noise.

Recovery (spec §3.5) is ``horizontal`` (inverse permutation: exact and function-preserving, the vertical
perturbation stays baked in) or ``full`` (also ``Vert^-1``: exact on an untrained table; after training it
changes the function, the *recovery gap*).

Threat model: the cloud holds the shaken model and the public original model; shaking alone is an empirical
defence without a formal guarantee (see :mod:`privtune.attacks.embedding_inversion`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from privtune.models.blocks import get_lm_head, unwrap
from privtune.shaking.key import ShakeKey
from privtune.shaking.operators import get_operator

RecoveryMode = Literal["none", "horizontal", "full"]
_RECOVERY_MODES = ("none", "horizontal", "full")
#: config attribute recording the state of the representation layer ("shaken", "recovered-horizontal", ...)
STATE_ATTR = "privtune_shaking"


# ---------------------------------------------------------------------------------------------- tables
def apply_vertical(table: Tensor, key: ShakeKey) -> Tensor:
    """``Vert(E)``: the key's operator chain, step by step, computed in float64 and cast back."""
    out = table.detach().double()
    for index, step in enumerate(key.ops):
        out = get_operator(step.name).apply(out, key.op_state(index))
    return out.to(table.dtype)


def invert_vertical(table: Tensor, key: ShakeKey) -> Tensor:
    """``Vert^-1(E')``: the inverse chain ``op_1^-1 o ... o op_n^-1``."""
    out = table.detach().double()
    for index in reversed(range(len(key.ops))):
        out = get_operator(key.ops[index].name).invert(out, key.op_state(index))
    return out.to(table.dtype)


def shake_embedding(weight: Tensor, key: ShakeKey, *, vertical: bool = True) -> Tensor:
    """The shaken table ``E_s = Vert(E)[pi^-1]`` for an input embedding ``weight`` ``[V, d]``.

    Raises:
        ValueError: if the key was made for another table shape.
    """
    key.check_table(weight.shape[0], weight.shape[1])
    rows = apply_vertical(weight, key) if vertical and key.is_vertical else weight.detach()
    return rows.index_select(0, key.inv_perm.to(weight.device))


def recover_embedding(weight: Tensor, key: ShakeKey, *, vertical: bool = True) -> Tensor:
    """Inverse of :func:`shake_embedding`: ``E = Vert^-1(E_s[pi])`` (``vertical=False``: permutation only)."""
    key.check_table(weight.shape[0], weight.shape[1])
    rows = weight.detach().index_select(0, key.perm.to(weight.device))
    return invert_vertical(rows, key) if vertical and key.is_vertical else rows


def permute_rows(weight: Tensor, key: ShakeKey) -> Tensor:
    """``W_s = W[pi^-1]`` (``W_s[pi(t)] = W[t]``) for an LM head, or a bias ``[V]``."""
    return weight.detach().index_select(0, key.inv_perm.to(weight.device))


def unpermute_rows(weight: Tensor, key: ShakeKey) -> Tensor:
    """``W = W_s[pi]``."""
    return weight.detach().index_select(0, key.perm.to(weight.device))


# ---------------------------------------------------------------------------------------------- models
def find_embedding(model: nn.Module) -> nn.Embedding:
    """The input embedding of a Hugging Face model (peft-wrapped or not).

    Raises:
        ValueError: if the model has no ``nn.Embedding`` input embedding to shake.
    """
    hf = unwrap(model)
    getter = getattr(hf, "get_input_embeddings", None)
    try:
        emb = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(
            f"Cannot find the input embedding of `{type(hf).__name__}`: shaking needs a Hugging Face model whose "
            "`get_input_embeddings()` returns an `nn.Embedding` (got "
            f"{type(emb).__name__ if emb is not None else 'None'})."
        )
    return emb


def is_tied(model: nn.Module) -> bool:
    """Whether the LM head shares its weight tensor with the input embedding."""
    head = get_lm_head(model)
    return head is not None and head.weight is find_embedding(model).weight


def untie_lm_head(model: nn.Module) -> bool:
    """Give the LM head its own copy of the tied weight; returns whether anything was untied.

    ``config.tie_word_embeddings`` is set to ``False`` so that saving and reloading keep the two tables
    apart (for SmolLM2-135M this adds 49,152 x 576 = 28.3 M parameters).
    """
    if not is_tied(model):
        return False
    hf = unwrap(model)
    head = get_lm_head(model)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for config in {id(c): c for c in (hf.config, getattr(hf.config, "get_text_config", lambda: None)())}.values():
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    return True


def shaking_state(model: nn.Module) -> str:
    """``"plain"``, ``"shaken"``, ``"recovered-horizontal"`` or ``"recovered-full"`` (from the model config)."""
    return getattr(unwrap(model).config, STATE_ATTR, None) or "plain"


def _set_state(model: nn.Module, state: str) -> None:
    setattr(unwrap(model).config, STATE_ATTR, state)


@torch.no_grad()
def shake_model(model: nn.Module, key: ShakeKey, *, shake_lm_head_vertical: bool = False) -> None:
    """Shake ``model`` in place: input embedding ``E -> E_s`` and LM-head rows ``W -> W_s`` (spec §2.2).

    The parameters keep their identity (values are copied in), so optimizers built before stay valid. A tied
    head is untied first when the key has a vertical chain; a horizontal-only key keeps the tie (permuting
    the shared table permutes both). Sequence-classification models have no LM head: only ``E`` is shaken.

    Args:
        model: a Hugging Face model (optionally inside a peft wrapper).
        key: the shaking key (its vocabulary size must equal the embedding's row count).
        shake_lm_head_vertical: also apply the vertical chain to the head rows (default ``False``).

    Raises:
        ValueError: if the embedding cannot be found, the key does not fit it, or the model is already shaken.
    """
    emb = find_embedding(model)
    key.check_table(emb.weight.shape[0], emb.weight.shape[1])
    if shaking_state(model) == "shaken":
        raise ValueError("The model is already shaken; shaking twice would compose two keys.")
    head = get_lm_head(model)
    if head is not None and head.weight.shape[0] != key.vocab_size:
        raise ValueError(f"The LM head has {head.weight.shape[0]} rows but the key has {key.vocab_size} ids.")
    if key.is_vertical:
        untie_lm_head(model)
    tied = is_tied(model)
    emb.weight.copy_(shake_embedding(emb.weight, key))
    if head is not None and not tied:
        rows = apply_vertical(head.weight, key) if shake_lm_head_vertical and key.is_vertical else head.weight
        head.weight.copy_(permute_rows(rows, key))
        if getattr(head, "bias", None) is not None:
            head.bias.copy_(permute_rows(head.bias, key))
    _set_state(model, "shaken")
    setattr(unwrap(model).config, STATE_ATTR + "_head_vertical", bool(shake_lm_head_vertical and key.is_vertical))


@torch.no_grad()
def recover_model(model: nn.Module, key: ShakeKey, mode: RecoveryMode = "horizontal") -> None:
    """Undo shaking in place (spec §3.5): ``horizontal`` un-permutes rows, ``full`` also inverts ``Vert``.

    ``horizontal`` is exact and function-preserving: the recovered model on plain ids gives the logits of
    the shaken model on ``pi``-ids. ``full`` restores the original table of an untrained model; after
    training the blocks are adapted to ``Vert(E)`` and ``full`` changes the function (the recovery gap).

    Raises:
        ValueError: for an unknown ``mode``, a model that is not shaken, or a key that does not fit.
    """
    if mode not in _RECOVERY_MODES:
        raise ValueError(f"`mode={mode!r}` is not a recovery mode; allowed: {', '.join(_RECOVERY_MODES)}.")
    if mode == "none":
        return
    if shaking_state(model) != "shaken":
        raise ValueError(f"Only a shaken model can be recovered; this one is {shaking_state(model)!r}.")
    emb = find_embedding(model)
    key.check_table(emb.weight.shape[0], emb.weight.shape[1])
    head = get_lm_head(model)
    tied = is_tied(model)
    vertical = mode == "full"
    emb.weight.copy_(recover_embedding(emb.weight, key, vertical=vertical))
    if head is not None and not tied:
        rows = unpermute_rows(head.weight, key)
        if vertical and getattr(unwrap(model).config, STATE_ATTR + "_head_vertical", False):
            rows = invert_vertical(rows, key)
        head.weight.copy_(rows)
        if getattr(head, "bias", None) is not None:
            head.bias.copy_(unpermute_rows(head.bias, key))
    _set_state(model, f"recovered-{mode}")


def shaken_parameter_names(model: nn.Module, root: nn.Module | None = None) -> dict[str, list[str]]:
    """Every name (tied aliases included) of the embedding, head and head-bias parameters in ``root``.

    Args:
        model: the Hugging Face model that was shaken.
        root: the module whose ``state_dict`` is rewritten (e.g. a LightningModule); defaults to ``model``.

    Used by checkpoint policies that rewrite a saved state dict without touching the live model.
    """
    root = model if root is None else root
    aliases: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    out = {"embedding": aliases.get(id(find_embedding(model).weight), [])}
    head = get_lm_head(model)
    if head is not None and not is_tied(model):
        out["head"] = aliases.get(id(head.weight), [])
        if getattr(head, "bias", None) is not None:
            out["head_bias"] = aliases.get(id(head.bias), [])
    return out
