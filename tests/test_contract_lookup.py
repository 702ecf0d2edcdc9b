"""Contract checks see what an ``nn.Module`` registers, on every Python the package supports.

From Python 3.12, ``isinstance`` against a runtime-checkable Protocol looks data members up statically
(``inspect.getattr_static``); an ``nn.Module`` keeps its sub-modules, parameters and buffers outside ``__dict__``,
so such a check refuses a valid LightningModule on 3.12 (``OffsitePipeline`` did, with ``HarmonizerImportance``)
and accepts it on 3.11. The library checks these contracts with :func:`privtune.contracts.conforms`.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import torch
from torch import nn

from privtune.contracts import conforms
from privtune.recipes.offsite import ScaleOTStage1Module

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [*sorted((ROOT / "privtune").rglob("*.py")), *sorted((ROOT / "callbacks").rglob("*.py"))]
LIBRARY += [*sorted((ROOT / "datamodules").rglob("*.py")), ROOT / "train.py"]


class Stage1(nn.Module):
    """What ``HarmonizerImportance`` holds: a model, a name, a score buffer and harmonizers."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(2, 2)
        self.model_name = "tiny-llama"
        self.harmonizers = nn.ModuleDict({"1": nn.Linear(2, 2)})
        self.register_buffer("layer_importance", torch.zeros(1))


def test_conforms_sees_registered_submodules_and_buffers_that_a_static_lookup_misses() -> None:
    module = Stage1()
    assert conforms(module, ScaleOTStage1Module)
    # what Python 3.12's isinstance does for each data member: the registered ones are invisible to it
    assert inspect.getattr_static(module, "harmonizers", None) is None
    assert inspect.getattr_static(module, "layer_importance", None) is None
    del module.harmonizers
    assert not conforms(module, ScaleOTStage1Module)


def _data_protocols(trees: list[ast.Module]) -> set[str]:
    """Names of the Protocols (anywhere in the library) that declare at least one data member."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            if "Protocol" in bases and any(isinstance(item, ast.AnnAssign) for item in node.body):
                names.add(node.name)
    return names


def test_no_isinstance_check_against_a_protocol_with_data_members() -> None:
    trees = {path: ast.parse(path.read_text(), str(path)) for path in LIBRARY}
    protocols = _data_protocols(list(trees.values()))
    assert {"ScaleOTStage1Module", "HarmonizerStage1Module", "PartialPromptClient"} <= protocols  # the rule's reach
    offenders = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                named = {k.id if isinstance(k, ast.Name) else getattr(k, "attr", "") for k in kinds}
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in named & protocols]
    assert not offenders, f"use privtune.contracts.conforms (or missing_members) instead: {offenders}"
