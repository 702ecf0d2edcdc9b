"""Membership inference: did the tuned model train on this example?

Threat model: an attacker who can query the released model (a tuned checkpoint, a plug-in model, a recovered
shaken model, a federated global model) for per-example losses, and who holds candidate examples; for the
calibrated attack it also holds the public base model the tuning started from. It wins if it tells the
training examples (*members*) from held-out examples of the same distribution (*non-members*). Spec:
``privacy_audit_and_flower.md`` §1.

Scores (higher means "member"), from per-example statistics (:func:`example_statistics`):

* ``loss``: ``-L_f(x)`` (Yeom et al. 2018, "Privacy risk in machine learning").
* ``reference``: ``-(L_f(x) - L_ref(x))`` with ``ref`` the untuned base model: the offline likelihood-ratio
  form of LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles"), i.e. difficulty
  calibration (Watson et al. 2022).
* ``min_k``: the mean of the lowest ``k`` = 20 % token log-probabilities of ``x`` (Shi et al. 2023,
  "Detecting Pretraining Data from Large Language Models"); decoders only.
* ``zlib``: ``-L_f(x) / len(zlib.compress(text))`` (Carlini et al. 2021, "Extracting Training Data from
  Large Language Models").

``L_f(x)`` is the task loss: the mean next-token loss of ``x`` for a causal LM, and for a verbalizer
classifier the loss of the gold label word (cross-entropy over the label words, the loss the classifier
trains on). For a classifier, ``min_k`` and ``zlib`` read the decoder's token log-probabilities of the
formatted example followed by its gold label word.

Metrics (:func:`evaluate_scores`): ROC AUC and TPR at 1 % and 0.1 % FPR (the low-FPR regime of Carlini et
al. 2022), each with a percentile bootstrap 95 % interval that resamples members and non-members
separately. Validity (:func:`control_verdicts`): an attack is *valid* only if its positive control (a
deliberately overfit model: AUC interval above 0.5) and its negative control (non-members scored half
against half: AUC interval containing 0.5) both pass; an invalid attack is reported, never used.

A frontier script drives it as::

    report = audit_model(tuned_model, member_loader, nonmember_loader, reference_model=base_model,
                         task="label_word", label_token_ids=dm.label_token_ids, tokenizer=tokenizer, seed=seed)
    verdicts = control_verdicts(positive_report, report)   # positive: the overfit model's report
    best = best_valid_attack(report, verdicts)               # None when no attack is valid
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privtune.models.scoring import classification_logits

Task = Literal["causal_lm", "label_word"]
ATTACKS = ("loss", "reference", "min_k", "zlib")
FPRS = (0.01, 0.001)


# ---------------------------------------------------------------------------------------------- splits
def member_split(
    member_pool: int, nonmember_pool: int, size: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Equal-size member and non-member index samples, chosen by ``seed``.

    Args:
        member_pool: number of examples the model trained on (indices ``0..member_pool-1``).
        nonmember_pool: number of held-out examples of the same distribution (indices into that set).
        size: examples per side; ``None``: as many as the smaller pool has.
        seed: seed of the draw (the same seed gives the same examples).

    Returns:
        ``(member_indices, nonmember_indices)``, each sorted, of the same length.

    Raises:
        ValueError: if a pool is empty or ``size`` exceeds the smaller pool.
    """
    if member_pool < 1 or nonmember_pool < 1:
        raise ValueError(f"Both pools need examples (members: {member_pool}, non-members: {nonmember_pool}).")
    largest = min(member_pool, nonmember_pool)
    size = largest if size is None else int(size)
    if not 1 <= size <= largest:
        raise ValueError(
            f"`size={size}` must be in [1, {largest}]: members {member_pool}, non-members {nonmember_pool}."
        )
    rng = np.random.default_rng(seed)
    members = np.sort(rng.choice(member_pool, size=size, replace=False))
    nonmembers = np.sort(rng.choice(nonmember_pool, size=size, replace=False))
    return members, nonmembers


