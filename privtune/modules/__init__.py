"""LightningModules that wrap the models privtune tunes."""

from privtune.modules.classifier import TextClassifier
from privtune.modules.offsite_distill import EmulatorDistillation
from privtune.modules.offsite_finetune import OffsiteFinetune
from privtune.modules.offsite_importance import HarmonizerImportance
from privtune.modules.prompt_tuning import PromptTuning
from privtune.modules.recovery import ShakeRecovery

__all__ = [
    "EmulatorDistillation",
    "HarmonizerImportance",
    "OffsiteFinetune",
    "PromptTuning",
    "ShakeRecovery",
    "TextClassifier",
]
