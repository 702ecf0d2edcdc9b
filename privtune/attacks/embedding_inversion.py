"""Embedding-inversion attacks on a shaken model: table matching, anchors, frequency, learned inversion.

These attacks measure the privacy of CypherTalk shaking (arXiv 2403.07283, spec ``cyphertalk.md`` §6) and of
any noisy embedding (``related.md`` §6.1). Threat model: an honest-but-curious cloud that holds the public
original table ``E``, the shaken tables ``E_s``/``W_s``, the shaken id traffic and public reference text,
but not the key. The attack designs are a reconstruction:

* **A1 table matching** (:func:`table_matching`): ``t(j) = argmax_t cos(norm(E_s[j]), norm(E[t]))`` with
  ``norm`` the per-column standardisation, which removes ``addv`` and ``inflate`` exactly.
* **A2 anchor-aligned matching** (:func:`anchor_aligned_matching`): fit an affine map (ridge least squares,
  or orthogonal Procrustes) from shaken to public rows on known pairs (pinned specials, template tokens),
  then A1. It undoes the linear operators; only noise resists it.
* **A3 frequency analysis** (:func:`frequency_attack`): match shaken ids to public ids rank-for-rank by
  unigram frequency (a substitution-cipher attack on ``pi``, blind to vertical noise).
* **A4 combined** (:func:`combined_attack`): similarity plus a frequency prior as the score of a one-to-one
  assignment. A Hungarian assignment over ``V = 49,152`` is out of reach (``V^2`` scores), so A4 assigns
  greedily over each row's top-``k`` candidates, best score first (a documented approximation).
* **Every table the cloud holds** (:func:`model_attack_report`): A1-A4 run against the input embedding and,
  when it is a tensor of its own, the LM head (against the public head), and ``A`` is the maximum over
  both. A head that is only permuted is the public table re-indexed, so it gives ``pi`` away whatever
  noise the embedding carries: attacking the embedding alone would overstate the privacy.
* **Learned inversion** (:class:`InversionProbe`): a linear decoder from hidden states to token ids,
  trained on the public model's hidden states of public text (Song & Raghunathan, arXiv 2004.00053) and
  applied to the shaken model's hidden states of private traffic. Awareness recovery trains exactly
  these hidden states to match the public model's, so this attack tests what recovery gives away.

The privacy figure is the top-1 token recovery rate (:func:`recovery_rate`) over the rows the key hides
(pinned ids excluded), unweighted and weighted by token frequency.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from privtune.models.blocks import get_lm_head, unwrap


# ---------------------------------------------------------------------------------------------- helpers
def standardize(table: Tensor) -> Tensor:
    """Per-column standardisation ``(E - mean_col) / std_col`` in float32, ``[V, d]``."""
    t = table.detach().float()
    return (t - t.mean(dim=0)) / t.std(dim=0).clamp_min(1e-12)


def nearest_rows(query: Tensor, reference: Tensor, k: int = 5, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Top-``k`` cosine neighbours in ``reference`` ``[V, d]`` of each row of ``query`` ``[N, d]``.

    Returns:
        ``(indices [N, k], scores [N, k])``.
    """
    q = nn.functional.normalize(query.float(), dim=1)
    r = nn.functional.normalize(reference.float(), dim=1)
    idx, val = [], []
    for start in range(0, q.shape[0], chunk):  # [chunk, V] similarities at a time
        sims = q[start : start + chunk] @ r.T
        v, i = sims.topk(min(k, r.shape[0]), dim=1)
        idx.append(i)
        val.append(v)
    return torch.cat(idx), torch.cat(val)


def recovery_rate(candidates: Tensor, truth: Tensor, weights: Tensor | None = None) -> dict[str, float]:
    """Top-1 and top-``k`` recovery: the share of rows whose true plain id is among the candidates.

    Args:
        candidates: ``[N]`` guesses or ``[N, k]`` ranked guesses.
        truth: ``[N]`` true plain ids.
        weights: optional ``[N]`` weights (token frequencies) for the weighted rates.
    """
    if candidates.dim() == 1:
        candidates = candidates[:, None]
    hit1 = (candidates[:, 0] == truth).float()
    hitk = (candidates == truth[:, None]).any(dim=1).float()
    out = {"top1": float(hit1.mean()), f"top{candidates.shape[1]}": float(hitk.mean())}
    if weights is not None and float(weights.sum()) > 0:
        w = weights.float() / weights.float().sum()
        out["top1_weighted"] = float((hit1 * w).sum())
    return out


