"""Every published figure comes from a committed result file (privtune.eval.published).

Two checks on the repository: a statement that carries a ``<!-- result: ... -->`` marker must have every figure in
the files it names, and the figures not yet backed by a result file (older statements that cite none, or name the
wrong one) may only decrease: each Markdown file has a ceiling, measured when the check was introduced. Lower a
ceiling when you back figures; never raise one, add the result file or the marker instead. The unit tests show the
checker flags a number absent from every result file and leaves configuration numbers alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privtune.eval.published import Figure, check, matches, published_figures, result_files

ROOT = Path(__file__).resolve().parents[1]

#: figures without a backing result file per Markdown file when the check was introduced; may only go down
UNBACKED_CEILING: dict[str, int] = {
    "README.md": 0,
    "docs/dp_sgd.md": 0,
    "docs/federated.md": 0,
    "docs/offsite_tuning.md": 0,
    "docs/privacy_audit.md": 0,
    "docs/shaking.md": 0,
}

#: citations of result files that are not committed, per Markdown file, when the check was introduced
MISSING_FILE_CEILING: dict[str, int] = {"docs/offsite_tuning.md": 2}  # offsite_loo_importance/loo, a train.log


@pytest.fixture(scope="module")
def repo_report():
    return check(ROOT)


def test_cited_result_files_exist(repo_report) -> None:
    """A marked statement names committed files; unmarked citations of missing files may only decrease."""
    marked = [f"{where}: {source}" for where, source, is_marked in repo_report.bad_sources if is_marked]
    assert not marked, marked
    unmarked: dict[str, int] = {}
    for where, _, _ in repo_report.bad_sources:
        unmarked[where.split(":")[0]] = unmarked.get(where.split(":")[0], 0) + 1
    over = {path: n for path, n in unmarked.items() if n > MISSING_FILE_CEILING.get(path, 0)}
    assert not over, f"{over}: cite a committed result file: {repo_report.bad_sources}"


def test_marked_statements_are_backed(repo_report) -> None:
    unbacked = repo_report.marked_unbacked()
    assert not unbacked, "figures under a result marker missing from the files it names:\n" + "\n".join(
        f"{f.where()} not in {', '.join(f.sources)}" for f in unbacked
    )


def test_unbacked_figures_only_decrease(repo_report) -> None:
    over = {
        path: count for path, count in repo_report.unbacked_by_file().items() if count > UNBACKED_CEILING.get(path, 0)
    }
    detail = [f.where() for f in repo_report.unbacked() if f.path in over]
    assert not over, (
        f"more figures without a result file than before ({over} against {UNBACKED_CEILING}); cite the result file "
        "(a `<!-- result: benchmarks/results/... -->` line before the statement) or add one:\n" + "\n".join(detail)
    )


def _result(folder: str) -> dict:
    files = sorted((ROOT / "benchmarks" / "results" / folder).glob("*.json"))
    assert len(files) == 1, f"expected one result file in benchmarks/results/{folder}, found {files}"
    result = json.loads(files[0].read_text())
    assert {"command", "commit", "date_utc"} <= result.keys(), "result files record their command, commit and date"
    return result


def test_readme_baseline_table_is_the_result_file(repo_report) -> None:
    """The README baseline (LoRA on tweets) shows the figures of its result file, and the checker backs them."""
    if not any("/baseline_lora/" in name for name in result_files(ROOT)):
        pytest.skip("benchmarks/results/baseline_lora/ is not committed yet (benchmarks/baseline_lora.py writes it)")
    result = _result("baseline_lora")
    readme = (ROOT / "README.md").read_text()
    for name, key in (("zero-shot", "zero_shot"), ("LoRA-tuned", "tuned")):
        row = result[key]
        assert f"| {name} | {100 * row['acc']:.1f}% | {row['f1']:.3f} | {row['n']} |" in readme
    assert f"**{result['gain_points']:+.1f} accuracy points**" in readme
    backed = [f for f in repo_report.matched if any("baseline_lora" in s for s in f.sources)]
    assert len(backed) >= 8, backed  # 2 rows x (acc, F1, n), the wall time and the gain


def test_step_cost_figures_are_the_result_file(repo_report) -> None:
    """The data owner's step cost in README and the offsite guide is the ratio in its result file."""
    ratio = _result("offsite_step_cost")["step_time_ratio_emulator_over_full"]
    for path in ("README.md", "docs/offsite_tuning.md"):
        figures = [
            f
            for f in repo_report.matched
            if f.path == path and any("offsite_step_cost" in s for s in f.sources) and matches(f, ratio)
        ]
        assert figures and f"{ratio:.2f}" in (ROOT / path).read_text(), path


