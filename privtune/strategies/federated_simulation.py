"""Lightning Strategies that drive the federated round loop: clients in one process, or across DDP ranks.

FedPepTAO (Che et al., EMNLP 2023, arXiv 2310.15080) and its baselines run as ``train.py fit`` with one of:

* :class:`FederatedSimulation`: every sampled client trains in turn in this process (one machine, CI);
* :class:`FederatedDDP`: ``--trainer.devices=N`` ranks (gloo on CPU, NCCL on GPU); each rank trains the clients
  ``j % N == rank`` of a round's reporting clients, the uploads are gathered on every rank and every rank runs the
  same server step, so all ranks hold the same global prompt.

Both are thin drivers of :class:`privtune.federated.loop.FederatedLoop` (plain PyTorch, shared with the Flower app):
they hand it the LightningModule (a :class:`~privtune.federated.protocol.FederatedClient`) and the datamodule (a
:class:`~privtune.federated.protocol.ClientData`), run one round per Lightning training step, log its metrics, put
its state into checkpoints (``federated`` entry; loaded with ``weights_only=True``) and write its report. Callbacks
that would need the clients' batches or gradients are refused at set-up (:mod:`privtune.strategies.callback_policy`).

Threat model: simulated; clients exchange only the communicated named tensors with the server (see
``privtune.federated``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from privtune.federated.config import FederatedConfig
from privtune.federated.loop import FederatedLoop
from privtune.strategies.callback_policy import check_callbacks

CHECKPOINT_KEY = "federated"


class _FederatedMixin:
    """Drives the round loop: set-up, one round per step, checkpoint hooks and the report, for both placements."""

    loop: FederatedLoop

    def _init_federated(self, federated: FederatedConfig | None) -> None:
        if federated is None:
            federated = FederatedConfig()
        elif not isinstance(federated, FederatedConfig):
            raise TypeError(
                f"`federated` must be a privtune.federated.FederatedConfig (a mapping in YAML); got "
                f"{type(federated).__name__}."
            )
        self.federated = federated
        self.loop = FederatedLoop(federated)
        self.loop.on_client_end = self.on_client_end

    @property
    def runner(self) -> FederatedLoop:
        """The round loop (older name)."""
        return self.loop

    def _rank_world(self) -> tuple[int, int]:
        return 0, 1

    def _gather(self, obj: Any) -> list[Any]:
        return [obj]

    def _check_callbacks(self) -> None:
        trainer = self.lightning_module.trainer  # type: ignore[attr-defined]
        check_callbacks(trainer.callbacks, type(self).__name__)

    def _setup_federated(self, trainer: pl.Trainer) -> None:
        module = trainer.lightning_module
        module.automatic_optimization = False  # the loop drives the local optimizers itself
        self._trainer_ref = trainer
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "num_rounds"):
            datamodule.num_rounds = self.federated.num_rounds  # one Lightning step per round
        if hasattr(module, "configure_labels") and hasattr(datamodule, "num_classes"):
            module.configure_labels(datamodule.label_token_ids, datamodule.num_classes, datamodule.label_names)
        self.loop.setup(module, datamodule)

    def federated_training_step(self) -> Any:
        trainer = self._trainer_ref
        module = trainer.lightning_module
        rank, world = self._rank_world()
        metrics = self.loop.run_round(rank, world, self._gather)
        if not metrics:
            if self.loop.stop_reason is not None:
                rank_zero_info(f"[federated] {self.loop.stop_reason}")
            trainer.should_stop = True
            return None
        # a round is one optimizer step for Lightning: `global_step`, `max_steps`, ModelCheckpoint count rounds
        progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()
        module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, batch_size=1, rank_zero_only=True)
        acc, eps = metrics.get("fed/personalized_acc"), metrics.get("privacy/epsilon")
        rank_zero_info(
            f"[federated] round {int(metrics['round'])}/{self.federated.num_rounds}: "
            f"acc={'-' if acc is None else f'{acc:.4f}'} up={int(metrics['comm/up_bytes'])} B "
            f"round_time={metrics['time/round_seconds']:.1f} s" + ("" if eps is None else f" epsilon={eps:.3f}")
        )
        if self.loop.round >= self.federated.num_rounds:
            trainer.should_stop = True
        return None

    def on_client_end(self, round_idx: int, client: int) -> None:
        """Called after each client of a round; writes ``round_checkpoint`` when configured (in-process mode)."""
        path = self.federated.round_checkpoint
        if path is not None and self._rank_world()[1] == 1:
            self._trainer_ref.save_checkpoint(path, weights_only=False)  # resumable: optimizer and loops too

    def _add_state(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.loop.state_dict()

    def _take_state(self, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY in checkpoint:
            self.loop.restore_later(checkpoint[CHECKPOINT_KEY])

    def write_report(self) -> None:
        """JSON + Markdown report, an accuracy-per-round plot and the global prompt in ``report_dir`` (rank 0).

        ``global_prompt.pt`` holds the communicated tensors (the selected prefix slices ``[P, |sel|, 2, H_kv]``
        and any federated head) as a ``dict[str, Tensor]``; clients' personalised slices stay in the checkpoint.
        """
        from privtune.federated.report import write_run_report

        out = self.federated.report_dir
        rank, world = self._rank_world()
        if out is None or rank != 0:
            return
        report = {"strategy": type(self).__name__, "world_size": world, **self.loop.report()}
        if self.federated.membership_audit:  # every client state is on every rank: rank 0 audits alone
            from privtune.federated.membership import federated_membership

            report["membership"] = federated_membership(
                self.loop, self.federated.membership_examples, seed=self.federated.seed
            )
            for name in ("global", "personalised"):
                if name in report["membership"]:
                    auc = report["membership"][name]["attacks"]["loss"]["auc"]
                    rank_zero_info(
                        f"[federated] membership, {name} model: loss-attack AUC {auc['value']:.3f} "
                        f"[{auc['low']:.3f}, {auc['high']:.3f}]"
                    )
        write_run_report(Path(out), report)
        torch.save({k: v.detach().cpu() for k, v in self.loop.global_state.items()}, Path(out) / "global_prompt.pt")

    # Strategy hooks shared by both placements; `super()` resolves to the Strategy class in each MRO.
    def setup_environment(self) -> None:
        self._check_callbacks()  # before any callback's own set-up runs (OpacusDP would wrap the module)
        super().setup_environment()  # type: ignore[misc]

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)  # type: ignore[misc]
        self._setup_federated(trainer)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self.federated_training_step()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        self._add_state(checkpoint)
        super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # the federated state is plain tensors, numbers, strings and dicts: never unpickle objects from a file
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=True)  # type: ignore[misc]
        self._take_state(checkpoint)
        return checkpoint

    def on_train_end(self) -> None:
        super().on_train_end()  # type: ignore[misc]
        self.write_report()


class FederatedSimulation(_FederatedMixin, SingleDeviceStrategy):
    """Every sampled client trains in turn in this process.

    Args:
        federated: the run's :class:`~privtune.federated.FederatedConfig` (a mapping in YAML).
        device: ``cpu`` or ``cuda:0``.

    Example::

        python train.py fit --config configs/fed_prompt/fedpeptao_code.yaml
    """

    def __init__(self, federated: FederatedConfig | None = None, device: str = "cpu") -> None:
        super().__init__(device=torch.device(device))
        self._init_federated(federated)


class FederatedDDP(_FederatedMixin, DDPStrategy):
    """Clients placed across DDP ranks (``--trainer.devices=N``); gloo on CPU, NCCL on GPU.

    Args:
        federated: the run's :class:`~privtune.federated.FederatedConfig` (a mapping in YAML).
        process_group_backend: ``gloo`` / ``nccl`` (Lightning's choice for the device when ``None``).
    """

    def __init__(self, federated: FederatedConfig | None = None, process_group_backend: str | None = None) -> None:
        super().__init__(process_group_backend=process_group_backend)
        self._init_federated(federated)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every rank walks the same round ticks; clients, not rounds, are split across ranks
        return {"num_replicas": 1, "rank": 0}

    def _rank_world(self) -> tuple[int, int]:
        return self.global_rank, self.world_size

    def _gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def final_prompt(strategy: _FederatedMixin) -> dict[str, Any]:
    """The global communicated state after the run (for tests and reports)."""
    return {k: v.clone() for k, v in strategy.loop.global_state.items()}


def dump_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    Path(path).write_text(json.dumps(data, indent=2, default=str))