# ---------------------------------------------------------------------------------------------- A1, A2
def table_matching(shaken: Tensor, original: Tensor, rows: Tensor | None = None, k: int = 5) -> tuple[Tensor, Tensor]:
    """A1: for shaken rows ``rows`` (default all), the top-``k`` public ids by standardised cosine.

    Args:
        shaken: ``E_s`` ``[V, d]``.
        original: public ``E`` ``[V', d]``.
        rows: ``[N]`` shaken row ids to attack (a sample keeps the ``N x V'`` product cheap).
        k: candidates per row.

    Returns:
        ``(candidates [N, k], scores [N, k])``.
    """
    zs, zo = standardize(shaken), standardize(original)
    query = zs if rows is None else zs[rows]
    return nearest_rows(query, zo, k=k)


def fit_alignment(source: Tensor, target: Tensor, method: str = "affine", ridge: float = 1e-2) -> tuple[Tensor, Tensor]:
    """Map ``source @ M + b ~ target`` on anchor pairs (rows of both ``[A, d]``).

    ``affine``: ridge least squares (well-posed with fewer anchors than dimensions); ``procrustes``:
    orthogonal ``M`` with ``b`` from the means.

    Raises:
        ValueError: for an unknown ``method`` or no anchors.
    """
    if method not in ("affine", "procrustes"):
        raise ValueError(f"`method={method!r}` is not allowed; allowed: affine, procrustes.")
    if source.shape[0] == 0:
        raise ValueError("Anchor-aligned matching needs at least one anchor pair.")
    x, y = source.double(), target.double()
    mx, my = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - mx, y - my
    if method == "procrustes":
        u, _, vh = torch.linalg.svd(xc.T @ yc)
        m = u @ vh
    else:
        d = x.shape[1]
        # ridge towards the identity: with few anchors the map stays close to "no change"
        m = torch.linalg.solve(
            xc.T @ xc + ridge * torch.eye(d, dtype=x.dtype), xc.T @ yc + ridge * torch.eye(d, dtype=x.dtype)
        )
    b = my - mx @ m
    return m.float(), b.float()


def anchor_aligned_matching(
    shaken: Tensor,
    original: Tensor,
    anchors_shaken: Tensor,
    anchors_plain: Tensor,
    rows: Tensor | None = None,
    k: int = 5,
    method: str = "affine",
    ridge: float = 1e-2,
) -> tuple[Tensor, Tensor]:
    """A2: align the standardised shaken table on known pairs, then A1.

    Args:
        anchors_shaken: ``[A]`` shaken ids whose plain ids the attacker knows...
        anchors_plain: ``[A]`` ...and those plain ids (pinned specials map to themselves).
    """
    zs, zo = standardize(shaken), standardize(original)
    m, b = fit_alignment(zs[anchors_shaken], zo[anchors_plain], method=method, ridge=ridge)
    aligned = (zs if rows is None else zs[rows]) @ m + b
    return nearest_rows(aligned, zo, k=k)


# ---------------------------------------------------------------------------------------------- A3, A4
def token_counts(sequences: Iterable[Sequence[int]] | Tensor, vocab_size: int) -> Tensor:
    """Unigram counts ``[V]`` of id sequences (negative ids, e.g. ``-100``, are skipped)."""
    if isinstance(sequences, Tensor):
        flat = sequences.reshape(-1)
    else:
        flat = torch.tensor([i for seq in sequences for i in seq], dtype=torch.long)
    flat = flat[(flat >= 0) & (flat < vocab_size)]
    return torch.bincount(flat, minlength=vocab_size).float()


def frequency_attack(shaken_counts: Tensor, public_counts: Tensor) -> Tensor:
    """A3: guess ``[V]`` plain id for every shaken id by matching frequency ranks.

    Ties and unseen ids fall back to the id order (a stable sort), which is what an attacker without more
    information gets.
    """
    order_s = torch.argsort(shaken_counts, descending=True, stable=True)
    order_p = torch.argsort(public_counts, descending=True, stable=True)
    guess = torch.empty_like(order_s)
    guess[order_s] = order_p
    return guess


