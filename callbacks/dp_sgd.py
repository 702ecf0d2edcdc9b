"""Sample-level DP-SGD for any LightningModule with Opacus: Poisson batches, per-sample clipping, noise, a hard cap.

DP-SGD (Abadi et al., arXiv 1607.00133) with Opacus (arXiv 2109.12298): each step draws a Poisson batch (every
example independently with probability ``q = B / N``), clips every per-sample gradient to norm ``C``
(``max_grad_norm``), sums them, adds ``N(0, sigma^2 C^2 I)`` and divides by the expected batch size ``B``; an
accountant (RDP, arXiv 1702.07476 / 1908.10530, or PRV, arXiv 2106.02848) turns ``(sigma, q, steps)`` into
``epsilon(delta)``. This is the formal baseline that CypherTalk shaking (arXiv 2403.07283), an empirical defence
without a DP guarantee, is compared with.

Threat model: anyone who sees the tuned weights (or everything they influence) learns about a single training
example at most what ``(epsilon, delta)``-DP allows, for the ``epsilon`` in :meth:`OpacusDP.report`.

What the callback guarantees (docs/dp_sgd.md):

* Sampling: the training loader, from a privtune datamodule or any map-style ``DataLoader``, gets its batch
  sampler replaced by a seeded, resumable :class:`~privtune.data.poisson.PoissonBatchSampler` (as Opacus'
  ``DPDataLoader`` does), so the accountant's assumption holds. ``sampling="shuffle"`` keeps shuffled fixed-size
  batches; its figures are then labelled approximate (``dp/epsilon_approx``).
* Planning: ``sigma`` is planned for the smallest finite bound among ``steps``, ``max_steps`` and ``max_epochs x``
  batches per epoch (after ``limit_train_batches``); a run with no finite bound is refused at setup.
* Hard cap: the run stops (``trainer.should_stop``) after the last step that keeps ``epsilon <= target_epsilon``,
  saves a checkpoint (``dp-budget-spent.ckpt`` in the ``ModelCheckpoint`` folder, if one is attached), logs
  ``dp/stopped_early`` and reports it; a step past the budget is never applied.
* ``noise_multiplier`` is used as given (no target, no cap); giving both it and ``target_epsilon`` is an error.
* Accounting is cheap during training (an integer compare per step; RDP at epoch ends); PRV, if asked for, runs at
  plan time and once at the end.

Integration: Opacus' hooks are attached to the module's trainable layers without wrapping it (``GradSampleHooks``)
and the Trainer's optimizer is replaced by Opacus' ``DPOptimizer`` at ``on_train_start`` (after checkpoint
restore), so the LightningModule needs no change; layers whose per-sample gradients Opacus cannot compute (e.g.
GPT-2's trainable position embedding ``wpe``) are found with a two-example probe before the first step and named.
``opacus.lightning`` is never imported (it imports ``pytorch_lightning``). Requirements checked at setup: one
device, ``accumulate_grad_batches=1`` (refused: each optimizer step must be one Poisson batch; raise the batch size
instead), no ``gradient_clip_val``, one optimizer, a finite number of steps.

Opacus is an optional extra (``pip install privtune[dp]``); it is imported only when the callback is built.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource
from torch.utils.data import DataLoader
from typing_extensions import override

from privtune.data.poisson import PoissonBatchSampler
from privtune.data.sampler import ResumableSampler
from privtune.datamodules.resumable import loader_batch_size, poisson_train_loader
from privtune.dp.budget import ACCOUNTANTS, History, epsilon_spent, noise_for, require_opacus, steps_within_budget
from privtune.dp.planning import UnboundedRunError, plan_steps

log = logging.getLogger(__name__)

_SAMPLINGS = ("poisson", "shuffle")
_GRAD_SAMPLERS = ("hooks", "functorch")
BUDGET_CHECKPOINT = "dp-budget-spent.ckpt"


class _DPDataSource(_DataLoaderSource):
    """The trainer's training-data source, with each loader it yields passed through ``convert``."""

    def __init__(self, original: _DataLoaderSource, convert: Callable[[Any], DataLoader]) -> None:
        super().__init__(original.instance, original.name)
        self.original = original
        self._convert = convert

    def dataloader(self) -> Any:  # noqa: ANN401 - what Lightning's source returns
        return self._convert(super().dataloader())


