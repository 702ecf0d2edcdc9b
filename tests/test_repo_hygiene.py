"""No dataset text, model weights or converted caches are committed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NGRAM = 12


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def test_no_large_files_and_no_weights() -> None:
    for path in _tracked():
        assert path.stat().st_size < 1_000_000, f"{path} is over 1 MB"
        assert path.suffix not in {".safetensors", ".gguf", ".bin", ".pt", ".ckpt"}, f"{path} looks like weights"


def _ngrams(text: str) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)}


@pytest.mark.assets
def test_no_dataset_text_is_committed() -> None:
    from privtune.data import read_bbc_news, read_tweets

    corpus: set[tuple[str, ...]] = set()
    for text in read_bbc_news().texts + read_tweets(drop_conflicts=False).texts:
        corpus |= _ngrams(text)
    for path in _tracked():
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".txt", ".csv", ".json", ".jsonl", ".toml", ""}:
            shared = _ngrams(path.read_text(errors="ignore")) & corpus
            assert not shared, f"{path} shares a {NGRAM}-word sequence with the packaged corpora"
