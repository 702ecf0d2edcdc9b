"""Recipes: whole experiments built from privtune's modules, datamodules and core, run by nested Trainers.

A recipe sits above :mod:`privtune.modules` and :mod:`privtune.datamodules` and below the callbacks that start it
(``callbacks -> recipes -> modules, datamodules -> core``); it never imports a callback.
"""

from privtune.recipes.offsite import (
    EmulatorKnobs,
    NestedTrainers,
    OffsiteRecipe,
    PipelineSettings,
    ScaleOTStage1,
    generate_scaleot_emulator,
)

__all__ = [
    "EmulatorKnobs",
    "NestedTrainers",
    "OffsiteRecipe",
    "PipelineSettings",
    "ScaleOTStage1",
    "generate_scaleot_emulator",
]
