"""Membership inference against the offsite recipe's delivered models: each arm's plug-in and full fine-tuning.

Offsite-Tuning (arXiv 2302.04870) and ScaleOT (arXiv 2412.09812) deliver the *plug-in* model: the adapters the data
owner tuned through the emulator, written into the original model. The privacy audit (docs/privacy_audit.md) asks
what that model reveals about the data owner's training examples. :class:`PlugInAudit` draws the examples once per
run and scores every model the recipe hands it with the attacks of :mod:`privtune.attacks.membership`:

* members: the data owner's training split (the examples the adapters were tuned on);
* non-members: its held-out test split (never trained on), as many as the members, drawn by ``seed``;
* reference: the untuned base model (the full model before any tuning) for the calibrated attack (Carlini et al.
  2022, offline LiRA ratio form).

Each example is scored as :class:`~privtune.callbacks.MembershipAudit` scores a
:class:`~privtune.modules.TextClassifier`: the loss of the gold label word among the label words (the loss the
classifier trains on and the scores its accuracy is read from), plus min-k % and zlib on decoders. This is
:func:`~privtune.attacks.membership.audit_model`'s computation, with the reference statistics computed once per run
(the base model and the examples are the same for every arm). The report is
:func:`~privtune.attacks.membership.membership_report`'s, the schema of ``membership_report.json``.

Threat model: whoever can query the delivered model for per-example losses and holds candidate examples (the model
owner, who receives nothing else from the data owner; or anyone the plug-in model is released to); it also holds the
public base model. Lightning-free: a datamodule is read through ``train_dataloader`` / ``test_dataloader`` only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from privtune.attacks.membership import ExampleStatistics, example_statistics, member_split, membership_report


def _autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """The evaluation's reduced precision (``bf16-*`` / ``16-*``), so that losses are read as accuracy is."""
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def _on_device(loader: DataLoader, device: torch.device) -> Iterator[Mapping[str, Tensor]]:
    for batch in loader:
        yield {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


class _Batches:
    """A re-iterable view of ``loader``'s batches on ``device`` (the statistics read each set more than once)."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[Mapping[str, Tensor]]:
        return _on_device(self.loader, self.device)


class PlugInAudit:
    """Members (training split) against as many held-out non-members (test split), drawn once; one report per model.

    Args:
        datamodule: the data owner's classification datamodule, set up (its ``train_dataloader`` and
            ``test_dataloader`` datasets are the pools; their ``label_token_ids`` the label words).
        examples: at most this many members and as many non-members (the smaller pool caps both).
        seed: seed of the draw, the bootstrap and the negative control's halves.
        device: where the models are scored.
        precision: the evaluation's Lightning precision string (``32-true``, ``bf16-mixed``, ...).
        reference_model: the untuned base model for the calibrated attack; ``None`` for none. Scored here, once,
            and not kept.
        tokenizer: decodes the examples for the zlib attack (``None``: no zlib attack).
        meta: recorded in every report's ``meta`` (e.g. the data owner's epochs over the members).

    Raises:
        ValueError: for ``examples < 2`` or a pool with fewer than 2 examples.
    """

    def __init__(
        self,
        datamodule: Any,
        examples: int,
        seed: int,
        device: torch.device,
        precision: str = "32-true",
        reference_model: nn.Module | None = None,
        tokenizer: Any = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if examples < 2:
            raise ValueError(f"`audit_examples={examples}` must be >= 2 (members and non-members each).")
        members, nonmembers = datamodule.train_dataloader(), datamodule.test_dataloader()
        pools = (members.dataset, nonmembers.dataset)
        if min(len(pools[0]), len(pools[1])) < 2:
            raise ValueError(
                f"The plug-in membership audit needs >= 2 training and test examples; the task has {len(pools[0])} "
                f"and {len(pools[1])}."
            )
        size = min(examples, len(pools[0]), len(pools[1]))
        self.member_indices, self.nonmember_indices = member_split(len(pools[0]), len(pools[1]), size=size, seed=seed)
        batch_size = getattr(nonmembers, "batch_size", None) or 16
        self.loaders = tuple(
            DataLoader(Subset(pool, idx.tolist()), batch_size=batch_size, collate_fn=loader.collate_fn)
            for pool, idx, loader in zip(
                pools, (self.member_indices, self.nonmember_indices), (members, nonmembers), strict=True
            )
        )
        self.label_token_ids: Tensor | None = getattr(datamodule, "label_token_ids", None)
        self.seed, self.device, self.precision, self.tokenizer = seed, device, precision, tokenizer
        self.meta = dict(meta or {})
        self.reference: tuple[ExampleStatistics, ExampleStatistics] | None = None
        if reference_model is not None:
            self.reference = self._statistics(reference_model, tokenizer=None)  # as audit_model scores it

    @property
    def size(self) -> int:
        """Members (and non-members) per report."""
        return len(self.member_indices)

    def _statistics(self, model: nn.Module, tokenizer: Any) -> tuple[ExampleStatistics, ExampleStatistics]:
        home = next(model.parameters()).device
        model.to(self.device)
        try:
            with _autocast(self.device, self.precision):
                return tuple(  # type: ignore[return-value]
                    example_statistics(
                        model,
                        _Batches(loader, self.device),
                        task="label_word",
                        label_token_ids=self.label_token_ids,
                        tokenizer=tokenizer,
                    )
                    for loader in self.loaders
                )
        finally:
            model.to(home)

    def audit(self, model: nn.Module, name: str) -> dict[str, Any]:
        """The membership report of ``model`` (a TextClassifier's ``model``) as a plain dict, ``meta["model"] = name``.

        The schema of ``membership_report.json``: ``attacks``, ``negative_control`` and ``meta``.
        """
        start = time.perf_counter()
        members, nonmembers = self._statistics(model, self.tokenizer)
        ref_in, ref_out = self.reference or (None, None)
        report = membership_report(
            members,
            nonmembers,
            ref_in,
            ref_out,
            seed=self.seed,
            meta={
                "model": name,
                "task": "label_word",
                "nonmember_split": "test",
                "reference": "untuned base model" if self.reference is not None else None,
                "member_indices": self.member_indices.tolist(),
                "nonmember_indices": self.nonmember_indices.tolist(),
                **self.meta,
            },
        )
        report.meta["audit_seconds"] = round(time.perf_counter() - start, 1)
        return report.to_dict()


def best_auc(report: Mapping[str, Any]) -> tuple[str, Mapping[str, float]]:
    """``(attack, auc interval)`` of the attack with the highest AUC in a report dict (validity is not judged here:
    the frontier decides it against the positive controls)."""
    name = max(report["attacks"], key=lambda n: report["attacks"][n]["auc"]["value"])
    return name, report["attacks"][name]["auc"]


def markdown_lines(reports: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One table row per audited model: the highest AUC with its interval, its TPR at 1 % FPR, the negative control."""
    lines = [
        "",
        "| membership audit (members: training split; non-members: test split) | n per side | highest AUC [95% CI] "
        "| attack | TPR@1% [95% CI] | negative-control AUC |",
        "|---|---|---|---|---|---|",
    ]
    for arm, report in reports.items():
        name, auc = best_auc(report)
        tpr = report["attacks"][name].get("tpr@1%")
        neg = report.get("negative_control", {}).get(name, {}).get("auc")
        lines.append(
            f"| {arm} | {report['meta']['n_members']} | {_interval(auc)} | {name} | "
            f"{_interval(tpr) if tpr else '-'} | {_interval(neg) if neg else '-'} |"
        )
    return lines


def _interval(iv: Mapping[str, float]) -> str:
    return f"{iv['value']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"
