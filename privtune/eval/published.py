"""Check that every figure published in the Markdown docs appears in a committed result file that the text cites.

A privacy claim is only as good as the number behind it, so each published figure must be traceable to a file a
script wrote (with its command, commit and date, :func:`privtune.eval.provenance.run_provenance`). This module reads
``README.md`` and ``docs/**/*.md``, finds the *result statements* and, for each figure in them, looks for a value in
the result files that statement cites that rounds to the figure as shown.

What counts as a result statement (the scope, a rule rather than a list of numbers):

* a **result table**: a Markdown table whose header names a measurement (accuracy, F1, AUC, loss, gap, time, s,
  ratio, %, ×, MB/GB, bytes, throughput, ...). Its figures are the numeric cells outside the header row and the
  first column (the first column names the setting; its numbers are configuration, e.g. "OT 2-13-2");
* a **measured sentence**: a paragraph that cites a result file. Its figures are the numbers that carry a unit of
  measurement (%, ×, s, min, h, MB, GB, points) or a decimal point, or sit in a ± pair or a bold span;
* a **bold figure** anywhere (``**7 min 57 s**``): bold marks a headline result.

Where a statement cites its files: a ``<!-- result: path[, path...] -->`` comment on the line before it (or inside
it), or any ``benchmarks/results/...`` path written in it; a table also inherits the paths of the paragraph just
before it (the "From ``benchmarks/results/x.json``:" line). A path may be a file, a folder (all files under it) or
a glob. A result statement that cites no file is reported as such.

Not figures, by rule: anything inside code (inline or fenced: CLI values, paths, config), link targets and HTML
comments; headings (section numbers); numbers that are part of a name or identifier (``SmolLM2-135M``, ``2-13-2``,
``r=8``, ``v0.3``, ``arXiv 2310.15080``: a letter, ``=``, ``/``, ``_``, ``v`` or an ASCII hyphen joined to the
digits); values after ``=``, ``<``, ``>``, ``≤``, ``≥`` (settings and thresholds, ``α = 0.5``); confidence
levels (``95% interval``); four-digit years; and the entries of :data:`ALLOWED` (each with its reason).

Matching allows the formatting a writer applies: rounding to the digits shown (half a unit in the last place),
percent against fraction (``67.7%`` matches ``0.677``), thousands separators, a leading ``+``/``−`` (the value
or, for gains written with a sign, its magnitude), durations (``7 min 57 s`` is 477 s; ``102.7 min`` matches
seconds or minutes) sizes in MB/GB against bytes, and ``89.5 M`` (parameters) against a count.

Threat model: none; this guards the honesty of the published evaluation, not a privacy mechanism.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_DIR = "benchmarks/results"
#: result-file suffixes whose numbers are read (plots are not)
RESULT_SUFFIXES = (".json", ".md", ".yaml", ".yml", ".csv", ".txt", ".log")

#: figures that are not results although the scope rule catches them: (file, shown text) -> reason
ALLOWED: dict[tuple[str, str], str] = {}

_MEASURE_HEADER = re.compile(
    r"acc|f1|auc|loss|gap|time|\(s\)|\bs\b|ratio|%|×|\bmb\b|\bgb\b|bytes|/s\b|throughput|speed|rss|memory|"
    r"overhead|recover|success|tpr|fpr|advantage|ppl|perplexity|score|mean|std|median|gflop|err",
    re.IGNORECASE,
)
_RESULT_PATH = re.compile(r"benchmarks/results/[\w.*?\[\]/-]+")
_MARKER = re.compile(r"<!--\s*results?:\s*(.*?)-->", re.DOTALL)
_UNIT = r"(?:%|×|\s?(?:ms|s|sec|min|h|MB|GB|GiB|MiB|KB|kB|points|pts|pp|M)\b|\s?[A-Za-z]+/s\b)"
# a number not joined to a name: no letter, digit, '_', '=', '/', '.', 'v' or ASCII '-' right before it, none after
_NUMBER = re.compile(
    r"(?<![\w=/.\-])(?P<sign>[+\-−]?)(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?![\w.,]\d|[A-Za-z_]|-\d)"
)
_DURATION = re.compile(r"(?P<m>\d+)\s?min\s(?P<s>\d+(?:\.\d+)?)\s?s\b")
_ASSIGNED = re.compile(r"[=≤≥<>]\s*[+\-−]?$")
_LEVEL = re.compile(r"%?\s?(?:[A-Z][a-z]+\s)?(?:confidence|intervals?|CI)\b")
_YEAR = re.compile(r"^(19|20)\d\d$")


@dataclass(frozen=True)
class Figure:
    """One published number: where it stands, how it is written, and the files its statement cites."""

    path: str
    line: int
    text: str
    value: float
    decimals: int
    unit: str
    signed: bool
    sources: tuple[str, ...]
    kind: str  # "table", "sentence" or "bold"
    marked: bool = False  # its statement carries a ``<!-- result: ... -->`` marker: it must be backed

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.text!r} ({self.kind})"


@dataclass
class Report:
    """What :func:`check` found: matched figures, missing ones, statements that cite no file, and excluded numbers."""

    matched: list[Figure] = field(default_factory=list)
    missing: list[Figure] = field(default_factory=list)
    unsourced: list[Figure] = field(default_factory=list)
    bad_sources: list[tuple[str, str, bool]] = field(default_factory=list)  # (where, cited path, marked)
    allowed: list[Figure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unsourced or self.bad_sources)

    def unbacked(self) -> list[Figure]:
        """Figures not found in a cited result file, or whose statement cites none."""
        return self.missing + self.unsourced

    def marked_unbacked(self) -> list[Figure]:
        """Unbacked figures whose statement carries a ``result`` marker (a marker promises every figure is backed)."""
        return [f for f in self.unbacked() if f.marked]

    def unbacked_by_file(self) -> dict[str, int]:
        """How many :meth:`unbacked` figures each Markdown file holds."""
        counts: dict[str, int] = {}
        for figure in self.unbacked():
            counts[figure.path] = counts.get(figure.path, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> str:
        total = len(self.matched) + len(self.missing) + len(self.unsourced)
        lines = [
            f"{total} figures: {len(self.matched)} found in their result files, {len(self.missing)} not found, "
            f"{len(self.unsourced)} in statements citing no result file; {len(self.allowed)} allowed."
        ]
        lines += [
            f"  {where}: cites {source}, which is no committed result file" for where, source, _ in self.bad_sources
        ]
        lines += [f"  not in {', '.join(f.sources)}: {f.where()}" for f in self.missing]
        lines += [f"  no result file cited: {f.where()}" for f in self.unsourced]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- Markdown


@dataclass
class _Block:
    start: int  # 1-based line of the first line
    lines: list[str]
    table: bool
    markers: list[str]


def _blocks(text: str) -> Iterator[_Block]:
    """Paragraphs and tables outside fenced code and headings, each with the ``result`` markers just before it."""
    current: list[str] = []
    start = 0
    table = False
    fenced = False
    pending: list[str] = []

    def flush() -> Iterator[_Block]:
        nonlocal current, pending
        if current:
            yield _Block(start, current, table, pending)
            pending = []
        current = []

    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            yield from flush()
            fenced = not fenced
            continue
        if fenced:
            continue
        marker = _MARKER.fullmatch(stripped)
        if marker:
            yield from flush()
            pending = pending + [p.strip() for p in re.split(r"[,\s]+", marker.group(1)) if p.strip()]
            continue
        is_table = stripped.startswith("|")
        if not stripped or stripped.startswith("#") or (current and is_table != table):
            yield from flush()
            if not stripped or stripped.startswith("#"):
                if stripped.startswith("#"):
                    pending = []
                continue
        if not current:
            start, table = number, is_table
        current.append(line)
    yield from flush()


def _clean(text: str) -> str:
    """Drop code spans, HTML comments, link targets and URLs (their numbers are not figures)."""
    text = re.sub(r"<!--.*?-->", " ", text)
    text = re.sub(r"(`+).*?\1", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"https?://\S+", " ", text)


def _cited(lines: Iterable[str]) -> list[str]:
    text = "\n".join(lines)
    found = [m.group(0).rstrip(".,:;)") for m in _RESULT_PATH.finditer(text)]
    for marker in _MARKER.finditer(text):
        found += [p.strip() for p in re.split(r"[,\s]+", marker.group(1)) if p.strip()]
    return found


def _numbers(
    text: str, path: str, line: int, sources: tuple[str, ...], kind: str, units_only: bool, marked: bool = False
) -> list[Figure]:
    """The figures in ``text`` (already cleaned); with ``units_only`` a bare integer is not a figure."""
    out: list[Figure] = []
    taken: list[tuple[int, int]] = []
    for m in _DURATION.finditer(text):
        seconds = 60 * int(m["m"]) + float(m["s"])
        decimals = len(m["s"].partition(".")[2])
        out.append(Figure(path, line, m.group(0), seconds, decimals, "duration", False, sources, kind, marked))
        taken.append(m.span())
    bold_spans = [m.span() for m in re.finditer(r"\*\*.+?\*\*", text)]
    for m in _NUMBER.finditer(text):
        if any(a <= m.start() < b for a, b in taken):
            continue
        num = m["num"]
        if _YEAR.match(num):
            continue
        after = text[m.end() : m.end() + 24]
        if _ASSIGNED.search(text[max(0, m.start() - 4) : m.start()]) or _LEVEL.match(after):
            continue  # a configuration value (``α = 0.5``) or a confidence level (``95% interval``)
        unit_match = re.match(_UNIT, after)
        unit = unit_match.group(0).strip() if unit_match else ""
        paired = bool(re.match(r"\s?±", after)) or text[max(0, m.start() - 3) : m.start()].rstrip().endswith("±")
        in_bold = any(a <= m.start() < b for a, b in bold_spans)
        if units_only and not (unit or "." in num or paired or in_bold):
            continue
        value = float(num.replace(",", ""))
        signed = bool(m["sign"])
        if m["sign"] in "-−" and m["sign"]:
            value = -value
        decimals = len(num.partition(".")[2])
        out.append(Figure(path, line, m.group(0) + (unit_match.group(0) if unit_match else ""), value, decimals,
                          unit, signed, sources, kind, marked))  # fmt: skip
    return out


def _table_figures(block: _Block, path: str, sources: tuple[str, ...], marked: bool) -> list[Figure]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.lines]
    if len(rows) < 3 or not re.fullmatch(r"[\s|:\-]+", block.lines[1]):
        return []
    header = rows[0]
    if not any(_MEASURE_HEADER.search(_clean(h)) for h in header[1:]):
        return []  # not a result table (e.g. an index of options or failure cases)
    out: list[Figure] = []
    for offset, row in enumerate(rows[2:], 2):
        for cell in row[1:]:
            out += _numbers(_clean(cell), path, block.start + offset, sources, "table", False, marked)
    return out


def published_figures(root: str | Path, files: Iterable[str] | None = None) -> list[Figure]:
    """Every figure in the result statements of ``README.md`` and ``docs/**/*.md`` (or ``files``) under ``root``."""
    root = Path(root)
    names = list(files) if files is not None else ["README.md", *sorted(
        str(p.relative_to(root)) for p in (root / "docs").rglob("*.md"))]  # fmt: skip
    figures: list[Figure] = []
    for name in names:
        previous: _Block | None = None
        for block in _blocks((root / name).read_text(encoding="utf-8")):
            own = tuple(block.markers + _cited(block.lines))
            marked = bool(block.markers) or any(_MARKER.search(line) for line in block.lines)
            if block.table and previous is not None and not previous.table:
                marked = marked or bool(previous.markers)  # the introducing paragraph's marker covers its table
            if block.table:
                inherited = tuple(previous.markers + _cited(previous.lines)) if previous and not previous.table else ()
                figures += _table_figures(block, name, own + inherited, marked)
            else:
                text = _clean(" ".join(line.strip() for line in block.lines))
                if own:
                    figures += _numbers(text, name, block.start, own, "sentence", True, marked)
                else:
                    for bold in re.finditer(r"\*\*(.+?)\*\*", text):
                        figures += _numbers(bold.group(1), name, block.start, own, "bold", units_only=True)
            previous = block
    return figures


# ---------------------------------------------------------------------------------------------------- result files


def result_files(root: str | Path) -> list[str]:
    """The committed files under ``benchmarks/results`` (git's index; every file there outside a git checkout)."""
    root = Path(root)
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", RESULTS_DIR], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.split("\0")
        names = [n for n in listed if n]
    except (OSError, subprocess.SubprocessError):
        names = [str(p.relative_to(root)) for p in (root / RESULTS_DIR).rglob("*") if p.is_file()]
    return sorted(n for n in names if n.endswith(RESULT_SUFFIXES))


def _json_numbers(obj: object) -> Iterator[float]:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        if math.isfinite(obj):
            yield float(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _json_numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _json_numbers(value)
    elif isinstance(obj, str):
        yield from _text_numbers(obj)


def _text_numbers(text: str) -> Iterator[float]:
    for m in _DURATION.finditer(text):
        yield 60 * int(m["m"]) + float(m["s"])
    for m in re.finditer(r"[+\-−]?\d[\d,]*(?:\.\d+)?(?:[eE][+\-]?\d+)?", text):
        token = m.group(0).replace("−", "-").replace(",", "")
        try:
            yield float(token)
        except ValueError:
            continue


def file_numbers(path: Path) -> list[float]:
    """Every number a result file holds (JSON values, and numbers written in its strings or text)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            return list(_json_numbers(json.loads(text)))
        except json.JSONDecodeError:
            pass
    return list(_text_numbers(text))


def matches(figure: Figure, value: float) -> bool:
    """Whether ``value`` from a result file, written as ``figure`` is written, gives the same text."""
    half = 0.5 * 10.0 ** (-figure.decimals) * (1 + 1e-9) + 1e-12
    shown = figure.value
    candidates = [value]
    if figure.unit in ("%", "points", "pts", "pp", "") or not figure.unit:
        candidates.append(100 * value)
    if figure.unit in ("min",):
        candidates.append(value / 60)
    if figure.unit in ("h",):
        candidates += [value / 3600, value / 60]
    if figure.unit in ("ms",):
        candidates.append(1000 * value)
    if figure.unit in ("MB", "MiB"):
        candidates += [value / 1e6, value / 2**20]
    if figure.unit in ("GB", "GiB"):
        candidates += [value / 1e9, value / 2**30, value / 1e3, value / 1024]
    if figure.unit == "M":
        candidates.append(value / 1e6)
    if figure.unit in ("KB", "kB"):
        candidates += [value / 1e3, value / 1024]
    targets = [shown, abs(shown)] if figure.signed else [shown]
    return any(abs(c - t) <= half for c in candidates for t in targets)


def _expand(root: Path, source: str, files: list[str]) -> list[str]:
    source = source.rstrip("/")
    if any(ch in source for ch in "*?["):
        return [f for f in files if fnmatch.fnmatch(f, source) or fnmatch.fnmatch(f, source + "/*")]
    return [f for f in files if f == source or f.startswith(source + "/")]


def check(root: str | Path = ".", files: Iterable[str] | None = None) -> Report:
    """Check every published figure under ``root`` against the committed result files its statement cites."""
    root = Path(root)
    committed = result_files(root)
    cache: dict[str, list[float]] = {}
    report = Report()
    for figure in published_figures(root, files):
        if (figure.path, figure.text) in ALLOWED:
            report.allowed.append(figure)
            continue
        if not figure.sources:
            report.unsourced.append(figure)
            continue
        pool: list[str] = []
        for source in figure.sources:
            expanded = _expand(root, source, committed)
            if not expanded:
                entry = (f"{figure.path}:{figure.line}", source, figure.marked)
                if entry not in report.bad_sources:
                    report.bad_sources.append(entry)
            pool += expanded
        values = (v for name in pool for v in cache.setdefault(name, file_numbers(root / name)))
        if any(matches(figure, v) for v in values):
            report.matched.append(figure)
        else:
            report.missing.append(figure)
    return report


def main() -> None:
    """``python -m privtune.eval.published [root]``: print the report; exit 1 if a figure is not backed by a file."""
    import sys

    report = check(sys.argv[1] if len(sys.argv) > 1 else ".")
    print(report.summary())
    raise SystemExit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
