"""Audit a tuned model for membership leakage at the end of ``fit``: members against held-out non-members.

Threat model: whoever can query the tuned model (the cloud, a recipient of the checkpoint, the public behind
an API) and holds candidate examples; it tries to tell the examples the model trained on from held-out ones
of the same distribution (:mod:`privtune.attacks.membership`, spec ``privacy_audit_and_flower.md`` §1).

At fit start the callback draws ``max_examples`` members from the training set and as many non-members from
the held-out split (equal size, disjoint, chosen by ``seed``) and, with ``reference=True``, scores them with the
model as it enters training: the untuned base model, the reference of the calibrated attack (Carlini et al.
2022, offline LiRA ratio form). At fit end it scores both sets with the tuned model and writes
``membership_report.json`` / ``.md`` (every attack's AUC and TPR at 1 % / 0.1 % FPR with bootstrap 95 %
intervals, and the negative control on the non-members' two halves) next to the run's logs, the directory
``TuningReport`` writes to. The positive control needs a deliberately overfit model and is run by
``benchmarks/membership_controls.py``; this callback reports each attack's negative control.

With :class:`~privtune.callbacks.embedding_shaking.EmbeddingShaking` (CypherTalk, Chen et al., arXiv 2403.07283)
in the same run, the model attacked is the one the data owner ends with: the tuned model after the run's
``recovery='horizontal'``, which reads plain ids with the plain tokenizer. That is the model the client uses and
may release, and the attacker of this threat model queries it with candidate examples in plain text; the shaken
model the cloud holds is attacked by :mod:`privtune.attacks` (token recovery), not here. The reference must live
in the same plain space, so the reference pass runs on the untuned model seen through the same recovery
(:class:`RecoveredView`, ``EmbeddingShaking.recovered_view``: exact, in place, undone after the pass); for a model
that enters the run plain and a key without vertical steps this is the untouched base model. The contract is
checked at setup; what it cannot serve is refused before any work: a run that releases the model shaken
(``recovery='none'``) and a reference with ``recovery='full'`` (not exact in place; use ``reference=False``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from privtune.attacks.membership import (
    ExampleStatistics,
    Task,
    example_statistics,
    member_split,
    membership_report,
)
from privtune.contracts import ContractError, conforms

DOCS = "docs/privacy_audit.md"


def _model(pl_module: pl.LightningModule, model_attr: str) -> nn.Module:
    """The ``nn.Module`` at ``model_attr`` (the :class:`~privtune.contracts.MembershipAuditable` contract)."""
    model = getattr(pl_module, model_attr, None)
    if isinstance(model, nn.Module):
        return model
    children = sorted(name for name, _ in pl_module.named_children())
    raise ContractError(
        f"MembershipAudit: `model_attr={model_attr!r}` names no model on {type(pl_module).__name__}; it must name "
        f"the attribute that holds the model, one of {children}. HINT: set `model_attr` (see {DOCS})."
    )


@runtime_checkable
class RecoveredView(Protocol):
    """A callback that keeps the model in another token space during training and can show the recovered one.

    ``recovery`` names what the run applies at the end (``none``, ``horizontal`` or ``full``);
    ``recovered_view(pl_module)`` is a context manager inside which the model (and the module's label words) is as
    the data owner will hold it after that recovery, restored exactly on exit. An optional ``shake_batches``
    attribute that is ``False`` says the datamodule's batches arrive already shaken. Implemented by
    :class:`~privtune.callbacks.embedding_shaking.EmbeddingShaking` (``horizontal`` only).
    """

    recovery: str

    def recovered_view(self, pl_module: pl.LightningModule) -> AbstractContextManager[None]: ...  # noqa: D102


class MembershipAudit(pl.Callback):
    """Membership inference against the tuned model at fit end (loss, reference, min-k %, zlib attacks).

    Args:
        nonmember_split: the datamodule split that holds the non-members (``test`` or ``val``); never trained on.
        max_examples: members and non-members each (``None``: as many as the smaller set has).
        seed: seed of the member / non-member draw and of the bootstrap.
        draws: bootstrap draws (>= 1000).
        k: the min-k % fraction (Shi et al. 2023: 0.2).
        task: ``auto`` (``label_word`` when batches carry one class index per example, else ``causal_lm``),
            ``causal_lm`` or ``label_word``.
        reference: score the examples with the model as it enters training (the untuned base) for the
            calibrated attack; under EmbeddingShaking, that model seen through the run's horizontal recovery.
        model_attr: attribute of the LightningModule that holds the model.
        output_dir: where ``membership_report.json`` / ``.md`` go; defaults to the trainer's log dir (or
            ``default_root_dir``).
        batch_size: batch size of the scoring passes (``None``: the training loader's).
        member_dataloader: the members, for a run without a datamodule (Python use; the dataset is sampled).
        nonmember_dataloader: the non-members, likewise.

    Raises:
        ValueError: for a split other than ``test``/``val``, ``max_examples < 2``, ``draws < 1000``, ``k`` outside
            ``(0, 1]`` or an unknown ``task``; at setup (``ContractError``) when the model or the data is missing,
            or when a shaking callback cannot give the plain-space model (``recovery='full'`` with ``reference``,
            batches that arrive shaken, several shaking callbacks); at fit start, before training, with
            ``recovery='none'``.
    """

    #: In a federated run the datamodule's training set is the round loop's ticks, not the clients' examples.
    federated_support: ClassVar[str] = "refuse"
    federated_alternative: ClassVar[str] = (
        "score the global model with privtune.attacks.membership.audit_model, members drawn from the examples of "
        "the clients that took part (docs/privacy_audit.md)"
    )

    def __init__(
        self,
        nonmember_split: Literal["test", "val"] = "test",
        max_examples: int | None = 200,
        seed: int = 0,
        draws: int = 1000,
        k: float = 0.2,
        task: Literal["auto", "causal_lm", "label_word"] = "auto",
        reference: bool = True,
        model_attr: str = "model",
        output_dir: str | None = None,
        batch_size: int | None = None,
        member_dataloader: DataLoader | None = None,
        nonmember_dataloader: DataLoader | None = None,
    ) -> None:
        errors = []
        if nonmember_split not in ("test", "val"):
            errors.append(f"`nonmember_split={nonmember_split!r}` must be 'test' or 'val' (a split never trained on).")
        if max_examples is not None and max_examples < 2:
            errors.append(f"`max_examples={max_examples}` must be >= 2 (or None for all).")
        if draws < 1000:
            errors.append(f"`draws={draws}` must be >= 1000 for a 95% bootstrap interval.")
        if not 0.0 < k <= 1.0:
            errors.append(f"`k={k}` must be in (0, 1].")
        if task not in ("auto", "causal_lm", "label_word"):
            errors.append(f"`task={task!r}` must be one of auto, causal_lm, label_word.")
        if batch_size is not None and batch_size < 1:
            errors.append(f"`batch_size={batch_size}` must be >= 1.")
        if (member_dataloader is None) != (nonmember_dataloader is None):
            errors.append(
                "Give both `member_dataloader` and `nonmember_dataloader`, or neither (then the datamodule's)."
            )
        if errors:
            raise ValueError(" ".join(errors))
        self.nonmember_split = nonmember_split
        self.max_examples = max_examples
        self.seed = seed
        self.draws = draws
        self.k = k
        self.task = task
        self.reference = reference
        self.model_attr = model_attr
        self.output_dir = output_dir
        self.batch_size = batch_size
        self._given = (member_dataloader, nonmember_dataloader)
        self._loaders: tuple[DataLoader, DataLoader] | None = None
        self._reference_stats: dict[str, ExampleStatistics] = {}
        self._view: RecoveredView | None = None
        self.report: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:  # noqa: D102
        return self._generate_state_key(nonmember_split=self.nonmember_split, seed=self.seed)

    @property
    def reference_statistics(self) -> dict[str, ExampleStatistics]:
        """``{"member", "nonmember"}`` statistics of the model at fit start (empty without ``reference``)."""
        return dict(self._reference_stats)

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _model(pl_module, self.model_attr)
        self._view = self._recovered_view(trainer)
        if self._given[0] is not None:
            return
        dm = getattr(trainer, "datamodule", None)
        wanted = ("train_dataloader", f"{self.nonmember_split}_dataloader")
        missing = [name for name in wanted if not callable(getattr(dm, name, None))]
        if dm is None or missing:
            raise ContractError(
                f"MembershipAudit needs a datamodule with {' and '.join(f'`{n}()`' for n in wanted)} (members and "
                f"held-out non-members); {'the run has no datamodule' if dm is None else f'it lacks {missing}'}. "
                f"HINT: pass `datamodule=` to `fit`, set `nonmember_split`, or give `member_dataloader` and "
                f"`nonmember_dataloader` (see {DOCS})."
            )

    def _recovered_view(self, trainer: pl.Trainer) -> RecoveredView | None:
        """The run's shaking callback (the :class:`RecoveredView` contract), checked against this audit's needs."""
        views = [cb for cb in trainer.callbacks if conforms(cb, RecoveredView)]
        if len(views) > 1:
            raise ContractError(
                f"MembershipAudit: {len(views)} callbacks keep the model in another token space "
                f"({', '.join(type(v).__name__ for v in views)}); the plain-space model is ambiguous. Use one."
            )
        view = views[0] if views else None
        if view is not None and getattr(view, "shake_batches", True) is False and self._given[0] is None:
            raise ContractError(
                f"MembershipAudit: {type(view).__name__}(shake_batches=False) means the batches arrive already shaken "
                "(e.g. ShakenTokenizer), so the audit's members and non-members would be shaken ids, not the plain "
                "text the attacker holds. HINT: give plain-id loaders as `member_dataloader` and "
                f"`nonmember_dataloader` (see {DOCS})."
            )
        if view is not None and view.recovery == "full" and self.reference:
            raise ContractError(
                f"MembershipAudit: `reference=True` with {type(view).__name__}(recovery='full'): the reference would "
                "be the untuned model after full recovery, which cannot be shown exactly in place. HINT: use "
                "`recovery='horizontal'` (the data owner's model reads plain ids, exactly), or `reference=False` "
                f"(no calibrated attack; see {DOCS})."
            )
        return view

    def _sample_loaders(self, trainer: pl.Trainer) -> tuple[DataLoader, DataLoader]:
        if self._given[0] is not None:
            members, nonmembers = self._given  # type: ignore[misc]
        else:
            dm = trainer.datamodule
            members = dm.train_dataloader()
            nonmembers = getattr(dm, f"{self.nonmember_split}_dataloader")()
        pools = []
        for role, loader in (("member", members), ("non-member", nonmembers)):
            dataset = getattr(loader, "dataset", None)
            if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
                raise ContractError(
                    f"MembershipAudit: the {role} loader's dataset must be map-style (`__len__`, `__getitem__`) so "
                    f"that examples can be drawn by index; got {type(dataset).__name__} (see {DOCS})."
                )
            pools.append(dataset)
        size = None if self.max_examples is None else min(self.max_examples, len(pools[0]), len(pools[1]))
        if min(len(pools[0]), len(pools[1])) < 2:
            raise ContractError(
                f"MembershipAudit needs >= 2 members and non-members, got {len(pools[0])} and {len(pools[1])}."
            )
        idx_in, idx_out = member_split(len(pools[0]), len(pools[1]), size=size, seed=self.seed)
        out = []
        for loader, dataset, idx in ((members, pools[0], idx_in), (nonmembers, pools[1], idx_out)):
            batch_size = self.batch_size or getattr(loader, "batch_size", None) or 16
            out.append(DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, collate_fn=loader.collate_fn))
        for role, loader in zip(("member", "non-member"), out):
            first = next(iter(loader))
            if not isinstance(first, Mapping) or "input_ids" not in first:
                kind = type(first).__name__ if not isinstance(first, Mapping) else f"dict with keys {sorted(first)}"
                raise ContractError(
                    f"MembershipAudit scores dict batches with `input_ids` (and `attention_mask`, `labels`), but the "
                    f"{role} loader yields a {kind}. HINT: give `member_dataloader` / `nonmember_dataloader` whose "
                    f"collate_fn returns such dicts (see {DOCS})."
                )
        return out[0], out[1]

    def _statistics(self, pl_module: pl.LightningModule, loader: DataLoader) -> ExampleStatistics:
        model = _model(pl_module, self.model_attr)
        task = self._resolve_task(loader)
        label_ids = getattr(pl_module, "label_token_ids", None)
        return example_statistics(
            model,
            _on_device(loader, pl_module.device),
            task=task,
            label_token_ids=label_ids if task == "label_word" else None,
            k=self.k,
            tokenizer=getattr(pl_module, "tokenizer", None),
        )

    def _resolve_task(self, loader: DataLoader) -> Task:
        if self.task != "auto":
            return self.task  # type: ignore[return-value]
        first = next(iter(loader))
        labels = first.get("labels") if isinstance(first, dict) else None
        return "label_word" if isinstance(labels, torch.Tensor) and labels.dim() == 1 else "causal_lm"

    def _check_plain(self, pl_module: pl.LightningModule) -> None:
        from privtune.shaking import shaking_state

        model = _model(pl_module, self.model_attr)
        try:
            state = shaking_state(model)
        except AttributeError:
            return
        if state == "shaken":
            raise ValueError(
                "MembershipAudit scores plain token ids, but the model is still shaken (EmbeddingShaking with "
                "`recovery='none'`). HINT: use `recovery='horizontal'` so that the tuned model reads plain ids at "
                f"fit end, or audit the recovered model with privtune.attacks.membership (see {DOCS})."
            )

    # ------------------------------------------------------------------ hooks
    def _plain_space(self, pl_module: pl.LightningModule) -> AbstractContextManager[None]:
        """The model in plain space: through the shaking callback's recovered view while it is shaken."""
        from privtune.shaking import shaking_state

        model = _model(pl_module, self.model_attr)
        if self._view is not None and self._view.recovery != "none" and shaking_state(model) == "shaken":
            return self._view.recovered_view(pl_module)
        self._check_plain(pl_module)
        return nullcontext()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loaders = self._sample_loaders(trainer)
        if self._view is not None and self._view.recovery == "none":
            self._check_plain(pl_module)  # one error before any step, not after training
        if self.reference and not self._reference_stats:  # a resumed run keeps the first start's reference
            with self._plain_space(pl_module):
                self._reference_stats = {
                    "member": self._statistics(pl_module, self._loaders[0]),
                    "nonmember": self._statistics(pl_module, self._loaders[1]),
                }

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaders is None:
            self._loaders = self._sample_loaders(trainer)
        self._check_plain(pl_module)
        start = time.perf_counter()
        members = self._statistics(pl_module, self._loaders[0])
        nonmembers = self._statistics(pl_module, self._loaders[1])
        ref = self._reference_stats if self.reference else {}
        report = membership_report(
            members,
            nonmembers,
            ref.get("member"),
            ref.get("nonmember"),
            draws=self.draws,
            seed=self.seed,
            meta={
                "task": self._resolve_task(self._loaders[0]),
                "nonmember_split": self.nonmember_split,
                "reference": self._reference_meta(),
                "steps": trainer.global_step,
                "k": self.k,
            },
        )
        report.meta["audit_seconds"] = round(time.perf_counter() - start, 1)
        self.report = report.to_dict()
        if trainer.logger is not None:
            metrics = {f"membership/{name}_auc": res.auc.value for name, res in report.attacks.items()}
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "membership_report.json").write_text(json.dumps(self.report, indent=2))
            text = "Membership inference (members vs held-out non-members, 95% bootstrap intervals)\n\n"
            (out / "membership_report.md").write_text(text + report.markdown() + "\n")
            rank_zero_info(f"\n{report.markdown()}\nMembership report written to {out}/membership_report.json")

    def _reference_meta(self) -> str | None:
        if not self.reference:
            return None
        if self._view is None:
            return "model at fit start"
        return f"model at fit start, seen through {type(self._view).__name__}'s recovery ({self._view.recovery})"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reference": {k: v.to_dict() for k, v in self._reference_stats.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ref = state_dict.get("reference", {}) or {}
        self._reference_stats = {k: ExampleStatistics.from_dict(v) for k, v in ref.items()}


def _on_device(loader: DataLoader, device: torch.device) -> Any:
    """Batches of ``loader`` with their tensors moved to ``device``."""
    for batch in loader:
        yield {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