def combined_attack(
    shaken: Tensor,
    original: Tensor,
    shaken_counts: Tensor,
    public_counts: Tensor,
    rows: Tensor | None = None,
    k: int = 10,
    beta: float = 0.1,
    anchors: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """A4: similarity (A1, or A2 with ``anchors``) plus a frequency prior, assigned one-to-one greedily.

    ``score(j, t) = cos(j, t) - beta * |log p_s(j) - log p(t)|`` with add-one smoothed unigram
    probabilities; pairs are taken best score first, each shaken row and plain id at most once; rows
    left without a pair keep their best candidate.

    Returns:
        ``[N]`` guessed plain ids for the attacked rows.
    """
    if anchors is None:
        cand, sims = table_matching(shaken, original, rows=rows, k=k)
    else:
        cand, sims = anchor_aligned_matching(shaken, original, anchors[0], anchors[1], rows=rows, k=k)
    row_ids = torch.arange(shaken.shape[0]) if rows is None else rows
    log_ps = torch.log((shaken_counts + 1) / (shaken_counts.sum() + shaken_counts.numel()))
    log_pp = torch.log((public_counts + 1) / (public_counts.sum() + public_counts.numel()))
    score = sims - beta * (log_ps[row_ids][:, None] - log_pp[cand]).abs()  # [N, k]
    order = torch.argsort(score.reshape(-1), descending=True)
    guess = cand[:, 0].clone()
    row_done = torch.zeros(cand.shape[0], dtype=torch.bool)
    used = torch.zeros(original.shape[0], dtype=torch.bool)
    flat_rows = torch.arange(cand.shape[0]).repeat_interleave(cand.shape[1])
    flat_cand = cand.reshape(-1)
    for pos in order.tolist():
        r, t = int(flat_rows[pos]), int(flat_cand[pos])
        if row_done[r] or used[t]:
            continue
        guess[r], row_done[r], used[t] = t, True, True
    return guess


# ---------------------------------------------------------------------------------------------- learned inversion
@torch.no_grad()
def hidden_states(model: nn.Module, input_ids: Tensor, layer: int, attention_mask: Tensor | None = None) -> Tensor:
    """Hidden states ``[B, T, d]`` after block ``layer`` (0: the embedding output) of a Hugging Face model."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer]


class InversionProbe(nn.Module):
    """A learned inversion: a linear decoder from hidden states ``[..., d]`` to vocabulary logits ``[..., V]``."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:  # noqa: D102
        return self.decoder(hidden)

    def fit(self, hidden: Tensor, ids: Tensor, steps: int = 200, lr: float = 1e-2, batch: int = 2048) -> InversionProbe:
        """Train on pairs of public hidden states ``[N, d]`` and their plain ids ``[N]`` (Adam, CE)."""
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            pick = torch.randint(hidden.shape[0], (min(batch, hidden.shape[0]),), generator=gen)
            loss = nn.functional.cross_entropy(self(hidden[pick].float()), ids[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self

    @torch.no_grad()
    def predict(self, hidden: Tensor) -> Tensor:
        """Guessed plain ids for hidden states ``[N, d]``."""
        return self(hidden.float()).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------- report
def attack_report(
    shaken: Tensor,
    original: Tensor,
    truth: Tensor,
    *,
    known: Sequence[int] = (),
    shaken_counts: Tensor | None = None,
    public_counts: Tensor | None = None,
    sample: int | None = 2000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Run A1-A4 against a shaken table and score them; ``A`` is the maximum top-1 over the attacks run.

    Args:
        shaken: ``E_s`` ``[V, d]`` (what the cloud holds).
        original: public ``E`` ``[V, d]``.
        truth: ``[V]`` the true plain id of every shaken row, ``pi^-1`` (evaluation only; the attacks never
            read it).
        known: shaken ids whose plain id the attacker knows and that map to themselves (the pinned specials);
            they serve as A2 anchors and are excluded from the scored rows.
        shaken_counts: unigram counts of the observed shaken traffic (enables A3, A4).
        public_counts: unigram counts of public reference text.
        sample: score a random sample of this many hidden rows (``None``: all).
        seed: seed of the row sample.

    Returns:
        ``{"A1": {...}, "A2": {...}, "A3": {...}, "A4": {...}, "A": {"top1": max}}``.
    """
    v = shaken.shape[0]
    hidden_rows = torch.ones(v, dtype=torch.bool)
    hidden_rows[list(known)] = False
    rows = torch.nonzero(hidden_rows).squeeze(1)
    if sample is not None and rows.numel() > sample:
        gen = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(rows.numel(), generator=gen)[:sample]].sort().values
    target = truth[rows]
    weights = shaken_counts[rows] if shaken_counts is not None else None
    report: dict[str, dict[str, float]] = {}
    cand, _ = table_matching(shaken, original, rows=rows, k=5)
    report["A1"] = recovery_rate(cand, target, weights)
    if len(known) > 0:
        anchors = torch.tensor(list(known), dtype=torch.long)
        cand, _ = anchor_aligned_matching(shaken, original, anchors, anchors, rows=rows, k=5)
        report["A2"] = recovery_rate(cand, target, weights)
    if shaken_counts is not None and public_counts is not None:
        report["A3"] = recovery_rate(frequency_attack(shaken_counts, public_counts)[rows], target, weights)
        anchors_pair = None
        if len(known) > 0:
            anchors_pair = (torch.tensor(list(known)), torch.tensor(list(known)))
        guess = combined_attack(shaken, original, shaken_counts, public_counts, rows=rows, anchors=anchors_pair)
        report["A4"] = recovery_rate(guess, target, weights)
    report["A"] = {"top1": max(r["top1"] for r in report.values())}
    return report


def vocabulary_tables(model: nn.Module) -> dict[str, Tensor]:
    """The vocabulary tables ``[V, d]`` of a Hugging Face model: ``embedding`` and, if untied, ``head``."""
    hf = unwrap(model)
    emb = hf.get_input_embeddings().weight
    tables = {"embedding": emb.detach()}
    head = get_lm_head(hf)
    if head is not None and head.weight is not emb and head.weight.shape == emb.shape:
        tables["head"] = head.weight.detach()
    return tables


def model_attack_report(
    shaken_model: nn.Module,
    public_model: nn.Module,
    truth: Tensor,
    **kwargs,
) -> dict[str, dict]:
    """:func:`attack_report` against every vocabulary table of ``shaken_model`` that the cloud holds.

    The shaken embedding is attacked with the public embedding; a separate shaken head with the public
    head (the public embedding when the public model ties them). A tied shaken head is the embedding itself
    and is not attacked twice.

    Args:
        shaken_model: the model the cloud holds.
        public_model: the public base model.
        truth: ``[V]`` true plain id of every shaken row (``pi^-1``; evaluation only).
        **kwargs: passed to :func:`attack_report` (``known``, counts, ``sample``, ``seed``).

    Returns:
        ``{"embedding": report, "head": report (if untied), "A": {"top1": max over tables, "table": which}}``.
    """
    public = vocabulary_tables(public_model)
    out: dict[str, dict] = {}
    for name, table in vocabulary_tables(shaken_model).items():
        out[name] = attack_report(table, public.get(name, public["embedding"]), truth, **kwargs)
    worst = max(out, key=lambda name: out[name]["A"]["top1"])
    out["A"] = {"top1": out[worst]["A"]["top1"], "table": worst}
    return out


class EmbeddingRegressionProbe:
    """A learned inversion that scales to large vocabularies: ridge-regress hidden states onto the public
    embedding of their token, then decode by nearest neighbour in ``E`` (no ``d x V`` decoder to train).

    Fit on the public model's hidden states of public text; apply to the shaken model's hidden states of the
    private traffic.
    """

    def __init__(self, ridge: float = 1e-2) -> None:
        self.ridge = ridge
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def fit(self, hidden: Tensor, ids: Tensor, table: Tensor) -> EmbeddingRegressionProbe:
        """Least squares from hidden states ``[N, d_h]`` to ``table[ids]`` ``[N, d]``."""
        x, y = hidden.double(), table[ids].double()
        mx, my = x.mean(dim=0), y.mean(dim=0)
        xc = x - mx
        gram = xc.T @ xc + self.ridge * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype)
        self.weight = torch.linalg.solve(gram, xc.T @ (y - my)).float()
        self.bias = (my - mx @ self.weight.double()).float()
        return self

    @torch.no_grad()
    def predict(self, hidden: Tensor, table: Tensor, k: int = 1) -> Tensor:
        """Guessed plain ids ``[N]`` (``k > 1``: ``[N, k]``) by cosine nearest neighbour in ``table``."""
        if self.weight is None:
            raise ValueError("Call `fit` before `predict`.")
        cand, _ = nearest_rows(hidden.float() @ self.weight + self.bias, table, k=k)
        return cand[:, 0] if k == 1 else cand
