"""Deep prefix prompts and FedPepTAO's partial prompt selection (arXiv 2110.07602, 2310.15080).

Torch and transformers only; no Lightning.
"""

from privtune.prompts.layer_selection import (
    aggregate_layer_scores,
    client_layer_scores,
    hessian_ratio,
    hessian_vector_product,
    lanczos,
    layer_score,
    mass_above,
    num_layers_from_ratio,
    plateau_ratio,
    rank_layers,
    select_layers,
    spectral_density,
)
from privtune.prompts.prefix import DeepPrefixPrompt, freeze_backbone, kv_geometry

__all__ = [
    "DeepPrefixPrompt",
    "aggregate_layer_scores",
    "client_layer_scores",
    "freeze_backbone",
    "hessian_ratio",
    "hessian_vector_product",
    "kv_geometry",
    "lanczos",
    "layer_score",
    "mass_above",
    "num_layers_from_ratio",
    "plateau_ratio",
    "rank_layers",
    "select_layers",
    "spectral_density",
]
