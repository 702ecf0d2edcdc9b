"""privtune's command line: ``python train.py {fit,validate,test} --config configs/....yaml [overrides]``.

Any LightningModule / LightningDataModule importable by its class path can be named in a config
(``class_path: privtune.modules.TextClassifier``); ``--print_config`` shows every option.

Two rules hold for every run started here:

* checkpoints given with ``--ckpt_path`` are read with ``torch.load(..., weights_only=True)``: a checkpoint
  that carries a pickled object is refused, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says;
* a run stopped by SIGTERM (a scheduler's preemption or ``kill``) saves a resumable checkpoint
  (``<checkpoint dir>/sigterm.ckpt``) and exits with status 143 (128 + SIGTERM), so a scheduler never
  reads an interrupted run as a success.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

import privtune.callbacks  # noqa: F401  (registers the callbacks' import paths for short names)
import privtune.datamodules  # noqa: F401
import privtune.modules  # noqa: F401

#: exit status of a run stopped by SIGTERM: 128 + 15, what a shell reports for a process the signal ended
SIGTERM_EXIT_CODE = 143


class SaveOnSigterm(Callback):
    """Write a resumable checkpoint when ``fit`` stops on SIGTERM.

    Lightning turns SIGTERM into a ``SIGTERMException`` at the end of the current batch and calls the
    callbacks' ``on_exception``; this callback saves the full training state there (model, optimizer, loops,
    callbacks, the strategy's own entries), next to the run's other checkpoints.
    """

    def __init__(self) -> None:
        self.path: Path | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        checkpoint = trainer.checkpoint_callback
        folder = getattr(checkpoint, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        self.path = Path(folder) / "sigterm.ckpt"
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state (weights, optimizer, loops): resumable
        rank_zero_info(
            f"SIGTERM received at step {trainer.global_step}: saved {self.path}; resume with `--ckpt_path {self.path}`."
        )


class PrivtuneCLI(LightningCLI):
    """LightningCLI with safe checkpoint loading and a SIGTERM checkpoint (see the module docstring)."""

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """As LightningCLI's; given ``args`` (programmatic use: benchmarks, tests) are the whole command line, so the
        calling script's own ``sys.argv`` is neither read nor warned about."""
        if args is None:
            return super().parse_arguments(parser, args)
        argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            return super().parse_arguments(parser, args)
        finally:
            sys.argv = argv

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(SaveOnSigterm())
        return trainer

    def _load_weights_only(self) -> None:
        arguments = self.config_init[self.subcommand]
        if "weights_only" not in arguments:
            return
        if arguments["weights_only"] is False:
            raise ValueError(
                "`--weights_only=false` is refused: privtune reads checkpoints with `weights_only=True` only, so a "
                "checkpoint cannot run code when it is loaded. Drop the option."
            )
        arguments["weights_only"] = True

    def before_fit(self) -> None:
        self._load_weights_only()

    def before_validate(self) -> None:
        self._load_weights_only()

    def before_test(self) -> None:
        self._load_weights_only()

    def before_predict(self) -> None:
        self._load_weights_only()


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` for programmatic use and tests).

    Raises:
        SystemExit: with status 143 when the run was stopped by SIGTERM (after its checkpoint is saved).
    """
    try:
        cli = PrivtuneCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except SIGTERMException:  # a SystemExit without a status: the process would exit 0
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    if getattr(cli, "trainer", None) is not None and cli.trainer.received_sigterm:
        raise SystemExit(SIGTERM_EXIT_CODE)  # the signal came after the last step: the run still did not end cleanly
    return cli


if __name__ == "__main__":
    main()
