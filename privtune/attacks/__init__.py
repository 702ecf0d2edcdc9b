"""Privacy attacks that measure what a defence leaves recoverable (torch only).

``embedding_inversion``: nearest-neighbour table matching, anchor-aligned matching, frequency analysis,
their combination, and learned inversion from hidden states (spec ``cyphertalk.md`` §6, ``related.md`` §6.1).
``decipher``: bigram decipherment of the shaken id stream (a fixed permutation as a substitution cipher).
``membership``: membership inference (loss, reference-calibrated, min-k %, zlib) with bootstrap intervals and
controls (spec ``privacy_audit_and_flower.md`` §1-§2).
"""

from privtune.attacks.decipher import DecipherResult, decipher, decipher_metrics, strip_shared
from privtune.attacks.embedding_inversion import (
    EmbeddingRegressionProbe,
    InversionProbe,
    anchor_aligned_matching,
    attack_report,
    combined_attack,
    fit_alignment,
    frequency_attack,
    hidden_states,
    model_attack_report,
    nearest_rows,
    recovery_rate,
    standardize,
    table_matching,
    token_counts,
    vocabulary_tables,
)
from privtune.attacks.membership import (
    AttackResult,
    ExampleStatistics,
    MembershipReport,
    best_valid_attack,
    control_verdicts,
    example_statistics,
    member_split,
    membership_report,
)

__all__ = [
    "AttackResult",
    "DecipherResult",
    "EmbeddingRegressionProbe",
    "ExampleStatistics",
    "InversionProbe",
    "MembershipReport",
    "anchor_aligned_matching",
    "attack_report",
    "best_valid_attack",
    "combined_attack",
    "control_verdicts",
    "decipher",
    "decipher_metrics",
    "example_statistics",
    "fit_alignment",
    "frequency_attack",
    "hidden_states",
    "member_split",
    "membership_report",
    "model_attack_report",
    "nearest_rows",
    "recovery_rate",
    "standardize",
    "strip_shared",
    "table_matching",
    "token_counts",
    "vocabulary_tables",
]