@contextlib.contextmanager
def _muted_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """Let ``training_step`` run outside the loop (a probe): ``self.log`` calls are dropped meanwhile."""
    pl_module.__dict__["log"] = pl_module.__dict__["log_dict"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del pl_module.__dict__["log"], pl_module.__dict__["log_dict"]


class OpacusDP(Callback):
    """Train with sample-level DP-SGD, never spending more than ``target_epsilon``.

    Args:
        target_epsilon: privacy budget; ``sigma`` is planned to reach it after the planned steps and the run stops
            before a step that would pass it. Exclusive with ``noise_multiplier``.
        delta: ``delta``; ``None`` takes ``1 / (10 N)`` (below ``1/N``), capped at ``1e-5``.
        noise_multiplier: ``sigma``, used as given (``epsilon`` is reported, nothing is capped). Exclusive with
            ``target_epsilon``.
        max_grad_norm: per-sample clipping norm ``C``.
        accountant: ``rdp`` (cheap) or ``prv`` (tighter: less noise for the same target; computed when planning
            and at the end). It plans ``sigma``, sets the cap and gives the final figure.
        steps: planned optimizer steps, for a run bounded only by ``max_time`` (or to plan fewer steps than the
            trainer's limits allow); ``None`` plans from ``max_steps``/``max_epochs``/``limit_train_batches``.
        sampling: ``poisson`` (the accounted mechanism) or ``shuffle`` (fixed-size shuffled batches, accounted as
            Poisson with ``q = B / N``: the figure is approximate and labelled so).
        seed: seed of the Poisson draws; ``None`` takes the datamodule sampler's seed or ``torch.initial_seed()``
            (a resumed run keeps the checkpoint's).
        grad_sampler: how Opacus computes per-sample gradients: ``hooks`` (its per-layer formulas) or
            ``functorch`` (``torch.func.vmap`` for every layer); the same gradients, different speed
            (benchmarks/dp_sgd_step.py, docs/dp_sgd.md).

    Raises:
        ValueError: for both or neither of ``target_epsilon`` and ``noise_multiplier``, ``target_epsilon <= 0``,
            ``noise_multiplier < 0``, ``max_grad_norm <= 0``, ``delta`` outside (0, 1), ``steps < 1`` or an unknown
            accountant or sampling.
        ImportError: if opacus is not installed.
    """

    def __init__(
        self,
        target_epsilon: float | None = None,
        delta: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        accountant: Literal["rdp", "prv"] = "rdp",
        steps: int | None = None,
        sampling: Literal["poisson", "shuffle"] = "poisson",
        seed: int | None = None,
        grad_sampler: Literal["hooks", "functorch"] = "hooks",
    ) -> None:
        super().__init__()
        errors = []
        if target_epsilon is not None and noise_multiplier is not None:
            errors.append(
                f"Give either `target_epsilon={target_epsilon}` (sigma is planned for it) or "
                f"`noise_multiplier={noise_multiplier}` (used as given), not both."
            )
        if target_epsilon is None and noise_multiplier is None:
            errors.append("Give `target_epsilon` (a privacy budget) or `noise_multiplier` (sigma, used as given).")
        if target_epsilon is not None and not target_epsilon > 0:
            errors.append(f"`target_epsilon={target_epsilon}` must be > 0.")
        if noise_multiplier is not None and not noise_multiplier >= 0:
            errors.append(f"`noise_multiplier={noise_multiplier}` must be >= 0.")
        if not max_grad_norm > 0:
            errors.append(f"`max_grad_norm={max_grad_norm}` must be > 0.")
        if delta is not None and not 0 < delta < 1:
            errors.append(f"`delta={delta}` must be in (0, 1).")
        if accountant not in ACCOUNTANTS:
            errors.append(f"`accountant={accountant!r}` must be one of {', '.join(ACCOUNTANTS)}.")
        if sampling not in _SAMPLINGS:
            errors.append(f"`sampling={sampling!r}` must be one of {', '.join(_SAMPLINGS)}.")
        if steps is not None and steps < 1:
            errors.append(f"`steps={steps}` must be >= 1.")
        if grad_sampler not in _GRAD_SAMPLERS:
            errors.append(f"`grad_sampler={grad_sampler!r}` must be one of {', '.join(_GRAD_SAMPLERS)}.")
        if errors:
            raise ValueError(" ".join(errors))
        require_opacus()
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self._given = {"noise_multiplier": noise_multiplier, "delta": delta, "target_epsilon": target_epsilon}
        self.max_grad_norm = max_grad_norm
        self.accountant_name = accountant
        self.steps = steps
        self.sampling = sampling
        self.seed = seed
        self.grad_sampler = grad_sampler
        self.sample_rate: float | None = None
        self.batch_size: int | None = None
        self.dataset_size: int | None = None
        self.planned_steps: int | None = None
        self.budget_steps: int | None = None  # total steps the budget allows (None: no target)
        self.history: History = []
        self.stopped_early = False
        self.final_epsilon: float | None = None
        self._restored: dict[str, Any] | None = None
        self._source: _DPDataSource | None = None
        self._trainer: pl.Trainer | None = None
        self._loader: DataLoader | None = None
        self._hooks = None
        self._placeholder = False
        self._skipped = False
        self._run_limit: float = math.inf

    # ------------------------------------------------------------------ checks and set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        errors = []
        if trainer.accumulate_grad_batches != 1:
            k = trainer.accumulate_grad_batches
            errors.append(
                f"`accumulate_grad_batches={k}` is not supported with DP-SGD: each optimizer step must be one "
                f"Poisson-sampled batch; set `accumulate_grad_batches=1` and multiply the training `batch_size` "
                f"by {k} instead."
            )
        if trainer.gradient_clip_val:
            errors.append(
                f"`gradient_clip_val={trainer.gradient_clip_val}` must be unset: Opacus clips each per-sample gradient."
            )
        if trainer.world_size != 1:
            errors.append("OpacusDP runs on one device (`devices=1`).")
        if self.steps is None:
            try:
                plan_steps(1, max_epochs=trainer.max_epochs, max_steps=trainer.max_steps)
            except UnboundedRunError as err:
                errors.append(str(err))
        errors += self._unsupported_layers(pl_module)
        if errors:
            raise ValueError(" ".join(errors))
        self._trainer = trainer
        source = trainer.fit_loop._data_source
        original = source.original if isinstance(source, _DPDataSource) else source
        self._source = _DPDataSource(original, self._convert_loader)
        trainer.fit_loop._data_source = self._source

    @staticmethod
    def _unsupported_layers(pl_module: pl.LightningModule) -> list[str]:
        """Trainable layers Opacus cannot make private, with their names: those with buffers (its
        ``GradSampleModule.validate``) and those its ``ModuleValidator`` says to replace (BatchNorm, LSTM, GRU,
        MultiheadAttention, InstanceNorm with running statistics)."""
        from opacus.utils.module_utils import trainable_modules
        from opacus.validators import ModuleValidator

        bad = []
        for name, m in trainable_modules(pl_module):
            validator = ModuleValidator.VALIDATORS.get(type(m))
            if list(m.buffers()) or (validator is not None and validator(m)):
                bad.append(f"`{name}` ({type(m).__name__})")
        if not bad:
            return []
        return [
            f"Opacus cannot compute private per-sample gradients for these trainable layers: {', '.join(bad)}; freeze "
            "them (`requires_grad_(False)`) or replace them with privacy-safe equivalents "
            "(`opacus.validators.ModuleValidator.fix(model)`: BatchNorm by GroupNorm, LSTM/GRU/MultiheadAttention by "
            "Opacus' DPLSTM/DPGRU/DPMultiheadAttention)."
        ]

    def _convert_loader(self, loader: Any) -> DataLoader:  # noqa: ANN401 - whatever the source returned
        if not isinstance(loader, DataLoader):
            raise ValueError(
                "OpacusDP needs exactly one training `DataLoader`, but the training data is a "
                f"{type(loader).__name__}: return a single `torch.utils.data.DataLoader` from `train_dataloader`."
            )
        if self.sampling == "shuffle":
            self.batch_size = loader_batch_size(loader)
            self.dataset_size = len(loader.dataset)
            self._loader = loader
            return loader
        if self.seed is None:
            sampler = loader.sampler
            self.seed = sampler.seed if isinstance(sampler, ResumableSampler) else torch.initial_seed() % 2**62
        loader = poisson_train_loader(loader, self.seed, self._trainer)
        sampler = loader.batch_sampler
        self.batch_size = round(sampler.expected_batch_size)
        self.dataset_size = sampler.num_examples
        self._loader = loader
        return loader

    def _check_resume(self, restored: dict[str, Any]) -> None:
        before = (restored.get("sampling"), restored.get("sample_rate"))
        if before[0] is not None and before != (self.sampling, self.sample_rate):
            old_b = (restored.get("sample_rate") or 0) * (self.dataset_size or 0)
            raise ValueError(
                f"The checkpoint was trained with `sampling={before[0]!r}` at q={before[1]} (batch size {old_b:g} of "
                f"{self.dataset_size}), but this run has `sampling={self.sampling!r}` at q={self.sample_rate} (batch "
                f"size {self.batch_size}): the privacy accounting would not hold; resume with the checkpoint's "
                "sampling and `batch_size`."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored = self._restored or {}
        saved = restored.get("sampling")
        if saved is not None and saved != self.sampling:  # before Lightning restores the loader's state
            raise ValueError(
                f"The checkpoint was trained with `sampling={saved!r}` but this run has `sampling={self.sampling!r}`: "
                f"the privacy accounting would not hold; resume with `sampling={saved!r}`."
            )
        for name in ("noise_multiplier", "delta", "target_epsilon"):
            given, before = self._given[name], restored.get(name)
            if given is not None and before is not None and given != before:
                raise ValueError(
                    f"The checkpoint was trained with `{name}={before}` but this run asks for `{name}={given}`: a "
                    f"resumed run keeps the checkpoint's privacy parameters; resume with `{name}={before}` (or leave "
                    f"it unset), or start a new run."
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from opacus.grad_sample import GradSampleHooks
        from opacus.optimizers import DPOptimizer

        if self._loader is None:
            raise ValueError("OpacusDP found no training DataLoader (is `limit_train_batches=0`?).")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"OpacusDP supports one optimizer; the module configured {len(trainer.optimizers)}.")
        self.sample_rate = self.batch_size / self.dataset_size
        if self.delta is None:
            self.delta = min(1e-5, 1.0 / (10 * self.dataset_size))
        batches = trainer.num_training_batches
        self._run_limit = math.inf
        with contextlib.suppress(UnboundedRunError):
            self._run_limit = plan_steps(batches, max_epochs=trainer.max_epochs, max_steps=trainer.max_steps)
        if self._restored is not None:
            self._check_resume(self._restored)
            self.planned_steps = self._restored.get("planned_steps")
        else:
            self.planned_steps = plan_steps(
                batches, max_epochs=trainer.max_epochs, max_steps=trainer.max_steps, steps=self.steps
            )
            if self.target_epsilon is not None:
                self.noise_multiplier = noise_for(
                    self.target_epsilon, self.delta, self.sample_rate, self.planned_steps, self.accountant_name
                )
        taken = self.steps_taken
        self.budget_steps = None
        if self.target_epsilon is not None:
            left = steps_within_budget(
                self.target_epsilon,
                self.delta,
                self.noise_multiplier,
                self.sample_rate,
                self.history,
                self.accountant_name,
                hint=max(1, (self.planned_steps or 1) - taken),
            )
            self.budget_steps = taken + left
        log.info(
            "OpacusDP: %s sampling, q=%.5g, sigma=%.4g, C=%g, delta=%.3g, %s planned steps (%d taken), budget "
            "allows %s (accountant %s).",
            self.sampling,
            self.sample_rate,
            self.noise_multiplier,
            self.max_grad_norm,
            self.delta,
            self.planned_steps,
            taken,
            self.budget_steps,
            self.accountant_name,
        )
        self._hooks = GradSampleHooks(
            pl_module,
            batch_first=True,
            loss_reduction="mean",
            strict=False,
            force_functorch=self.grad_sampler == "functorch",
        )
        self._probe(trainer, pl_module)
        trainer.strategy.optimizers = [
            DPOptimizer(
                trainer.optimizers[0],
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=self.batch_size,
                loss_reduction="mean",
            )
        ]

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute per-sample gradients on two examples and name every trainable layer Opacus got wrong."""
        dataset = self._loader.dataset
        n = min(2, len(dataset))
        batch = trainer.strategy.batch_to_device(self._loader.collate_fn([dataset[i] for i in range(n)]))
        params = {id(p): name for name, p in pl_module.named_parameters() if p.requires_grad}
        failure = None
        with torch.random.fork_rng(devices=[]), _muted_logging(pl_module):
            try:
                out = pl_module.training_step(batch, 0)
                loss = out["loss"] if isinstance(out, Mapping) else out
                if not isinstance(loss, torch.Tensor):
                    raise ValueError(
                        f"OpacusDP runs `training_step` once on two examples to check per-sample gradients, and it "
                        f"returned {type(out).__name__}: return the loss (a tensor, or a dict with `loss`)."
                    )
                loss.backward()
            except ValueError:
                self._remove_hooks(pl_module)
                raise
            except Exception as err:  # noqa: BLE001 - any failure inside Opacus' hooks is reported with the layers
                failure = f"{type(err).__name__}: {err}"
        bad = []
        for p in pl_module.parameters():
            if id(p) not in params:
                continue
            gs = getattr(p, "grad_sample", None)
            if isinstance(gs, list):
                gs = torch.cat(gs)
            if p.grad is not None and (gs is None or gs.shape[0] != n):
                got = "none" if gs is None else f"a batch dimension of {gs.shape[0]}"
                bad.append(f"`{params[id(p)]}` (got {got}, expected {n})")
            p.grad, p.grad_sample = None, None
        if failure is None and not bad:
            return
        self._remove_hooks(pl_module)
        layers = ", ".join(bad) if bad else "(the layer could not be identified)"
        raise ValueError(
            "OpacusDP cannot compute per-sample gradients for these trainable parameters: "
            f"{layers}{f' after {failure}' if failure else ''}. Freeze them (`param.requires_grad_(False)`, e.g. a "
            "trainable position embedding such as GPT-2's `transformer.wpe`, whose input has no batch dimension; "
            "tune with LoRA or prompts instead) or replace the module with one whose input carries the batch "
            "dimension first."
        )

    # ------------------------------------------------------------------ the step and the cap
    @property
    def steps_taken(self) -> int:
        """Noisy steps released so far (over resumes)."""
        return sum(int(h[2]) for h in self.history)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loader is not None and isinstance(self._loader.batch_sampler, PoissonBatchSampler):
            self._loader.batch_sampler.set_epoch(trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        optimizer = trainer.optimizers[0]
        if self.budget_steps is not None and self.steps_taken + 1 > self.budget_steps:
            optimizer.signal_skip_step(do_skip=True)  # computed but never applied: nothing is released
            self._skipped = True
            self._stop(trainer, pl_module)
            return
        sampler = getattr(self._loader, "batch_sampler", None)
        self._placeholder = isinstance(sampler, PoissonBatchSampler) and sampler.is_placeholder(
            trainer.current_epoch, batch_idx
        )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._placeholder:
            return
        for p in pl_module.parameters():  # an empty Poisson draw: the step adds noise only
            gs = getattr(p, "grad_sample", None)
            if gs is not None:
                p.grad_sample = (torch.cat(gs) if isinstance(gs, list) else gs)[:0]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        optimizer = trainer.optimizers[0]
        if getattr(optimizer, "_is_last_step_skipped", False):
            return
        step = (float(self.noise_multiplier), float(self.sample_rate), 1)
        if self.history and tuple(self.history[-1][:2]) == step[:2]:
            self.history[-1] = (step[0], step[1], int(self.history[-1][2]) + 1)
        else:
            self.history.append(step)
        if self.budget_steps is not None and self.steps_taken >= self.budget_steps:
            self._stop(trainer, pl_module)

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True
        if self.stopped_early or self.steps_taken >= self._run_limit:
            return  # already said, or the run ends here by its own limits
        self.stopped_early = True
        spent = epsilon_spent(self.history, self.delta, "rdp")
        checkpoint = self._save(trainer)
        log.warning(
            "OpacusDP stopped the run after %d steps: one more step would spend more than target_epsilon=%g "
            "(spent %.4g by RDP); %s",
            self.steps_taken,
            self.target_epsilon,
            spent,
            f"checkpoint saved to {checkpoint}." if checkpoint else "no ModelCheckpoint attached, nothing saved.",
        )
        pl_module.log("dp/stopped_early", 1.0)

    def _save(self, trainer: pl.Trainer) -> str | None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                path = str(Path(cb.dirpath) / BUDGET_CHECKPOINT)
                trainer.save_checkpoint(path)
                return path
        return None

    # ------------------------------------------------------------------ accounting and the report
    def epsilon(self, accountant: Literal["rdp", "prv"] | None = None) -> float:
        """``epsilon(delta)`` spent so far by ``accountant`` (default: the callback's), 0 before the first step."""
        if not self.history:
            return 0.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return epsilon_spent(self.history, self.delta, accountant or self.accountant_name)

    @property
    def _suffix(self) -> str:
        return "_approx" if self.sampling == "shuffle" else ""

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        key = "dp/epsilon" if self.accountant_name == "rdp" else "dp/epsilon_rdp"  # PRV only at the end
        pl_module.log(key + self._suffix, self.epsilon("rdp"), prog_bar=self.accountant_name == "rdp")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks(pl_module)
        self.final_epsilon = self.epsilon()
        metrics = {f"dp/epsilon{self._suffix}": self.final_epsilon, "dp/stopped_early": float(self.stopped_early)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log.info("OpacusDP: %s", self.report())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks(pl_module)
        if self._source is not None and trainer.fit_loop._data_source is self._source:
            trainer.fit_loop._data_source = self._source.original

    def _remove_hooks(self, pl_module: pl.LightningModule) -> None:
        if self._hooks is not None:
            self._hooks.remove_hooks()
            self._hooks = None
        for p in pl_module.parameters():  # leave no per-sample tensors behind for evaluation
            p.grad_sample = None
            if hasattr(p, "summed_grad"):
                p.summed_grad = None
            if self._skipped:  # a step refused by the cap leaves its raw, un-noised gradient in .grad
                p.grad = None

    def report(self) -> dict[str, Any]:
        """What was spent and how: ``epsilon`` (by ``accountant``), the mechanism's parameters and the stop."""
        approximate = self.sampling == "shuffle"
        return {
            "epsilon": self.final_epsilon if self.final_epsilon is not None else self.epsilon(),
            "epsilon_is_approximate": approximate,
            "accountant": self.accountant_name,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "batch_size": self.batch_size,
            "dataset_size": self.dataset_size,
            "steps": self.steps_taken,
            "planned_steps": self.planned_steps,
            "budget_steps": self.budget_steps,
            "stopped_early": self.stopped_early,
            "sampling": (
                "shuffled fixed-size batches, accounted as Poisson with q = B/N (epsilon is approximate)"
                if approximate
                else "Poisson (each example independently with q = B/N)"
            ),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [list(h) for h in self.history],
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "sample_rate": self.sample_rate,
            "sampling": self.sampling,
            "seed": self.seed,
            "planned_steps": self.planned_steps,
            "stopped_early": self.stopped_early,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        self.history = [(float(s), float(q), int(n)) for s, q, n in state_dict.get("history", [])]
        self.noise_multiplier = state_dict.get("noise_multiplier", self.noise_multiplier)
        self.delta = state_dict.get("delta", self.delta)
        self.seed = state_dict.get("seed", self.seed)
        self.stopped_early = bool(state_dict.get("stopped_early", False))


__all__ = ["BUDGET_CHECKPOINT", "OpacusDP", "noise_for"]
