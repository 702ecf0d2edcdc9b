"""Lightning callbacks: each privacy mechanism as a thin adapter over a core function.

Installed as ``privtune.callbacks``. Every callback works in any Lightning project with a Hugging Face
model; the work is done by torch-only functions in the privtune core.
"""

from privtune.callbacks.dp_sgd import OpacusDP
from privtune.callbacks.embedding_shaking import EmbeddingShaking
from privtune.callbacks.fedprox import FedProx
from privtune.callbacks.layer_replace import LayerReplace
from privtune.callbacks.membership_audit import MembershipAudit
from privtune.callbacks.offsite_pipeline import OffsitePipeline
from privtune.callbacks.offsite_tuning import AdapterExport, EmulatorExport, PlugAdapters
from privtune.callbacks.rank_compression import RankCompression
from privtune.callbacks.scaffold import ScaffoldCorrection
from privtune.callbacks.tuning_report import TuningReport

__all__ = [
    "AdapterExport",
    "EmbeddingShaking",
    "EmulatorExport",
    "FedProx",
    "LayerReplace",
    "MembershipAudit",
    "OffsitePipeline",
    "OpacusDP",
    "PlugAdapters",
    "RankCompression",
    "ScaffoldCorrection",
    "TuningReport",
]
