"""The Flower overhead benchmark derives its config as documented; the scale mode of the memory benchmark runs a
cohort per round on the tiny config and times every phase."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_config_has_every_client_sampled_and_no_report_files(tmp_path: Path, load_benchmark: Any) -> None:
    bench = load_benchmark("flower_round_overhead")
    path = bench.derived_config(ROOT / "configs/fed_prompt/fedpeptao_code.yaml", tmp_path, 4, 3, 32)
    raw = yaml.safe_load(path.read_text())
    fed = raw["trainer"]["strategy"]["init_args"]["federated"]
    assert (fed["num_rounds"], fed["sample_fraction"], fed["eval_every"]) == (3, 1.0, 3)
    assert "report_dir" not in fed and "default_root_dir" not in raw["trainer"]
    data = raw["data"]["init_args"]
    assert data["num_clients"] == 4 and "partition_dir" not in data
    assert data["datamodule"]["init_args"]["train_size"] == 128
    assert raw["model"]["init_args"]["model"] == "all-minilm-l6-v2"


def test_scale_mode_samples_a_cohort_and_times_each_phase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_benchmark: Any
) -> None:
    bench = load_benchmark("federated_memory")
    out = tmp_path / "out"
    argv = ["x", "--config", str(ROOT / "configs/fed_prompt/tiny_debug.yaml"), "--clients", "20"]
    argv += ["--sample-fraction", "0.1", "--rounds", "2", "--train-size", "40", "--test-size", "20"]
    monkeypatch.setattr(sys, "argv", [*argv, "--threads", "1", "--out", str(out)])
    bench.main()
    result = json.loads((out / "tiny-bert_20_cohort2.json").read_text())
    assert result["cohort"] == 2 and result["clients"] == 20
    assert len(result["round_seconds"]) == 2 and result["per_round"][-1]["evaluated"]
    assert 2 <= result["clients_with_state"] <= 4  # only the sampled clients trained
    assert result["setup_seconds"] > 0 and result["peak_rss_bytes"] >= result["peak_rss_bytes_after_build"] > 0
    assert result["provenance"]["command"] and (out / "tiny-bert_20_cohort2.md").exists()


def test_scale_mode_refuses_more_clients_than_examples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_benchmark: Any
) -> None:
    bench = load_benchmark("federated_memory")
    argv = ["x", "--config", str(ROOT / "configs/fed_prompt/tiny_debug.yaml"), "--clients", "50"]
    monkeypatch.setattr(sys, "argv", [*argv, "--train-size", "40", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="train-size"):
        bench.main()
