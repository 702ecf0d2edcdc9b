"""benchmarks/offsite_stage1_curves.py: the stage-1 diagnosis summarised from the ablation's row files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _curves_module():
    path = REPO / "benchmarks" / "offsite_stage1_curves.py"
    spec = importlib.util.spec_from_file_location("offsite_stage1_curves", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["offsite_stage1_curves"] = module
    spec.loader.exec_module(module)
    return module


def _curves(first: list[float], last: list[float], loss: list[float], kd: list[float] | None = None) -> dict:
    error = {"step": [1, 100]} | {str(2 + i): [a, b] for i, (a, b) in enumerate(zip(first, last))}
    curves = {"loss": {"step": list(range(1, len(loss) + 1)), "loss": loss}, "harmonizer_error": error}
    if kd is not None:
        curves["loss"] |= {"lm": loss, "kd": kd}
        del curves["harmonizer_error"]
    return curves


def _write(folder: Path, name: str, curves: dict | None) -> None:
    report = {"arms": {}, "stage1_curves": curves} if curves is not None else {"arms": {}}
    (folder / f"{name}.json").write_text(json.dumps(report))


def test_each_series_takes_one_row_per_seed_and_summarises_first_and_last(tmp_path) -> None:
    module = _curves_module()
    rows = tmp_path / "rows"
    (rows / "bbc_news").mkdir(parents=True)
    loss = [8.0] * 10 + [7.0] * 80 + [6.0] * 10
    _write(rows / "bbc_news", "a_d_seed0", _curves([0.5, 0.7, 0.9], [1.5, 0.8, 2.0], loss))
    _write(rows / "bbc_news", "b_seed0", _curves([0.1, 0.1, 0.1], [0.1, 0.1, 0.1], loss))  # same stage 1: a_d wins
    _write(rows / "bbc_news", "b_seed1", _curves([0.6, 0.6, 0.6], [1.2, 1.2, 0.6], loss))  # seed 1 only in b
    _write(rows / "bbc_news", "a_d_seed2", None)  # recorded before the curves existed: skipped
    kd_curve = _curves([], [], [31.0] * 20, kd=[0.8] * 10 + [0.2] * 10)["loss"]
    akd = {"arms": {}, "stage1_curves": _curves([0.9] * 3, [0.9] * 3, loss)}  # ScaleOT's stage 1 in the same row
    akd["uniform_drop_distillation"] = {"ot_uniform_drop_2-13-2_kd100": {"curve": kd_curve}}
    (rows / "bbc_news" / "akd100_seed0.json").write_text(json.dumps(akd))
    dim = _curves([0.5] * 3, [0.4] * 3, [4.0] * 20)
    dim["loss"] |= {"lm": [3.5] * 20, "imitation": [0.6] * 10 + [0.4] * 10}  # loss = lm + λ_im · imitation
    _write(rows / "bbc_news", "dim_seed0", dim)
    summary = module.summarise(rows)["bbc_news"]
    published = summary["(d) ScaleOT, 100 steps"]
    assert [(r["seed"], r["row"]) for r in published] == [(0, "a_d_seed0.json"), (1, "b_seed1.json")]
    error = published[0]["error"]
    assert error["median_first"] == pytest.approx(0.7) and error["median_last"] == pytest.approx(1.5)
    assert error["worse_than_drop_first"] == 0.0 and error["worse_than_drop_last"] == pytest.approx(2 / 3)
    assert error["max_last"] == pytest.approx(2.0)
    assert published[0]["loss"]["loss_first"] == pytest.approx(8.0)
    assert published[0]["loss"]["loss_last"] == pytest.approx(6.0)
    kd = summary["(a) OT 2-13-2 + KD, 100 steps"][0]
    assert kd["error"] is None and kd["loss"]["kd_first"] == pytest.approx(0.8) and kd["loss"]["kd_last"] == 0.2
    text = module.markdown(module.summarise(rows), "rows")
    assert (
        "| bbc_news | (d) ScaleOT, 100 steps | 2 | 0.65 ± 0.07 | 1.35 ± 0.21 | 0% ± 0% | 67% ± 0% | 1.60 ± 0.57 |"
        in text
    )
    assert (
        "| bbc_news | (a) OT 2-13-2 + KD, 100 steps | 1 | 31.000 | 31.000 | 31.000 → 31.000 | 0.800 → 0.200 | – |"
        in text
    )
    assert (
        "| bbc_news | (d) + imitation term, 100 steps | 1 | 4.000 | 4.000 | 3.500 → 3.500 | – | 0.600 → 0.400 |" in text
    )


def test_main_writes_its_files_and_refuses_a_missing_rows_folder(tmp_path) -> None:
    module = _curves_module()
    rows = tmp_path / "rows"
    (rows / "tweets").mkdir(parents=True)
    _write(rows / "tweets", "c_seed0", _curves([1.0, 1.0], [1.0, 1.0], [12.0] * 30))
    written = module.main(["--rows", str(rows), "--out", str(tmp_path / "out")])
    assert {Path(p).name for p in written} >= {"curves.json", "curves.md"}
    assert (
        "| tweets | (c) identity stand-ins, 100 steps | 1 | 1.00 | 1.00 | 0% | 0% | 1.00 |"
        in (tmp_path / "out" / "curves.md").read_text()
    )
    with pytest.raises(SystemExit):
        module.main(["--rows", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out2")])
    assert not (tmp_path / "out2").exists()  # refused before anything was written


def test_learned_scores_are_compared_with_leave_one_out_importance() -> None:
    module = _curves_module()
    loo = {"base_loss": 5.0, "rows": {str(i): {"dropped": 5.0 + i} for i in range(2, 8)}}  # deeper = more important
    same = module.importance_vs_loo({str(i): 0.1 * i for i in range(2, 8)}, loo)
    assert same == {"spearman": pytest.approx(1.0), "overlap": 3, "half": 3}
    reversed_ = module.importance_vs_loo({str(i): -0.1 * i for i in range(2, 8)}, loo)
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["overlap"] == 0
    assert module.importance_vs_loo(None, loo) is None and module.importance_vs_loo({"2": 0.0}, None) is None
