"""Bigram decipherment of a fixed token permutation: template stripping, metrics, and a synthetic cipher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from privtune.attacks import frequency_attack, token_counts
from privtune.attacks.decipher import bigram_counts, bigram_log_probs, decipher, decipher_metrics, strip_shared

V = 400
PINNED = (0, 1, 2)


def _chain(seed: int) -> np.ndarray:
    """A Markov chain over ``V`` ids with Zipf unigrams and a few preferred successors per id."""
    rng = np.random.default_rng(seed)
    zipf = 1 / np.arange(1, V + 1) ** 1.05
    zipf /= zipf.sum()
    trans = np.zeros((V, V))
    for p in range(V):
        succ = rng.choice(V, size=10, replace=False, p=zipf)
        trans[p, succ] += rng.dirichlet(np.ones(10)) * 0.7
        trans[p] += 0.3 * zipf
    return trans


def _sample(trans: np.ndarray, n_seq: int, length: int, rng: np.random.Generator) -> list[list[int]]:
    cum = trans.cumsum(axis=1)
    out = []
    for _ in range(n_seq):
        seq = [int(rng.integers(3, V))]
        for _ in range(length - 1):
            seq.append(min(int(np.searchsorted(cum[seq[-1]], rng.random())), V - 1))
        out.append(seq)
    return out


@pytest.fixture(scope="module")
def cipher() -> dict:
    """Public text and a victim stream from one chain; the victim's stream under a random permutation."""
    trans = _chain(0)
    rng = np.random.default_rng(1)
    public, private = _sample(trans, 3000, 20, rng), _sample(trans, 400, 20, rng)
    perm = torch.arange(V)
    perm[3:] = 3 + torch.randperm(V - 3, generator=torch.Generator().manual_seed(0))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(V)
    template = [5, 9]  # every sequence opens with the same two ids and closes with one
    stream = [[int(perm[t]) for t in template + seq + [7]] for seq in private]
    return {"public": public, "stream": stream, "text": [s[2:-1] for s in stream], "inv": inv}


def test_bigram_refinement_beats_frequency_ranks(cipher):
    res = decipher(cipher["stream"], cipher["public"], V, top_cipher=300, known=PINNED)
    a3 = decipher_metrics(res.initial, cipher["inv"], cipher["text"], exclude=PINNED)
    bigram = decipher_metrics(res.guess, cipher["inv"], cipher["text"], exclude=PINNED)
    assert bigram["stream_tokens"] > a3["stream_tokens"] + 0.1, (a3, bigram)
    assert bigram["ids_weighted"] > a3["ids_weighted"] + 0.1
    assert bigram["ids_unweighted"] > a3["ids_unweighted"]
    pairs = list(zip(res.log_likelihood[::2], res.log_likelihood[1::2]))  # (start, end) of each stage
    assert len(pairs) == len(res.moves) and all(end >= begin for begin, end in pairs)
    assert any(end > begin for begin, end in pairs)
    assert res.cpu_seconds > 0 and len(res.moves) >= 1
    # the initial key is A3 on the stripped stream, with the known ids read as themselves
    stripped = strip_shared(cipher["stream"])[0]
    c, p = token_counts(stripped, V), token_counts(cipher["public"], V)
    c[list(PINNED)], p[list(PINNED)] = -1, -1
    expected = frequency_attack(c, p)
    expected[list(PINNED)] = torch.tensor(PINNED)
    assert torch.equal(res.initial, expected)


def test_guess_is_one_to_one_and_keeps_known_ids(cipher):
    res = decipher(cipher["stream"], cipher["public"], V, top_cipher=120, known=PINNED)
    assert sorted(res.guess.tolist()) == list(range(V))
    assert res.guess[list(PINNED)].tolist() == list(PINNED)
    assert res.refined_ids.numel() == 120


def test_more_search_reads_more_than_a_tiny_budget(cipher):
    small = decipher(cipher["stream"], cipher["public"], V, top_cipher=300, known=PINNED, max_sweeps=0)
    assert torch.equal(small.guess, small.initial)  # no sweep: the rank key is returned unchanged


def test_strip_shared_removes_template_only():
    seqs = [[1, 2, 10, 11, 3], [1, 2, 12, 3], [1, 2, 13, 14, 15, 3]]
    out, shared = strip_shared(seqs)
    assert out == [[10, 11], [12], [13, 14, 15]]
    assert shared == {"prefix": [1, 2], "suffix": [3]}
    assert strip_shared([[1, 2, 3]]) == ([[1, 2, 3]], {"prefix": [], "suffix": []})
    same = strip_shared([[4, 5], [4, 5]])[0]  # identical sequences: everything is shared
    assert same == [[], []]


def test_metrics_on_a_hand_made_key():
    truth = torch.arange(6)
    guess = torch.tensor([0, 1, 2, 4, 3, 5])  # ids 3 and 4 read wrongly
    stream = [[1, 1, 1, 3], [2, 4, 5]]
    m = decipher_metrics(guess, truth, stream)
    assert m["distinct_ids"] == 5 and m["tokens"] == 7
    assert m["ids_unweighted"] == pytest.approx(3 / 5)
    assert m["ids_weighted"] == pytest.approx(5 / 7)
    assert m["stream_tokens"] == pytest.approx(5 / 7)
    excl = decipher_metrics(guess, truth, stream, exclude=[1])
    assert excl["ids_unweighted"] == pytest.approx(2 / 4) and excl["stream_tokens"] == pytest.approx(5 / 7)


def test_bigram_model_is_normalised_and_counts_stay_within_sequences():
    classes = np.array([0, 1, 2, 2])  # ids 2 and 3 share the "other" class 2
    counts = bigram_counts([[0, 1, 3], [1, 0]], classes, 3)
    dense = counts.to_dense()
    assert dense[0, 1] == 1 and dense[1, 2] == 1 and dense[1, 0] == 1 and dense.sum() == 3  # no (3 -> 1) pair
    logp = bigram_log_probs(counts, beta=2.0)
    assert np.allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="beta=0"):
        bigram_log_probs(counts, beta=0)


def test_decipher_refuses_bad_arguments():
    with pytest.raises(ValueError, match="top_cipher=1"):
        decipher([[1, 2]], [[1, 2]], 4, top_cipher=1)
    with pytest.raises(ValueError, match="plain_factor=0.5"):
        decipher([[1, 2]], [[1, 2]], 4, plain_factor=0.5)
    with pytest.raises(ValueError, match="empty"):
        decipher([[1, 2]], [[]], 4, strip=False)


@pytest.mark.parametrize(
    ("marker", "result"),
    [
        ("decipher-shaking", "benchmarks/results/decipher_shaking/decipher.md"),
        ("membership-controls", "benchmarks/results/membership_controls/controls.md"),
    ],
)
def test_docs_figures_are_copied_from_result_files(marker, result):
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "privacy_audit.md").read_text()
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    assert start in doc and end in doc, f"docs/privacy_audit.md lacks the {marker} section"
    section = doc.split(start)[1].split(end)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows, f"the {marker} section has no table"
    source = (root / result).read_text()
    for row in rows:
        assert row in source, f"{row!r} is not in {result}"
    assert result in section  # the doc names the file its figures come from
