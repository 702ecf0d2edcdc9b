"""Architecture-neutral access to a Hugging Face model's transformer blocks, final norm, embeddings and head.

The emulator (layer drop, harmonizers), the deep prompts and the shaking operators all reach into a model
the same way: through this one small table per architecture family. Paths are relative to the model's
``base_model`` (``LlamaModel`` inside ``LlamaForCausalLM``, ``BertModel`` inside a classification model),
so every task head of a family shares one row.

=========  ==========================================  ============================  ==========================
family     transformer blocks                          final norm                    model types
=========  ==========================================  ============================  ==========================
llama      ``layers``                                  ``norm``                      llama, mistral, qwen2, qwen3
gpt2       ``h``                                       ``ln_f``                      gpt2
bert       ``encoder.layer``                           (none: post-norm blocks)      bert, roberta
opt        ``decoder.layers``                          ``decoder.final_layer_norm``  opt
=========  ==========================================  ============================  ==========================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FamilyLayout:
    """Where one architecture family keeps its parts, relative to ``model.base_model``."""

    blocks: str
    final_norm: str | None
    is_decoder: bool
    #: config attribute that counts the blocks
    depth_attr: str
    #: attribute path from a block to the module that carries ``layer_idx`` (for the KV cache), if any
    attention: str | None


_LAYOUTS: dict[str, FamilyLayout] = {
    "llama": FamilyLayout("layers", "norm", True, "num_hidden_layers", "self_attn"),
    "gpt2": FamilyLayout("h", "ln_f", True, "n_layer", "attn"),
    "bert": FamilyLayout("encoder.layer", None, False, "num_hidden_layers", None),
    "opt": FamilyLayout("decoder.layers", "decoder.final_layer_norm", True, "num_hidden_layers", "self_attn"),
}

_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt2": "gpt2",
    "bert": "bert",
    "roberta": "bert",
    "opt": "opt",
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_MODEL_TYPES))


class UnsupportedModelError(ValueError):
    """The model's architecture has no row in the block-access table."""


def unwrap(model: nn.Module) -> nn.Module:
    """Return the Hugging Face ``PreTrainedModel`` inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base()
    return model


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def family(model: nn.Module) -> str:
    """The architecture family (``llama``, ``gpt2``, ``bert`` or ``opt``) of a Hugging Face model.

    Raises:
        UnsupportedModelError: if the model has no ``config.model_type`` in the table.
    """
    config = getattr(unwrap(model), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise UnsupportedModelError(
            f"Cannot find the transformer blocks of a model with `model_type={model_type!r}`. "
            f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return _MODEL_TYPES[model_type]


def layout(model: nn.Module) -> FamilyLayout:
    """The :class:`FamilyLayout` row for ``model``."""
    return _LAYOUTS[family(model)]


def base_model(model: nn.Module) -> nn.Module:
    """The headless backbone (``LlamaModel``, ``BertModel``, ...) of a Hugging Face model."""
    return unwrap(model).base_model


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks, in depth order."""
    return _get(base_model(model), layout(model).blocks)  # type: ignore[return-value]


def num_blocks(model: nn.Module) -> int:
    """How many transformer blocks the model runs."""
    return len(get_blocks(model))


def get_final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last block (``None`` for post-norm encoders such as BERT)."""
    path = layout(model).final_norm
    return None if path is None else _get(base_model(model), path)


def get_input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token-embedding table ``E`` of shape ``[V, d]``."""
    return unwrap(model).get_input_embeddings()


def get_lm_head(model: nn.Module) -> nn.Linear | None:
    """The LM head ``W`` of shape ``[V, d]`` (``None`` for models without one)."""
    return unwrap(model).get_output_embeddings()


def is_decoder(model: nn.Module) -> bool:
    """Whether the model is a causal decoder (classification by label-word scoring) or an encoder."""
    return layout(model).is_decoder


def set_blocks(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Replace the model's blocks by ``blocks`` and keep the config and the KV-cache indices consistent.

    transformers' decoders loop over ``layers[: config.num_hidden_layers]`` and index the KV cache with each
    attention's ``layer_idx``; both are updated here so a shortened (emulator) or rebuilt stack runs every
    block it holds, in order, with or without a cache.
    """
    hf = unwrap(model)
    rows = layout(model)
    parent_path, _, attr = rows.blocks.rpartition(".")
    parent = _get(hf.base_model, parent_path) if parent_path else hf.base_model
    setattr(parent, attr, nn.ModuleList(blocks))
    setattr(hf.config, rows.depth_attr, len(blocks))
    layer_types = getattr(hf.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) != len(blocks):
        hf.config.layer_types = [layer_types[0]] * len(blocks) if layer_types else layer_types
    if rows.attention is not None:
        for idx, block in enumerate(blocks):
            attention = getattr(block, rows.attention, None)
            if attention is not None and hasattr(attention, "layer_idx"):
                attention.layer_idx = idx
            if hasattr(block, "layer_idx"):
                block.layer_idx = idx
