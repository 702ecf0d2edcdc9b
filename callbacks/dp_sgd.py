"""Sample-level DP-SGD for any LightningModule with Opacus: per-sample clipping, Gaussian noise, an accountant.

DP-SGD (Abadi et al., arXiv 1607.00133) with Opacus (arXiv 2109.12298): each step clips every per-sample
gradient to norm ``C`` (``max_grad_norm``), sums them, adds ``N(0, sigma^2 C^2 I)`` and divides by the batch
size; an accountant (PRV, arXiv 2106.02848, or RDP, arXiv 1702.07476) turns ``(q, sigma, steps)`` into
``epsilon(delta)``. This is the formal baseline that CypherTalk shaking (arXiv 2403.07283), an empirical
defence without a DP guarantee, is compared with.

Threat model: anyone who sees the tuned weights (or everything they influence) learns about a single
training example at most what ``(epsilon, delta)``-DP allows.

Integration (``related.md`` §4): Opacus' hooks are attached to the module's trainable layers without
wrapping it (``GradSampleHooks``), and the Trainer's optimizer is replaced by Opacus' ``DPOptimizer`` at
``on_fit_start`` (after checkpoint restore), so the LightningModule needs no change. ``opacus.lightning``
is never imported (it imports ``pytorch_lightning``). Requirements checked at setup: one device,
``accumulate_grad_batches=1`` and no ``gradient_clip_val`` (Opacus clips per sample inside its step).

Sampling: batches come from the datamodule's shuffled fixed-size loader (sampling without replacement,
Opacus' ``poisson_sampling=False``); the accountant uses ``q = batch_size / N`` as if batches were
Poisson-sampled, the usual practical approximation. The report names this.

Opacus is an optional extra (``pip install privtune[dp]``); it is imported only when the callback is built.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

_ACCOUNTANTS = ("prv", "rdp")


def _require_opacus() -> Any:  # noqa: ANN401 - the opacus module
    try:
        import opacus
    except ImportError as err:
        raise ImportError(
            "OpacusDP needs the optional dependency `opacus` (>= 1.5): pip install 'privtune[dp]' "
            "(or: pip install opacus)."
        ) from err
    return opacus


class OpacusDP(Callback):
    """Train with sample-level DP-SGD and log ``dp/epsilon``.

    Args:
        target_epsilon: privacy budget reached after the planned steps (``sigma`` is derived); ``None`` uses
            ``noise_multiplier`` as given.
        delta: ``delta``; ``None`` takes ``1 / (10 N)`` (below ``1/N``), capped at ``1e-5``.
        noise_multiplier: ``sigma`` when ``target_epsilon`` is ``None``.
        max_grad_norm: per-sample clipping norm ``C``.
        accountant: ``prv`` (Opacus' default) or ``rdp``.
        steps: planned optimizer steps for the budget; ``None`` takes ``trainer.max_steps`` (or
            ``max_epochs`` x batches per epoch).

    Raises:
        ValueError: for ``target_epsilon <= 0``, neither a target nor a noise multiplier, ``noise_multiplier < 0``,
            ``max_grad_norm <= 0``, ``delta`` outside (0, 1) or an unknown accountant.
        ImportError: if opacus is not installed.
    """

    def __init__(
        self,
        target_epsilon: float | None = 3.0,
        delta: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        accountant: Literal["prv", "rdp"] = "prv",
        steps: int | None = None,
    ) -> None:
        super().__init__()
        errors = []
        if target_epsilon is not None and not target_epsilon > 0:
            errors.append(f"`target_epsilon={target_epsilon}` must be > 0.")
        if target_epsilon is None and (noise_multiplier is None or noise_multiplier < 0):
            errors.append(f"`noise_multiplier={noise_multiplier}` must be >= 0 when `target_epsilon` is None.")
        if not max_grad_norm > 0:
            errors.append(f"`max_grad_norm={max_grad_norm}` must be > 0.")
        if delta is not None and not 0 < delta < 1:
            errors.append(f"`delta={delta}` must be in (0, 1).")
        if accountant not in _ACCOUNTANTS:
            errors.append(f"`accountant={accountant!r}` must be one of {', '.join(_ACCOUNTANTS)}.")
        if steps is not None and steps < 1:
            errors.append(f"`steps={steps}` must be >= 1.")
        if errors:
            raise ValueError(" ".join(errors))
        _require_opacus()
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.accountant_name = accountant
        self.steps = steps
        self.sample_rate: float | None = None
        self.batch_size: int | None = None
        self.dataset_size: int | None = None
        self.accountant = None
        self._hooks = None
        self._history: list = []

    # ------------------------------------------------------------------ checks and set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        errors = []
        if trainer.accumulate_grad_batches != 1:
            errors.append(f"`accumulate_grad_batches={trainer.accumulate_grad_batches}` must be 1 with DP-SGD.")
        if trainer.gradient_clip_val:
            errors.append(
                f"`gradient_clip_val={trainer.gradient_clip_val}` must be unset: Opacus clips each per-sample gradient."
            )
        if trainer.world_size != 1:
            errors.append("OpacusDP runs on one device (`devices=1`).")
        if errors:
            raise ValueError(" ".join(errors))

    def _plan(self, trainer: pl.Trainer) -> None:
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else None
        if loader is None:
            raise ValueError("OpacusDP needs a datamodule with a train_dataloader to know N and the batch size.")
        self.dataset_size = len(loader.dataset)
        self.batch_size = loader.batch_size
        self.sample_rate = self.batch_size / self.dataset_size
        if self.delta is None:
            self.delta = min(1e-5, 1.0 / (10 * self.dataset_size))
        steps = self.steps
        if steps is None:
            if trainer.max_steps and trainer.max_steps > 0:
                steps = trainer.max_steps
            else:
                per_epoch = len(loader)
                if isinstance(trainer.limit_train_batches, int):
                    per_epoch = min(per_epoch, trainer.limit_train_batches)
                steps = max(1, (trainer.max_epochs or 1) * per_epoch)
        self.steps = steps
        if self.target_epsilon is not None:
            from opacus.accountants.utils import get_noise_multiplier

            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                sample_rate=self.sample_rate,
                steps=steps,
                accountant=self.accountant_name,
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from opacus.accountants import create_accountant
        from opacus.grad_sample import GradSampleHooks
        from opacus.optimizers import DPOptimizer

        self._plan(trainer)
        if len(trainer.optimizers) != 1:
            raise ValueError(f"OpacusDP supports one optimizer; the module configured {len(trainer.optimizers)}.")
        self._hooks = GradSampleHooks(pl_module, batch_first=True, loss_reduction="mean", strict=False)
        dp = DPOptimizer(
            trainer.optimizers[0],
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.batch_size,
            loss_reduction="mean",
        )
        trainer.strategy.optimizers = [dp]
        self.accountant = create_accountant(mechanism=self.accountant_name)
        self.accountant.history = list(self._history)  # restored by load_state_dict on resume

    # ------------------------------------------------------------------ accounting
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        optimizer = trainer.optimizers[0]
        if getattr(optimizer, "_is_last_step_skipped", False):
            return
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self) -> float:
        """``epsilon(delta)`` spent so far (0 before the first step)."""
        if self.accountant is None or not self.accountant.history:
            return 0.0
        if not self.noise_multiplier:
            return math.inf  # no noise: no privacy
        return float(self.accountant.get_epsilon(delta=self.delta))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("dp/epsilon", self.epsilon(), prog_bar=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hooks is not None:
            self._hooks.remove_hooks()
            self._hooks = None
        for p in pl_module.parameters():  # leave no per-sample tensors behind for evaluation
            p.grad_sample = None

    def report(self) -> dict[str, Any]:
        """``epsilon``, ``delta``, accountant, ``sigma``, ``C``, ``q``, steps and the sampling used."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "accountant": self.accountant_name,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": sum(h[2] for h in self.accountant.history) if self.accountant is not None else 0,
            "sampling": "shuffled fixed-size batches (accounted as Poisson with q = B/N)",
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        history = list(self.accountant.history) if self.accountant is not None else self._history
        return {"history": history, "noise_multiplier": self.noise_multiplier, "delta": self.delta}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = [tuple(h) for h in state_dict.get("history", [])]
        self.delta = state_dict.get("delta", self.delta)
        if self.accountant is not None:
            self.accountant.history = list(self._history)


def noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv") -> float:
    """``sigma`` that spends ``target_epsilon`` over ``steps`` at ``sample_rate`` (Opacus' search)."""
    _require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    if not (target_epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps >= 1):
        raise ValueError("`target_epsilon` > 0, `delta` in (0, 1), `sample_rate` in (0, 1] and `steps` >= 1 required.")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


__all__ = ["OpacusDP", "noise_for"]
