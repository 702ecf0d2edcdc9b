"""Models: resolve names offline, load them, and reach their blocks whatever the architecture."""

from privtune.models.blocks import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedModelError,
    base_model,
    family,
    get_blocks,
    get_final_norm,
    get_input_embeddings,
    get_lm_head,
    is_decoder,
    num_blocks,
    set_blocks,
    unwrap,
)
from privtune.models.loading import (
    PACKAGED_MODELS,
    ResolvedModel,
    known_model_names,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
)
from privtune.models.tiny import TINY_CONFIGS, tiny_tokenizer

__all__ = [
    "PACKAGED_MODELS",
    "SUPPORTED_MODEL_TYPES",
    "TINY_CONFIGS",
    "ResolvedModel",
    "UnsupportedModelError",
    "base_model",
    "family",
    "get_blocks",
    "get_final_norm",
    "get_input_embeddings",
    "get_lm_head",
    "is_decoder",
    "known_model_names",
    "load_config",
    "load_model",
    "load_tokenizer",
    "num_blocks",
    "resolve_model",
    "set_blocks",
    "tiny_tokenizer",
    "unwrap",
]
