"""Shake and recover a model's representation layer: input embedding rows and LM-head rows.

CypherTalk (arXiv 2403.07283) shakes the representation layer so that the cloud tunes and serves a model
whose token space it cannot read. With ``E`` ``[V, d]`` the input embedding, ``W`` ``[V, d]`` the LM head,
``pi`` the key's permutation and ``Vert`` its vertical chain (spec §2.2)::

    E_s[pi(t)] = Vert(E)[t]        i.e.  E_s = Vert(E)[pi^-1]
    W_s[pi(t)] = Vert'(W)[t]       (default; Vert' = Vert for a tied head, an independent draw otherwise)

Horizontal shaking alone is lossless: lookup and head rows are only re-indexed, so the shaken model on
``pi(x)`` gives the plain logits permuted.

**The head is shaken vertically by default** (decision; the spec's default was the permutation only). The
cloud holds the head too, and a head that is only permuted is the public table re-indexed: nearest-neighbour
matching of its rows against the public ``W`` (for a tied model, ``E`` itself) recovers ``pi`` completely,
whatever noise the input table carries (measured: A1 top-1 100 % on SmolLM2, docs/shaking.md). So:

* tied model: ``E`` and ``W`` stay one table, shaken once, so the head carries exactly the embedding's noise
  (no untying, no extra parameters);
* untied model: the head gets an independent draw of the chain (the key's ``head`` stream). The same draw
  would cancel in ``E_s - W_s = (E - W)[pi^-1]``, which the public ``E - W`` matches.

``shake_lm_head_vertical=False`` keeps the head permuted only (untying a tied head first): the model keeps its
plain output rows, and the key then hides nothing from an attacker who reads the head.

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
from privtune.shaking.key import ShakeKey, Stream
from privtune.shaking.operators import get_operator

RecoveryMode = Literal["none", "horizontal", "full"]
_RECOVERY_MODES = ("none", "horizontal", "full")
#: config attribute recording the state of the representation layer ("shaken", "recovered-horizontal", ...)
STATE_ATTR = "privtune_shaking"


# ---------------------------------------------------------------------------------------------- tables
def apply_vertical(table: Tensor, key: ShakeKey, stream: Stream = "embedding") -> Tensor:
    """``Vert(E)``: the key's operator chain, step by step, computed in float64 and cast back.

    ``stream`` selects the key tensors: the embedding's, or the independent draw for an untied head.
    """
    out = table.detach().double()
    for index, step in enumerate(key.ops):
        out = get_operator(step.name).apply(out, key.op_state(index, stream))
    return out.to(table.dtype)


def invert_vertical(table: Tensor, key: ShakeKey, stream: Stream = "embedding") -> Tensor:
    """``Vert^-1(E')``: the inverse chain ``op_1^-1 o ... o op_n^-1`` (of the same ``stream``)."""
    out = table.detach().double()
    for index in reversed(range(len(key.ops))):
        out = get_operator(key.ops[index].name).invert(out, key.op_state(index, stream))
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


def shake_head(weight: Tensor, key: ShakeKey, *, vertical: bool) -> Tensor:
    """The shaken rows of an untied LM head ``[V, d]``: ``Vert'(W)[pi^-1]`` (``vertical``) or ``W[pi^-1]``.

    ``Vert'`` is the key's chain drawn from its ``head`` stream, independent of the embedding's. Its scales are
    relative to the input table's statistics (``s_E``, ``n_E``, the ones the key stores); for a head of a very
    different scale, the attack on the head (:func:`~privtune.attacks.model_attack_report`) says what it hides.
    """
    rows = apply_vertical(weight, key, stream="head") if vertical and key.is_vertical else weight.detach()
    return permute_rows(rows, key)


def recover_head(weight: Tensor, key: ShakeKey, *, vertical: bool) -> Tensor:
    """Inverse of :func:`shake_head`: ``Vert'^-1(W_s[pi])`` (``vertical=False``: permutation only)."""
    rows = unpermute_rows(weight, key)
    return invert_vertical(rows, key, stream="head") if vertical and key.is_vertical else rows


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


def shaking_fingerprint(model: nn.Module) -> str | None:
    """The fingerprint of the key that shook ``model`` (recorded by :func:`shake_model`; ``None`` if unknown)."""
    return getattr(unwrap(model).config, STATE_ATTR + "_key", None)


def head_is_vertical(model: nn.Module) -> bool:
    """Whether the shaken model's LM head carries the vertical chain (recorded by :func:`shake_model`)."""
    return bool(getattr(unwrap(model).config, STATE_ATTR + "_head_vertical", False))


@torch.no_grad()
def shake_model(model: nn.Module, key: ShakeKey, *, shake_lm_head_vertical: bool = True) -> None:
    """Shake ``model`` in place: input embedding ``E -> E_s`` and LM-head rows ``W -> W_s`` (spec §2.2).

    The parameters keep their identity (values are copied in), so optimizers built before stay valid. With a
    vertical chain and ``shake_lm_head_vertical`` (default), a tied head stays tied and shares the shaken
    rows, and an untied head gets its own draw of the chain; with ``shake_lm_head_vertical=False`` a tied
    head is untied first and only permuted (see the module docstring: that head reveals ``pi``).
    Sequence-classification models have no LM head: only ``E`` is shaken.

    Args:
        model: a Hugging Face model (optionally inside a peft wrapper).
        key: the shaking key (its vocabulary size must equal the embedding's row count).
        shake_lm_head_vertical: apply the vertical chain to the head rows too (default ``True``).

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
    head_vertical = head is not None and shake_lm_head_vertical and key.is_vertical
    if key.is_vertical and not head_vertical:
        untie_lm_head(model)  # the head keeps the plain rows, so it needs its own tensor
    emb.weight.copy_(shake_embedding(emb.weight, key))  # a tied head is this very table
    if head is not None and not is_tied(model):
        head.weight.copy_(shake_head(head.weight, key, vertical=head_vertical))
        if getattr(head, "bias", None) is not None:
            head.bias.copy_(permute_rows(head.bias, key))
    _set_state(model, "shaken")
    setattr(unwrap(model).config, STATE_ATTR + "_head_vertical", head_vertical)
    setattr(unwrap(model).config, STATE_ATTR + "_key", key.fingerprint())


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
    vertical = mode == "full"
    emb.weight.copy_(recover_embedding(emb.weight, key, vertical=vertical))
    if head is not None and not is_tied(model):
        head.weight.copy_(recover_head(head.weight, key, vertical=vertical and head_is_vertical(model)))
        if getattr(head, "bias", None) is not None:
            head.bias.copy_(unpermute_rows(head.bias, key))
    _set_state(model, f"recovered-{mode}")


@torch.no_grad()
def restore_plain(model: nn.Module, key: ShakeKey) -> None:
    """Undo shaking of a model whose shaken tables were **not trained**: back to the original model.

    Full recovery (``Vert^-1`` and ``pi^-1``) of untrained tables gives the original rows up to float rounding
    (the chain runs in float64), so the model is marked ``plain`` again and can be shaken anew. Used when a
    run fails part-way, so that the caller's model is not left shaken.

    Raises:
        ValueError: if the model is not shaken or the key does not fit.
    """
    recover_model(model, key, "full")
    config = unwrap(model).config
    for suffix in ("", "_head_vertical", "_key"):
        if hasattr(config, STATE_ATTR + suffix):
            delattr(config, STATE_ATTR + suffix)


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
