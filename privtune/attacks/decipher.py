"""Decipherment of a shaken token stream: the vocabulary permutation as a substitution cipher.

Threat model (spec ``cyphertalk.md`` §1, ``privacy_audit_and_flower.md`` §2): an honest-but-curious cloud
that sees every shaken id sequence ``c_t = pi(w_t)`` of the data owner's private tuning and inference, knows
the tokenizer and holds public text of the same kind, but not the key. Vertical operators change embedding
rows, never the ids, so only ``pi`` stands between the cloud and the text: a ciphertext-only attack on a
one-to-one substitution cipher over the vocabulary.

The attack (Knight et al. 2006, "Unsupervised analysis for decipherment problems"; Ravi & Knight 2008,
"Attacking decipherment problems optimally with low-order n-gram models"):

1. **Strip what every sequence shares** (:func:`strip_shared`): the prompt template's ids open and close
   every sequence, so an attacker removes the longest common prefix and suffix.
2. **Frequency ranks** (privtune's A3, :func:`privtune.attacks.frequency_attack`): the initial key matches
   cipher ids to public ids rank for rank by unigram frequency.
3. **Bigram refinement** (:func:`decipher`): maximise the log-likelihood of the deciphered stream under a
   smoothed bigram model of the public text, ``sum_t log P_pub(k(c_t) | k(c_{t-1}))``, over one-to-one maps
   ``k``, restricted to the ``top_cipher`` most frequent cipher ids (the rest keep their rank guess and share
   one "other" class) and the ``plain_factor * top_cipher`` most frequent public ids. The search is staged
   (the most frequent ids first, then more) greedy local search: each sweep scores every move of every
   free cipher id to every candidate plain id at once (a sparse-dense product), and the best few moves of
   each id are checked exactly, as a swap with the id that holds the plain id, and kept if the score rises.

Smoothing (decision): ``P(q | p) = (n(p, q) + beta * P_uni(q)) / (n(p) + beta)`` with add-one unigrams,
``beta = 10``. Metrics (:func:`decipher_metrics`): the share of distinct cipher ids read correctly
(unweighted), the same weighted by stream frequency, and the share of the stream's tokens read correctly.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from privtune.attacks.embedding_inversion import frequency_attack, token_counts


# ---------------------------------------------------------------------------------------------- stream handling
def strip_shared(sequences: Sequence[Sequence[int]]) -> tuple[list[list[int]], dict[str, list[int]]]:
    """Remove the longest prefix and suffix that every sequence shares (a prompt template), as an attacker can.

    Returns:
        ``(stripped sequences, {"prefix": ids, "suffix": ids})``; with one sequence nothing is stripped (a
        single sequence shares everything with itself).
    """
    seqs = [list(s) for s in sequences]
    if len(seqs) < 2:
        return seqs, {"prefix": [], "suffix": []}
    shortest = min(len(s) for s in seqs)
    pre = 0
    while pre < shortest and all(s[pre] == seqs[0][pre] for s in seqs):
        pre += 1
    suf = 0
    while suf < shortest - pre and all(s[-1 - suf] == seqs[0][-1 - suf] for s in seqs):
        suf += 1
    out = [s[pre : len(s) - suf] for s in seqs]
    return out, {"prefix": seqs[0][:pre], "suffix": seqs[0][len(seqs[0]) - suf :] if suf else []}


def bigram_counts(sequences: Iterable[Sequence[int]], classes: np.ndarray, num_classes: int) -> Tensor:
    """Sparse ``[num_classes, num_classes]`` counts of adjacent pairs within each sequence.

    Args:
        sequences: id sequences (bigrams never cross sequences).
        classes: ``[V]`` class of every id (``num_classes - 1`` is the "other" class).
        num_classes: the number of classes.
    """
    left, right = [], []
    for seq in sequences:
        arr = np.asarray(seq, dtype=np.int64)
        if arr.size < 2:
            continue
        cls = classes[arr]
        left.append(cls[:-1])
        right.append(cls[1:])
    if not left:
        return torch.sparse_coo_tensor(
            torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (num_classes,) * 2, check_invariants=True
        )
    pairs = np.concatenate(left) * num_classes + np.concatenate(right)
    uniq, cnt = np.unique(pairs, return_counts=True)
    idx = torch.from_numpy(np.stack([uniq // num_classes, uniq % num_classes]))
    return torch.sparse_coo_tensor(
        idx, torch.from_numpy(cnt.astype(np.float32)), (num_classes,) * 2, check_invariants=True
    ).coalesce()


def bigram_log_probs(counts: Tensor, beta: float = 10.0) -> np.ndarray:
    """Dense ``[M, M]`` float32 ``log P(q | p)`` of a smoothed bigram model from sparse counts ``[M, M]``.

    ``P(q | p) = (n(p, q) + beta * P_uni(q)) / (n(p) + beta)`` with add-one smoothed unigrams ``P_uni``.
    """
    if beta <= 0:
        raise ValueError(f"`beta={beta}` (bigram smoothing) must be > 0.")
    dense = counts.to_dense().double()
    unigram = dense.sum(dim=0) + dense.sum(dim=1)  # each token counted as left and right neighbour
    p_uni = (unigram + 1) / (unigram.sum() + unigram.numel())
    row = dense.sum(dim=1, keepdim=True)
    return torch.log((dense + beta * p_uni[None, :]) / (row + beta)).float().numpy()


# ---------------------------------------------------------------------------------------------- the attack
@dataclass
class DecipherResult:
    """The attacker's key and how it was found.

    Attributes:
        guess: ``[V]`` guessed plain id of every cipher id (the refined ids, the rank guess elsewhere).
        initial: ``[V]`` the frequency-rank guess (A3) the search started from.
        refined_ids: the cipher ids the bigram search assigned (the most frequent ones).
        log_likelihood: the stream's bigram log-likelihood at the start and the end of each stage (each stage
            has its own classes, so only a start and its end compare).
        cpu_seconds: process CPU time of the attack (counting, the A3 key and the search).
        moves: accepted moves per stage.
    """

    guess: Tensor
    initial: Tensor
    refined_ids: Tensor
    log_likelihood: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    moves: list[int] = field(default_factory=list)


class _Search:
    """Greedy staged local search over one-to-one maps (cipher classes -> plain classes)."""

    def __init__(
        self, cipher_bigrams: Tensor, log_p: np.ndarray, key: np.ndarray, proposals: int, fixed: np.ndarray
    ) -> None:
        self.C = cipher_bigrams  # sparse [K+1, K+1]
        self.fixed = fixed  # [K+1] cipher classes whose reading the attacker knows
        self.L = log_p  # [M+1, M+1]
        self.key = key  # [K+1] plain class of every cipher class; key[K] = M ("other")
        self.proposals = proposals
        num_plain = log_p.shape[0]
        self.holder = np.full(num_plain, -1, dtype=np.int64)  # cipher class holding each plain class
        self.holder[key[:-1]] = np.arange(key.shape[0] - 1)
        idx = cipher_bigrams.indices().numpy()
        val = cipher_bigrams.values().numpy().astype(np.float64)
        self.rows, self.cols, self.vals = idx[0], idx[1], val
        order_out = np.argsort(self.rows, kind="stable")
        order_in = np.argsort(self.cols, kind="stable")
        n = key.shape[0]
        self.out_ptr = np.searchsorted(self.rows[order_out], np.arange(n + 1))
        self.in_ptr = np.searchsorted(self.cols[order_in], np.arange(n + 1))
        self.order_out, self.order_in = order_out, order_in

    def score(self) -> float:
        return float((self.vals * self.L[self.key[self.rows], self.key[self.cols]]).sum())

    def _touching(self, classes: Sequence[int]) -> np.ndarray:
        parts = []
        for a in classes:
            parts.append(self.order_out[self.out_ptr[a] : self.out_ptr[a + 1]])
            parts.append(self.order_in[self.in_ptr[a] : self.in_ptr[a + 1]])
        return np.unique(np.concatenate(parts))

    def swap_delta(self, a: int, p_new: int) -> tuple[float, int]:
        """Exact score change of giving cipher class ``a`` plain class ``p_new`` (swapping with its holder)."""
        c = int(self.holder[p_new])
        p_old = int(self.key[a])
        edges = self._touching([a] if c < 0 else [a, c])
        r, q, v = self.rows[edges], self.cols[edges], self.vals[edges]
        kr, kq = self.key[r], self.key[q]
        before = (v * self.L[kr, kq]).sum()
        kr2, kq2 = kr.copy(), kq.copy()
        kr2[r == a], kq2[q == a] = p_new, p_new
        if c >= 0:
            kr2[r == c], kq2[q == c] = p_old, p_old
        return float((v * self.L[kr2, kq2]).sum() - before), c

    def apply(self, a: int, p_new: int, c: int) -> None:
        p_old = int(self.key[a])
        self.key[a] = p_new
        self.holder[p_new] = a
        if c >= 0:
            self.key[c] = p_old
            self.holder[p_old] = c
        else:
            self.holder[p_old] = -1

    def gains(self, candidates: int) -> np.ndarray:
        """``[K+1, cand]``: the log-likelihood of the bigrams touching ``a`` if ``a`` read as ``p``, the
        other ids keeping their current reading."""
        k_plain = torch.from_numpy(self.key)
        L = torch.from_numpy(self.L)
        out_term = torch.sparse.mm(self.C, L[:candidates][:, k_plain].T.contiguous())
        in_term = torch.sparse.mm(self.C.t().coalesce(), L[k_plain][:, :candidates].contiguous())
        return (out_term + in_term).numpy()

    def sweep(self, free: int, candidates: int) -> int:
        """One pass over cipher classes ``0..free-1``; plain classes ``0..candidates-1`` are the targets."""
        gain = self.gains(candidates)
        n_cls = self.key.shape[0]
        current = gain[np.arange(n_cls), np.minimum(self.key, candidates - 1)]
        holders = self.holder[:candidates]
        has_holder = holders >= 0
        safe_holders = np.where(has_holder, holders, 0)
        order = np.argsort(-(self.out_ptr[1 : free + 1] - self.out_ptr[:free]), kind="stable")  # busiest first
        moved = 0
        for a in order:
            if self.fixed[a]:
                continue
            p_old = min(int(self.key[a]), candidates - 1)
            # a swap's gain: a reads p, p's holder reads a's old plain id (exact up to a<->holder bigrams)
            partner = np.where(has_holder, gain[safe_holders, p_old] - current[safe_holders], 0.0)
            swap_gain = gain[a] - current[a] + partner
            swap_gain[p_old] = -np.inf
            blocked = has_holder & self.fixed[safe_holders]
            swap_gain[blocked] = -np.inf
            top = np.argpartition(-swap_gain, self.proposals)[: self.proposals]
            best, best_delta, best_c = -1, 1e-6, -1
            for p in top[np.argsort(-swap_gain[top])]:
                if swap_gain[p] <= -1e9:
                    break
                delta, c = self.swap_delta(int(a), int(p))
                if delta > best_delta:
                    best, best_delta, best_c = int(p), delta, c
            if best >= 0:
                self.apply(int(a), best, best_c)
                moved += 1
        return moved


def default_stages(top_cipher: int, first: int = 64) -> list[int]:
    """Stage sizes ``64, 128, 256, ...`` doubling up to ``top_cipher`` (the last stage frees all ``K`` ids)."""
    sizes, size = [], min(first, top_cipher)
    while size < top_cipher:
        sizes.append(size)
        size *= 2
    return [*sizes, top_cipher]


def decipher(
    cipher_sequences: Sequence[Sequence[int]],
    public_sequences: Sequence[Sequence[int]],
    vocab_size: int,
    *,
    top_cipher: int = 3000,
    plain_factor: float = 1.5,
    stages: Sequence[int] | None = None,
    max_sweeps: int = 20,
    proposals: int = 20,
    beta: float = 10.0,
    known: Sequence[int] = (),
    strip: bool = True,
    time_budget_s: float | None = None,
) -> DecipherResult:
    """Break a fixed vocabulary permutation from the cipher stream and public text alone.

    Args:
        cipher_sequences: the observed shaken id sequences.
        public_sequences: the attacker's public text, tokenized with the same tokenizer (plain ids).
        vocab_size: ``V``.
        top_cipher: the number of most frequent cipher ids the bigram search assigns (``K``).
        plain_factor: candidate plain ids = the ``plain_factor * K`` most frequent public ids.
        stages: growing numbers of free cipher ids (default :func:`default_stages`: 64, 128, ... doubling up to
            ``K``): the most frequent ids are settled first, then more join.
        max_sweeps: sweeps per stage (a stage stops early when a sweep moves nothing).
        proposals: moves per cipher id checked exactly per sweep.
        beta: bigram smoothing (see the module docstring).
        known: ids the attacker knows map to themselves (pinned special tokens); they keep that reading.
        strip: remove the prefix and suffix every cipher sequence shares (the template) first.
        time_budget_s: stop the search after this much CPU time (``None``: no limit).

    Raises:
        ValueError: for ``top_cipher < 2``, ``plain_factor < 1``, or no cipher or public tokens.
    """
    if top_cipher < 2:
        raise ValueError(f"`top_cipher={top_cipher}` must be >= 2.")
    if plain_factor < 1:
        raise ValueError(f"`plain_factor={plain_factor}` must be >= 1 (at least as many candidates as cipher ids).")
    start = time.process_time()
    cipher = strip_shared(cipher_sequences)[0] if strip else [list(s) for s in cipher_sequences]
    c_counts = token_counts(cipher, vocab_size)
    p_counts = token_counts(public_sequences, vocab_size)
    if float(c_counts.sum()) == 0 or float(p_counts.sum()) == 0:
        raise ValueError("Decipherment needs cipher tokens and public tokens; one of them is empty.")
    known_t = torch.tensor(sorted(set(known)), dtype=torch.long)
    if known_t.numel():  # the attacker reads known ids as themselves and ranks only the rest
        c_counts[known_t], p_counts[known_t] = -1.0, -1.0
    initial = frequency_attack(c_counts, p_counts)
    if known_t.numel():
        initial[known_t] = known_t
    # cipher ids the search assigns: the K most frequent observed ones (known ids keep their reading)
    seen = int((c_counts > 0).sum())
    k = min(top_cipher, seen)
    c_order = torch.argsort(c_counts, descending=True, stable=True)[:k].numpy()
    p_rank = torch.argsort(p_counts, descending=True, stable=True).numpy()
    n_public = int((p_counts > 0).sum())
    full = initial.numpy().copy()  # the attacker's reading of every cipher id, one-to-one throughout
    holder_of = np.empty_like(full)
    holder_of[full] = np.arange(vocab_size)
    fixed = set(known_t.tolist())
    history: list[float] = []
    moves: list[int] = []
    stage_sizes = list(stages) if stages is not None else default_stages(k)
    for free in stage_sizes:
        # Stage: the `free` most frequent cipher ids are classes, every other cipher id is one "other" class;
        # the plain side keeps the plain_factor * free most frequent public ids plus "other", so that both
        # "other" classes stand for the rarer tokens (the unsettled ids' guesses are not trusted yet).
        free = min(free, k)
        m = max(min(int(plain_factor * free), n_public), free)
        p_order = p_rank[:m]
        c_class = np.full(vocab_size, free, dtype=np.int64)
        c_class[c_order[:free]] = np.arange(free)
        p_class = np.full(vocab_size, m, dtype=np.int64)
        p_class[p_order] = np.arange(m)
        key = np.empty(free + 1, dtype=np.int64)
        key[:free] = p_class[full[c_order[:free]]]
        key[free] = m
        outside = np.nonzero(key[:free] >= m)[0]  # a guess among the rarer public ids: give it a free candidate
        if outside.size:
            unused = np.setdiff1d(np.arange(m), key[:free][key[:free] < m])
            key[outside[: unused.size]] = unused[: outside.size]
        fixed_class = np.zeros(free + 1, dtype=bool)
        fixed_class[free] = True
        fixed_class[[i for i in range(free) if int(c_order[i]) in fixed]] = True
        if np.unique(key[:free][key[:free] < m]).size != int((key[:free] < m).sum()):
            raise RuntimeError("Decipherment key is not one-to-one (internal error).")
        log_p = bigram_log_probs(bigram_counts(public_sequences, p_class, m + 1), beta=beta)
        search = _Search(bigram_counts(cipher, c_class, free + 1), log_p, key, min(proposals, m - 1), fixed_class)
        history.append(search.score())
        stage_moves = 0
        for _ in range(max_sweeps):
            if time_budget_s is not None and time.process_time() - start > time_budget_s:
                break
            moved = search.sweep(free, m)
            stage_moves += moved
            if moved == 0:
                break
        moves.append(stage_moves)
        history.append(search.score())
        for i in np.nonzero(search.key[:free] < m)[0]:  # swap each settled reading in (stays one-to-one)
            a, p = int(c_order[i]), int(p_order[search.key[i]])
            h, old = int(holder_of[p]), int(full[a])
            full[a], full[h] = p, old
            holder_of[p], holder_of[old] = a, h
    guess = torch.from_numpy(full)
    refined = torch.from_numpy(c_order)
    return DecipherResult(
        guess=guess,
        initial=initial,
        refined_ids=refined,
        log_likelihood=history,
        cpu_seconds=time.process_time() - start,
        moves=moves,
    )


# ---------------------------------------------------------------------------------------------- metrics
def decipher_metrics(
    guess: Tensor, truth: Tensor, cipher_sequences: Sequence[Sequence[int]], exclude: Sequence[int] = ()
) -> dict[str, Any]:
    """How much of the stream a key reads.

    Args:
        guess: ``[V]`` the attacker's plain id for every cipher id.
        truth: ``[V]`` the true plain id of every cipher id (``pi^-1``; evaluation only).
        cipher_sequences: the stream to read (e.g. the victim's stripped training stream).
        exclude: cipher ids left out of the id rates (pinned ids map to themselves and hide nothing).

    Returns:
        ``{"ids_unweighted", "ids_weighted", "stream_tokens", "distinct_ids", "tokens"}``: the share of the
        distinct cipher ids seen in the stream that are read correctly, the same weighted by their stream
        frequency, and the share of all stream tokens read correctly.
    """
    counts = token_counts(cipher_sequences, truth.numel())
    correct = (guess == truth).float()
    seen = counts > 0
    if len(exclude):
        seen[torch.tensor(list(exclude), dtype=torch.long)] = False
    total_tokens = float(counts.sum())
    w = counts[seen]
    return {
        "ids_unweighted": float(correct[seen].mean()) if bool(seen.any()) else 0.0,
        "ids_weighted": float((correct[seen] * w).sum() / w.sum()) if float(w.sum()) > 0 else 0.0,
        "stream_tokens": float((correct * counts).sum() / total_tokens) if total_tokens > 0 else 0.0,
        "distinct_ids": int(seen.sum()),
        "tokens": int(total_tokens),
    }
