"""Privacy attacks that measure what a defence leaves recoverable (torch only).

``embedding_inversion``: nearest-neighbour table matching, anchor-aligned matching, frequency analysis,
their combination, and learned inversion from hidden states (spec ``cyphertalk.md`` §6, ``related.md`` §6.1).
"""

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

__all__ = [
    "EmbeddingRegressionProbe",
    "InversionProbe",
    "anchor_aligned_matching",
    "attack_report",
    "combined_attack",
    "fit_alignment",
    "frequency_attack",
    "hidden_states",
    "model_attack_report",
    "nearest_rows",
    "recovery_rate",
    "standardize",
    "table_matching",
    "token_counts",
    "vocabulary_tables",
]
