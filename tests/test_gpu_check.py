"""benchmarks/gpu_check.py in its CPU smoke mode: emulator and full-model data-owner steps, measured and compared."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_measures_both_modes_and_their_ratios(tmp_path) -> None:
    gpu_check = _gpu_check()
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--smoke", "--peak-tflops", "1", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == {"tiny"}
    assert out.with_suffix(".md").read_text().count("**emulator / full**") == 1
    row = report["results"]["tiny"]
    emu, full = row["emulator"], row["full"]
    assert emu["trainable"] == full["trainable"] > 0  # the same four adapter blocks train in both
    assert emu["params"] < full["params"]
    assert 0 < emu["flops_per_step"] < full["flops_per_step"]  # harmonizers and low-rank attention cost less
    assert emu["step_seconds"] > 0 and full["tokens_per_second"] > 0
    assert 0 < emu["mfu"] < 1 and row["emulator_over_full"]["mfu"] > 0
    assert emu["peak_memory_bytes"] is None  # CUDA-only figure
    assert row["emulator_over_full"]["params"] == pytest.approx(emu["params"] / full["params"])
    assert report["commit"] is None or len(report["commit"]) >= 40
    assert report["device"] == "CPU"


def test_without_cuda_the_full_check_refuses(monkeypatch) -> None:
    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.main([])


def test_a_copied_tree_records_the_commit_it_was_copied_from(monkeypatch) -> None:
    gpu_check = _gpu_check()
    machine = {"command": "x", "commit": "b" * 40 + "-dirty", "date_utc": "d"}  # a stale checkout under the copy
    monkeypatch.setattr(gpu_check, "run_provenance", lambda: dict(machine))
    report = gpu_check.main(["--smoke", "--tree-commit", "a" * 40])
    assert (report["commit"], report["machine_git_commit"]) == ("a" * 40, "b" * 40 + "-dirty")


def test_flops_count_attention_and_the_model_returns_to_sdpa() -> None:
    """The count runs through eager attention (torch's counter cannot size grouped-query SDPA on some versions, and
    counts nothing for SDPA on the CPU); the timed steps run SDPA again."""
    gpu_check = _gpu_check()
    model = gpu_check.random_llama("tiny", torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with gpu_check.eager_attention(model), counter:
        model(input_ids=torch.randint(0, 512, (2, 16)))
    counts = counter.get_flop_counts()["Global"]
    # the two attention products: 2 * batch * heads * length^2 * head_dim FLOPs each, in each of the 8 blocks (some
    # transformers versions add one small product per forward for the rotary frequencies)
    attention = 8 * 2 * (2 * 2 * 4 * 16 * 16 * 16)
    assert attention <= counts[torch.ops.aten.bmm] <= 1.01 * attention
    assert model.config._attn_implementation == "sdpa"