def disjoint_split(indices: Sequence[int], sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Disjoint random parts of ``indices`` with the given sizes (e.g. members, non-members of one pool).

    Raises:
        ValueError: if the sizes add up to more than ``len(indices)`` or one is negative.
    """
    if any(s < 0 for s in sizes) or sum(sizes) > len(indices):
        raise ValueError(f"`sizes={list(sizes)}` do not fit in {len(indices)} examples.")
    order = np.random.default_rng(seed).permutation(np.asarray(indices))
    parts, start = [], 0
    for s in sizes:
        parts.append(np.sort(order[start : start + s]))
        start += s
    return parts


def half_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of ``range(n)`` (the negative control scores one against the other)."""
    if n < 2:
        raise ValueError(f"Splitting into halves needs at least 2 examples, got {n}.")
    a, b = disjoint_split(range(n), (n // 2, n // 2), seed=seed)
    return a, b


# ---------------------------------------------------------------------------------------------- metrics
def _as_array(scores: Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    if isinstance(scores, Tensor):
        scores = scores.detach().double().cpu().numpy()
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("Membership scores are empty.")
    if not np.all(np.isfinite(arr)):
        raise ValueError("Membership scores contain NaN or infinity; check the model's losses.")
    return arr


def roc_auc(members: Sequence[float] | np.ndarray | Tensor, nonmembers: Sequence[float] | np.ndarray | Tensor) -> float:
    """ROC AUC = P(score(member) > score(non-member)) + 0.5·P(tie) (Mann-Whitney U / (n_m n_n))."""
    m, n = _as_array(members), _as_array(nonmembers)
    return float(_auc_batch(m[None, :], n[None, :])[0])


def _auc_batch(m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """AUC of each row pair ``m [B, nm]``, ``n [B, nn]`` by average ranks (ties count one half)."""
    nm, nn_ = m.shape[1], n.shape[1]
    both = np.concatenate([m, n], axis=1)
    order = np.argsort(both, axis=1, kind="mergesort")
    sorted_vals = np.take_along_axis(both, order, axis=1)
    ranks_sorted = np.tile(np.arange(1, nm + nn_ + 1, dtype=np.float64), (both.shape[0], 1))
    # average ranks over runs of ties, row by row (ties are rare with float losses; the loop stays cheap)
    for row in range(both.shape[0]):
        vals = sorted_vals[row]
        if np.unique(vals).size == vals.size:
            continue
        _, start, counts = np.unique(vals, return_index=True, return_counts=True)
        for s, c in zip(start, counts):
            if c > 1:
                ranks_sorted[row, s : s + c] = ranks_sorted[row, s : s + c].mean()
    ranks = np.empty_like(ranks_sorted)
    np.put_along_axis(ranks, order, ranks_sorted, axis=1)
    rank_sum = ranks[:, :nm].sum(axis=1)
    return (rank_sum - nm * (nm + 1) / 2) / (nm * nn_)


def tpr_at_fpr(
    members: Sequence[float] | np.ndarray | Tensor, nonmembers: Sequence[float] | np.ndarray | Tensor, fpr: float
) -> float:
    """The true-positive rate at the strictest threshold whose false-positive rate is at most ``fpr``.

    The threshold is the ``(floor(fpr · n) + 1)``-th largest non-member score and "member" means a score
    strictly above it, so at most ``floor(fpr · n)`` non-members are flagged. With fewer than ``1 / fpr``
    non-members no non-member may be flagged at all (threshold = the largest non-member score).
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"`fpr={fpr}` must be in [0, 1).")
    m, n = _as_array(members), _as_array(nonmembers)
    return float(_tpr_batch(m[None, :], n[None, :], fpr)[0])


def _tpr_batch(m: np.ndarray, n: np.ndarray, fpr: float) -> np.ndarray:
    allowed = int(math.floor(fpr * n.shape[1] + 1e-9))
    threshold = -np.sort(-n, axis=1)[:, min(allowed, n.shape[1] - 1)]
    return (m > threshold[:, None]).mean(axis=1)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        """Whether ``x`` lies in ``[low, high]``."""
        return self.low <= x <= self.high


def bootstrap_metrics(
    members: Sequence[float] | np.ndarray | Tensor,
    nonmembers: Sequence[float] | np.ndarray | Tensor,
    *,
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    fprs: Sequence[float] = FPRS,
) -> dict[str, Interval]:
    """AUC and TPR at each FPR, each with a percentile bootstrap interval.

    Members and non-members are resampled separately (with replacement, each at its own size), as the two
    samples are drawn independently.

    Returns:
        ``{"auc": Interval, "tpr@1%": Interval, "tpr@0.1%": Interval}`` (one TPR key per ``fprs`` entry).

    Raises:
        ValueError: for ``draws < 1000`` or ``level`` outside ``(0, 1)``.
    """
    if draws < 1000:
        raise ValueError(f"`draws={draws}` must be >= 1000 for a 95% bootstrap interval.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level={level}` must be in (0, 1).")
    m, n = _as_array(members), _as_array(nonmembers)
    rng = np.random.default_rng(seed)
    tail = 100 * (1 - level) / 2
    out: dict[str, Interval] = {}
    chunk = 250  # draws per vectorised batch
    aucs, tprs = [], {f: [] for f in fprs}
    for start in range(0, draws, chunk):
        b = min(chunk, draws - start)
        mb = m[rng.integers(0, m.size, size=(b, m.size))]
        nb = n[rng.integers(0, n.size, size=(b, n.size))]
        aucs.append(_auc_batch(mb, nb))
        for f in fprs:
            tprs[f].append(_tpr_batch(mb, nb, f))

    def interval(point: float, samples: list[np.ndarray]) -> Interval:
        s = np.concatenate(samples)
        return Interval(point, float(np.percentile(s, tail)), float(np.percentile(s, 100 - tail)))

    out["auc"] = interval(roc_auc(m, n), aucs)
    for f in fprs:
        out[fpr_key(f)] = interval(tpr_at_fpr(m, n, f), tprs[f])
    return out


def fpr_key(fpr: float) -> str:
    """The report key of a TPR at ``fpr``: ``0.01`` -> ``"tpr@1%"``, ``0.001`` -> ``"tpr@0.1%"``."""
    return f"tpr@{100 * fpr:g}%"


# ---------------------------------------------------------------------------------------------- statistics
@dataclass
class ExampleStatistics:
    """Per-example statistics of one model on one set of examples (all ``[N]`` float64 arrays).

    Attributes:
        loss: the task loss ``L_f(x)`` (mean next-token loss, or the gold label word's loss).
        min_k: mean of the lowest ``k`` fraction of token log-probabilities (decoders; else ``None``).
        zlib_bytes: ``len(zlib.compress(text))`` of each example's text (``None`` without a tokenizer or texts).
    """

    loss: np.ndarray
    min_k: np.ndarray | None = None
    zlib_bytes: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ExampleStatistics:
        """The statistics of the examples at ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        return ExampleStatistics(
            self.loss[idx],
            None if self.min_k is None else self.min_k[idx],
            None if self.zlib_bytes is None else self.zlib_bytes[idx],
        )

    def to_dict(self) -> dict[str, list[float] | None]:
        """JSON-serialisable form (a checkpoint or a report may keep it)."""
        return {k: (None if v is None else [float(x) for x in v]) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExampleStatistics:
        """Inverse of :meth:`to_dict`."""
        arr = {k: (None if data.get(k) is None else np.asarray(data[k], dtype=np.float64)) for k in ("loss", "min_k")}
        z = data.get("zlib_bytes")
        return cls(arr["loss"], arr["min_k"], None if z is None else np.asarray(z, dtype=np.float64))


def zlib_length(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (the entropy proxy of Carlini et al. 2021)."""
    return len(zlib.compress(text.encode("utf-8")))


def _token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities ``[B, T-1]`` of every next token and the mask ``[B, T-1]`` of real targets."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    shift = logits.shape[1] - input_ids.shape[1]  # prompt tuning prepends virtual tokens
    logits = logits[:, shift:-1].float()
    targets = input_ids[:, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, attention_mask[:, 1:].bool()


def _min_k_mean(logp: Tensor, mask: Tensor, k: float) -> Tensor:
    """Mean of the lowest ``ceil(k · n)`` log-probabilities of each row's ``n`` real targets."""
    out = torch.empty(logp.shape[0], dtype=torch.float64)
    for row in range(logp.shape[0]):
        vals = logp[row][mask[row]]
        count = max(1, math.ceil(k * vals.numel()))
        out[row] = vals.sort().values[:count].double().mean() if vals.numel() else float("nan")
    return out


def _label_scores_and_token_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, label_token_ids: Tensor, labels: Tensor, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass of a decoder classifier on each row followed by its gold label word: the class scores
    ``[B, C]`` (the label words' logits at the last real token, as
    :func:`~privtune.models.scoring.label_word_logits` reads them: causal attention makes the appended token
    invisible there) and the token log-probabilities ``[B, T]`` with their mask, the label word included."""
    full_ids, full_mask = _append_label(input_ids, attention_mask, label_token_ids[labels], pad_id)
    out = model(input_ids=full_ids, attention_mask=full_mask, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    shift = logits.shape[1] - full_ids.shape[1]  # prompt tuning prepends virtual tokens
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = attention_mask.long().sum(dim=1) - 1
    scores = logits[rows, last + shift][:, label_token_ids]
    shifted = logits[:, shift:-1].float()
    logp = torch.log_softmax(shifted, dim=-1).gather(-1, full_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return scores, logp, full_mask[:, 1:].bool()


def _append_label(input_ids: Tensor, attention_mask: Tensor, label_ids: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Each row followed by its gold label word (right padding kept)."""
    lengths = attention_mask.long().sum(dim=1)
    ids = torch.cat([input_ids, torch.full_like(input_ids[:, :1], pad_id)], dim=1)
    mask = torch.cat([attention_mask, torch.zeros_like(attention_mask[:, :1])], dim=1)
    rows = torch.arange(ids.shape[0], device=ids.device)
    ids[rows, lengths] = label_ids
    mask[rows, lengths] = 1
    return ids, mask


@torch.no_grad()
def example_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    task: Task = "causal_lm",
    label_token_ids: Tensor | None = None,
    k: float = 0.2,
    tokenizer: Any = None,
    texts: Sequence[str] | None = None,
    token_stats: bool = True,
    batch_transform: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
) -> ExampleStatistics:
    """Per-example statistics of ``model`` on tokenized ``batches`` (the model is put in eval mode).

    Args:
        model: a Hugging Face causal LM (plain or peft-wrapped), or for ``task="label_word"`` any model
            :func:`privtune.models.scoring.classification_logits` accepts (a TextClassifier's ``model``).
        batches: dicts with ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]`` (right padding), and
            for ``label_word`` the class index ``labels`` ``[B]``.
        task: ``causal_lm`` (loss = mean next-token loss) or ``label_word`` (loss = cross-entropy of the
            gold label word among the label words).
        label_token_ids: ``[C]`` label-word ids of a decoder classifier (``None`` for an encoder's head).
        k: the fraction of lowest token log-probabilities that ``min_k`` averages (Shi et al.: 0.2).
        tokenizer: decodes each example for ``zlib`` (special tokens skipped) when ``texts`` is not given.
        texts: the examples' texts, in batch order (overrides ``tokenizer``).
        token_stats: compute ``min_k`` (decoders only; for a classifier from the same forward pass as the loss, on
            the example followed by its gold label word).
        batch_transform: maps each batch before the forward pass (e.g. shaking the ids of a shaken model).

    Raises:
        ValueError: for an unknown ``task``, ``k`` outside ``(0, 1]``, a batch without the keys the task
            needs, or ``texts`` of the wrong length.
    """
    if task not in ("causal_lm", "label_word"):
        raise ValueError(f"`task={task!r}` is not allowed; allowed: causal_lm, label_word.")
    if not 0.0 < k <= 1.0:
        raise ValueError(f"`k={k}` must be in (0, 1].")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    decoder = _is_causal(model)
    losses, mink, zbytes = [], [], []
    try:
        for raw in batches:
            plain_ids = raw["input_ids"]
            batch = batch_transform(raw) if batch_transform is not None else raw
            for key in ("input_ids", "attention_mask"):
                if key not in batch:
                    raise ValueError(f"Membership scoring needs `{key}` in every batch; a batch has {sorted(batch)}.")
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            if task == "label_word":
                labels = batch.get("labels")
                if labels is None or labels.dim() != 1:
                    raise ValueError(
                        "`task='label_word'` needs the class index `labels` [B] in every batch (a classification "
                        "datamodule's batches); use `task='causal_lm'` for language-model batches."
                    )
                labels = labels.to(device)
                lw = None if label_token_ids is None else label_token_ids.to(device)
                if token_stats and decoder and lw is not None:  # both from one forward pass
                    pad = int(getattr(getattr(model, "config", None), "pad_token_id", None) or 0)
                    scores, logp, tmask = _label_scores_and_token_logprobs(model, ids, mask, lw, labels, pad)
                    mink.append(_min_k_mean(logp.cpu(), tmask.cpu(), k))
                else:
                    scores = classification_logits(model, ids, mask, lw)
                losses.append(F.cross_entropy(scores.float(), labels, reduction="none").double().cpu())
            else:
                logp, tmask = _token_logprobs(model, ids, mask)
                nll = -(logp * tmask).sum(dim=1) / tmask.sum(dim=1).clamp_min(1)
                losses.append(nll.double().cpu())
                if token_stats:
                    mink.append(_min_k_mean(logp.cpu(), tmask.cpu(), k))
            if texts is None and tokenizer is not None:
                for row, row_mask in zip(plain_ids, raw["attention_mask"]):
                    text = tokenizer.decode(row[row_mask.bool()].tolist(), skip_special_tokens=True)
                    zbytes.append(zlib_length(text))
    finally:
        model.train(was_training)
    loss = torch.cat(losses).numpy() if losses else np.zeros(0)
    if texts is not None:
        if len(texts) != loss.shape[0]:
            raise ValueError(f"`texts` has {len(texts)} entries for {loss.shape[0]} examples.")
        zbytes = [zlib_length(t) for t in texts]
    return ExampleStatistics(
        loss=loss,
        min_k=torch.cat(mink).numpy() if mink else None,
        zlib_bytes=np.asarray(zbytes, dtype=np.float64) if zbytes else None,
    )


def _is_causal(model: nn.Module) -> bool:
    from privtune.models.blocks import is_decoder

    try:
        return is_decoder(model)
    except Exception:  # noqa: BLE001 - an unknown family is treated as "no token log-probabilities"
        return False


# ---------------------------------------------------------------------------------------------- scores
def attack_scores(stats: ExampleStatistics, reference: ExampleStatistics | None = None) -> dict[str, np.ndarray]:
    """Membership scores of every attack the statistics allow (higher means "member").

    ``loss`` always; ``reference`` with reference statistics; ``min_k`` with token statistics; ``zlib`` with
    compressed lengths.

    Raises:
        ValueError: if ``reference`` covers a different number of examples.
    """
    scores = {"loss": -stats.loss}
    if reference is not None:
        if len(reference) != len(stats):
            raise ValueError(f"Reference statistics cover {len(reference)} examples, the model's {len(stats)}.")
        scores["reference"] = -(stats.loss - reference.loss)
    if stats.min_k is not None:
        scores["min_k"] = stats.min_k
    if stats.zlib_bytes is not None:
        scores["zlib"] = -stats.loss / np.maximum(stats.zlib_bytes, 1.0)
    return scores


@dataclass
class AttackResult:
    """One attack's metrics (each an :class:`Interval`) on ``n_members`` against ``n_nonmembers``."""

    metrics: dict[str, Interval]
    n_members: int
    n_nonmembers: int

    @property
    def auc(self) -> Interval:  # noqa: D102
        return self.metrics["auc"]

    def to_dict(self) -> dict[str, Any]:
        """``{"auc": {"value", "low", "high"}, "tpr@1%": ..., "n_members", "n_nonmembers"}``."""
        out: dict[str, Any] = {name: asdict(iv) for name, iv in self.metrics.items()}
        out["n_members"], out["n_nonmembers"] = self.n_members, self.n_nonmembers
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttackResult:
        """Inverse of :meth:`to_dict`."""
        metrics = {k: Interval(**v) for k, v in data.items() if isinstance(v, Mapping)}
        return cls(metrics, int(data["n_members"]), int(data["n_nonmembers"]))


def evaluate_scores(
    members: np.ndarray | Sequence[float], nonmembers: np.ndarray | Sequence[float], *, draws: int = 1000, seed: int = 0
) -> AttackResult:
    """:func:`bootstrap_metrics` of one attack's scores, as an :class:`AttackResult`."""
    m, n = _as_array(members), _as_array(nonmembers)
    return AttackResult(bootstrap_metrics(m, n, draws=draws, seed=seed), int(m.size), int(n.size))


@dataclass
class MembershipReport:
    """Every attack on members vs non-members, and the negative control on the non-members' two halves.

    Attributes:
        attacks: ``{attack: AttackResult}`` members against non-members.
        negative: ``{attack: AttackResult}`` one half of the non-members against the other.
        meta: free-form context (model, split sizes, seed, task).
    """

    attacks: dict[str, AttackResult]
    negative: dict[str, AttackResult]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "attacks": {k: v.to_dict() for k, v in self.attacks.items()},
            "negative_control": {k: v.to_dict() for k, v in self.negative.items()},
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MembershipReport:
        """Inverse of :meth:`to_dict`."""
        return cls(
            {k: AttackResult.from_dict(v) for k, v in data["attacks"].items()},
            {k: AttackResult.from_dict(v) for k, v in data.get("negative_control", {}).items()},
            dict(data.get("meta", {})),
        )

    def markdown(self) -> str:
        """The report as a Markdown table (AUC and TPRs with their 95 % intervals)."""
        keys = list(next(iter(self.attacks.values())).metrics) if self.attacks else []
        head = "| attack | " + " | ".join(keys) + " | negative-control AUC |"
        lines = [head, "|" + "---|" * (len(keys) + 2)]
        for name, res in self.attacks.items():
            cells = [_fmt(res.metrics[k]) for k in keys]
            neg = _fmt(self.negative[name].auc) if name in self.negative else "-"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {neg} |")
        return "\n".join(lines)


def _fmt(iv: Interval) -> str:
    return f"{iv.value:.3f} [{iv.low:.3f}, {iv.high:.3f}]"


def membership_report(
    member_stats: ExampleStatistics,
    nonmember_stats: ExampleStatistics,
    member_reference: ExampleStatistics | None = None,
    nonmember_reference: ExampleStatistics | None = None,
    *,
    draws: int = 1000,
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
) -> MembershipReport:
    """Score every available attack on members against non-members, with the negative control.

    The negative control splits the non-members into two halves by ``seed`` and scores one against the
    other with the same attack: a sound attack finds nothing there (AUC interval contains 0.5).

    Raises:
        ValueError: if exactly one of the reference statistics is given, or a side has fewer than 2 examples.
    """
    if (member_reference is None) != (nonmember_reference is None):
        raise ValueError("Give reference statistics for both members and non-members, or for neither.")
    if len(member_stats) < 2 or len(nonmember_stats) < 2:
        raise ValueError(
            f"Membership inference needs >= 2 members and non-members, got {len(member_stats)} and "
            f"{len(nonmember_stats)}."
        )
    s_in = attack_scores(member_stats, member_reference)
    s_out = attack_scores(nonmember_stats, nonmember_reference)
    attacks = {name: evaluate_scores(s_in[name], s_out[name], draws=draws, seed=seed) for name in s_in if name in s_out}
    a, b = half_split(len(nonmember_stats), seed=seed)
    negative = {name: evaluate_scores(s_out[name][a], s_out[name][b], draws=draws, seed=seed) for name in attacks}
    info = {"draws": draws, "seed": seed, "n_members": len(member_stats), "n_nonmembers": len(nonmember_stats)}
    info.update(meta or {})
    return MembershipReport(attacks, negative, info)


# ---------------------------------------------------------------------------------------------- validity
def positive_control_passes(result: AttackResult) -> bool:
    """The positive control: on an overfit model the AUC interval lies above 0.5."""
    return result.auc.low > 0.5


def negative_control_passes(result: AttackResult) -> bool:
    """The negative control: non-members against non-members, the AUC interval contains 0.5."""
    return result.auc.contains(0.5)


def control_verdicts(positive: MembershipReport, negative: MembershipReport | None = None) -> dict[str, dict[str, Any]]:
    """Which attacks are valid: positive control on ``positive``, negative control on ``negative``'s halves.

    Args:
        positive: the report on a deliberately overfit non-private model.
        negative: the report whose non-member halves give the negative control (default: ``positive``'s).

    Returns:
        ``{attack: {"valid": bool, "positive": bool, "negative": bool, "reason": str}}``; an attack missing
        from one report is invalid.
    """
    negative = positive if negative is None else negative
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(positive.attacks) | set(negative.negative)):
        pos = name in positive.attacks and positive_control_passes(positive.attacks[name])
        neg = name in negative.negative and negative_control_passes(negative.negative[name])
        reasons = []
        if not pos:
            reasons.append("positive control failed (AUC interval on the overfit model does not exclude 0.5)")
        if not neg:
            reasons.append("negative control failed (AUC interval of non-members vs non-members excludes 0.5)")
        out[name] = {"valid": pos and neg, "positive": pos, "negative": neg, "reason": "; ".join(reasons) or "ok"}
    return out


def best_valid_attack(report: MembershipReport, valid: Mapping[str, Mapping[str, Any]] | Iterable[str]) -> str | None:
    """The valid attack with the highest AUC in ``report`` (``None`` if no attack is valid).

    Args:
        report: the audited model's report.
        valid: a :func:`control_verdicts` result, or the names of the valid attacks.
    """
    if isinstance(valid, Mapping):
        names = [k for k, v in valid.items() if v.get("valid")]
    else:
        names = list(valid)
    names = [n for n in names if n in report.attacks]
    if not names:
        return None
    return max(names, key=lambda n: report.attacks[n].auc.value)


def audit_model(
    model: nn.Module,
    member_batches: Iterable[Mapping[str, Tensor]],
    nonmember_batches: Iterable[Mapping[str, Tensor]],
    *,
    reference_model: nn.Module | None = None,
    task: Task = "causal_lm",
    label_token_ids: Tensor | None = None,
    tokenizer: Any = None,
    k: float = 0.2,
    draws: int = 1000,
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
) -> MembershipReport:
    """One call for a script (e.g. a privacy-utility frontier): score a model's members against non-members.

    The batches must be re-iterable (lists or DataLoaders) when ``reference_model`` is given, as they are read
    twice. Any model privtune produces can be passed: a tuned checkpoint, a plug-in model, a recovered shaken
    model, a federated global model (the HF model, not the LightningModule).

    Returns:
        :func:`membership_report` of every attack the inputs allow, with the negative control.
    """
    kwargs = {"task": task, "label_token_ids": label_token_ids, "k": k, "tokenizer": tokenizer}
    members = example_statistics(model, member_batches, **kwargs)
    nonmembers = example_statistics(model, nonmember_batches, **kwargs)
    ref_in = ref_out = None
    if reference_model is not None:
        ref_in = example_statistics(reference_model, member_batches, **{**kwargs, "tokenizer": None})
        ref_out = example_statistics(reference_model, nonmember_batches, **{**kwargs, "tokenizer": None})
    return membership_report(members, nonmembers, ref_in, ref_out, draws=draws, seed=seed, meta=meta)
