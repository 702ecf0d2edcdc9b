"""LightningModules that wrap the models privtune tunes."""

from privtune.modules.classifier import TextClassifier

__all__ = ["TextClassifier"]
