"""The reliability tables (docs/reliability.md and docs/reliability/*.md) point only at tests that exist.

Every row names the test that pins its behaviour; a renamed or deleted test would leave the table promising
something nothing checks. This reads the tables and the test files statically (no import, no collection).
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAGMENTS = sorted((ROOT / "docs" / "reliability").glob("*.md"))
NODE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


@cache
def _functions(path: str) -> frozenset[str]:
    tree = ast.parse((ROOT / path).read_text())
    return frozenset(n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def _rows(path: Path) -> list[str]:
    """The body rows of every Markdown table in ``path`` (a header is the row above a ``|---|`` separator)."""
    lines = path.read_text().splitlines()
    sep = re.compile(r"^\|[\s:|-]+\|$")
    headers = {i - 1 for i, ln in enumerate(lines) if sep.match(ln)}
    return [ln for i, ln in enumerate(lines) if ln.startswith("| ") and not sep.match(ln) and i not in headers]


def test_every_fragment_is_listed_in_the_index() -> None:
    index = (ROOT / "docs" / "reliability.md").read_text()
    missing = [f.name for f in FRAGMENTS if f"reliability/{f.name}" not in index]
    assert not missing, f"docs/reliability.md does not link {missing}"


def test_the_table_holds_at_least_a_hundred_cases_each_with_a_test() -> None:
    rows = [(f, row) for f in FRAGMENTS for row in _rows(f)]
    assert len(rows) >= 100, len(rows)
    without = [f"{f.name}: {row[:80]}" for f, row in rows if not NODE.search(row) and "tests/" not in row]
    assert not without, "rows that name no test:\n" + "\n".join(without)


def test_every_named_test_exists() -> None:
    named = {
        (m.group(1), m.group(2))
        for f in [*FRAGMENTS, ROOT / "docs" / "reliability.md"]
        for m in NODE.finditer(f.read_text())
    }
    assert named
    missing = [f"{p}::{fn}" for p, fn in sorted(named) if not (ROOT / p).is_file() or fn not in _functions(p)]
    assert not missing, "the reliability tables name tests that do not exist:\n" + "\n".join(missing)


def test_the_index_counts_match_the_tables() -> None:
    index = (ROOT / "docs" / "reliability.md").read_text()
    counts = {f.name: len(_rows(f)) for f in FRAGMENTS}
    for name, n in counts.items():
        assert f"| {n} | [reliability/{name}]" in index, f"docs/reliability.md gives another count for {name} ({n})"
    assert f"{sum(counts.values())} cases in all" in index
