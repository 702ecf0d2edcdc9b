"""CypherTalk shaking and recovery (arXiv 2403.07283): keys, operators, shaken embeddings and tokenizer.

Torch (+ transformers) only. The Lightning parts are ``privtune.callbacks.embedding_shaking`` and
``privtune.modules.recovery``. Shaking is an empirical defence with no formal DP guarantee.
"""

from privtune.shaking.embedding import (
    RecoveryMode,
    apply_vertical,
    find_embedding,
    head_is_vertical,
    invert_vertical,
    is_tied,
    recover_embedding,
    recover_head,
    recover_model,
    shake_embedding,
    shake_head,
    shake_model,
    shaken_parameter_names,
    shaking_state,
    untie_lm_head,
)
from privtune.shaking.key import KeySetting, OpStep, ShakeKey, available_operators
from privtune.shaking.operators import Operator, ShakeOp, TableStats, get_operator, register_operator
from privtune.shaking.tokenizer import ShakenTokenizer

__all__ = [
    "KeySetting",
    "OpStep",
    "Operator",
    "RecoveryMode",
    "ShakeKey",
    "ShakeOp",
    "ShakenTokenizer",
    "TableStats",
    "apply_vertical",
    "available_operators",
    "find_embedding",
    "get_operator",
    "head_is_vertical",
    "invert_vertical",
    "is_tied",
    "recover_embedding",
    "recover_head",
    "recover_model",
    "register_operator",
    "shake_embedding",
    "shake_head",
    "shake_model",
    "shaken_parameter_names",
    "shaking_state",
    "untie_lm_head",
]
