"""Packaging: callbacks/ and datamodules/ install inside the privtune namespace; the core stays Lightning-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _packages() -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_folder_is_listed() -> None:
    found = {"privtune.callbacks", "privtune.datamodules"}
    for init in (ROOT / "privtune").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for top in ("callbacks", "datamodules"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join(("privtune", top, *rel)))
    assert sorted(found) == sorted(_packages())


def test_no_bare_callbacks_package_is_importable_outside_the_repo(tmp_path) -> None:
    code = (
        "import importlib.util as u; "
        "print(u.find_spec('callbacks') is None, u.find_spec('privtune.callbacks') is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


CORE = ["privtune", "privtune.models", "privtune.data", "privtune.assets"]
CORE += [
    p
    for p in _packages()
    if p.split(".")[1:2] and p.split(".")[1] in {"emulator", "prompts", "federated", "shaking", "attacks"}
]


def test_core_imports_without_lightning(tmp_path) -> None:
    """The core works in a plain PyTorch project: it imports with `lightning` made unimportable."""
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric'):\n"
        "            raise ImportError('lightning is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import importlib\nfor m in {CORE!r}: importlib.import_module(m)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", blocker], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