def _repo(tmp_path: Path, readme: str, results: dict[str, object]) -> Path:
    (tmp_path / "README.md").write_text(readme)
    folder = tmp_path / "benchmarks" / "results" / "demo"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(results))
    return tmp_path


TABLE = """# Results

<!-- result: benchmarks/results/demo/run.json -->
Measured on a 2-core CPU: **7 min 57 s** wall time, 12,345 examples/s.

| setting | test acc | macro-F1 | n |
|---|---|---|---|
| zero-shot | 45.0% | 0.364 | 300 |
| LoRA r=8, 2-13-2 | {tuned} | 0.674 ± 0.012 | 300 |
"""
RESULTS = {"acc0": 0.45, "f1_0": 0.3641, "n": 300, "acc": 0.67667, "f1": 0.6738, "std": 0.0119, "wall": 477.2,
           "rate": 12345.4}  # fmt: skip


def test_backed_numbers_pass_with_formatting_differences(tmp_path: Path) -> None:
    report = check(_repo(tmp_path, TABLE.format(tuned="67.7%"), RESULTS))
    assert report.ok, report.summary()
    texts = sorted(f.text for f in report.matched)
    # 'r=8' and '2-13-2' (row labels, identifiers) and '2-core' are not figures; the duration is one figure
    assert texts == sorted(
        ["7 min 57 s", "12,345 examples/s", "45.0%", "0.364", "300", "67.7%", "0.674", "0.012", "300"]
    )


def test_flags_a_number_absent_from_every_result_file(tmp_path: Path) -> None:
    report = check(_repo(tmp_path, TABLE.format(tuned="68.7%"), RESULTS))
    assert not report.ok
    assert [f.text for f in report.missing] == ["68.7%"]
    assert report.marked_unbacked() == report.missing


def test_flags_a_result_statement_citing_no_file(tmp_path: Path) -> None:
    readme = "Tuning gain: **+22.7 accuracy points** (see `make train`, v2.1, 2026).\n"
    report = check(_repo(tmp_path, readme, {"gain": 22.7}))
    assert [f.text for f in report.unsourced] == ["+22.7"]  # cited nowhere, so not backed even though a file has it


def test_flags_a_cited_file_that_does_not_exist(tmp_path: Path) -> None:
    readme = "From `benchmarks/results/demo/other.json`: accuracy 45.0%.\n"
    report = check(_repo(tmp_path, readme, {"acc": 0.45}))
    assert report.bad_sources and not report.ok


def test_code_headings_and_tables_without_measurements_are_not_figures(tmp_path: Path) -> None:
    readme = """# 3.1 Setup (arXiv 2310.15080)

```bash
python train.py fit --trainer.max_steps=80  # 45.5%
```

| option | default |
|---|---|
| lr | 0.001 |

<!-- result: benchmarks/results/demo/run.json -->
With α = 0.5 and SmolLM2-135M on 2,000 tweets, each accuracy has a 95% Wilson interval (see `--seed 3.5`).
"""
    _repo(tmp_path, readme, {})
    assert published_figures(tmp_path) == []


def test_match_rules() -> None:
    def fig(text: str, value: float, decimals: int, unit: str = "", signed: bool = False) -> Figure:
        return Figure("README.md", 1, text, value, decimals, unit, signed, ("x",), "table")

    assert matches(fig("67.7%", 67.7, 1, "%"), 0.6767)  # fraction shown as percent, rounded
    assert not matches(fig("67.7%", 67.7, 1, "%"), 0.6776)
    assert matches(fig("0.62×", 0.62, 2, "×"), 0.6204)
    assert matches(fig("102.7 min", 102.7, 1, "min"), 6162.6)  # seconds shown in minutes
    assert matches(fig("−2.7", -2.7, 1, signed=True), -2.7)
    assert matches(fig("1.7 GB", 1.7, 1, "GB"), 1.7e9)
