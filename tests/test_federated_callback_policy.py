"""Every public callback attached to a tiny federated run: it acts where it is attached, or it is refused at
set-up, in one sentence, before any round (issue 13: no privacy callback is silently bypassed)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import privtune.callbacks as callbacks
from privtune.modules.prompt_tuning import PromptTuning
from privtune.strategies import FederatedConfig, FederatedSimulation
from privtune.strategies.callback_policy import refusal
from tests.ddp_scripts.fed_common import make_data, make_trainer, write_csv

FACTORIES: dict[str, Callable[[Path], pl.Callback]] = {
    "OpacusDP": lambda d: callbacks.OpacusDP(target_epsilon=3.0, delta=1e-5),
    "EmbeddingShaking": lambda d: callbacks.EmbeddingShaking(key_path=str(d / "key.pt")),
    "FedProx": lambda d: callbacks.FedProx(mu=0.01),
    "ScaffoldCorrection": lambda d: callbacks.ScaffoldCorrection(),
    "LayerReplace": lambda d: callbacks.LayerReplace(),
    "RankCompression": lambda d: callbacks.RankCompression(modules=["model.layers.*.mlp.down_proj"], rank=2),
    "TuningReport": lambda d: callbacks.TuningReport(output_dir=str(d / "report")),
    "AdapterExport": lambda d: callbacks.AdapterExport(output_dir=str(d / "adapters")),
    "EmulatorExport": lambda d: callbacks.EmulatorExport(output_dir=str(d / "emulator")),
    "PlugAdapters": lambda d: callbacks.PlugAdapters(adapter_dir=str(d / "adapters")),
    "OffsitePipeline": lambda d: callbacks.OffsitePipeline(output_dir=str(d / "offsite")),
}
# the issue names these: they work on per-client batches or gradients and must never pass silently
MUST_REFUSE = {"OpacusDP", "EmbeddingShaking", "FedProx", "ScaffoldCorrection", "LayerReplace"}


def _build(name: str, tmp: Path) -> pl.Callback:
    cls = getattr(callbacks, name)
    try:
        return FACTORIES[name](tmp) if name in FACTORIES else cls()
    except (ValueError, FileNotFoundError, TypeError):
        # a constructor that checks its own inputs (an artifact folder); the federated rule reads the class only
        return cls.__new__(cls)


def _fit(tmp: Path, cbs: list[pl.Callback], num_rounds: int = 1) -> tuple[pl.Trainer, FederatedSimulation]:
    strategy = FederatedSimulation(
        federated=FederatedConfig(num_rounds=num_rounds, sample_fraction=0.5, local_max_steps=1)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy=strategy,
        callbacks=cbs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in cbs),
        max_epochs=1,
        default_root_dir=str(tmp),
    )
    data = make_data(write_csv(tmp / "data.csv"))
    trainer.fit(PromptTuning(model="tiny-llama", num_virtual_tokens=2, seed=0), datamodule=data)
    return trainer, strategy


@pytest.mark.parametrize("name", callbacks.__all__)
def test_every_public_callback_acts_or_is_refused(tmp_path: Path, name: str) -> None:
    cb = _build(name, tmp_path)
    reason = refusal(cb, "FederatedSimulation")
    if name in MUST_REFUSE:
        assert reason is not None, f"{name} would run in a federated run without reaching the clients"
    if reason is not None:
        assert reason.count(". ") == 0 and reason.endswith("."), "one sentence"
        assert f"`{name}`" in reason and "federated" in reason
        strategy_box: dict[str, Any] = {}

        class _Probe(FederatedSimulation):
            def setup(self, trainer: pl.Trainer) -> None:  # never reached: refused in setup_environment
                strategy_box["setup"] = True
                super().setup(trainer)

        trainer = make_trainer(_Probe(federated=FederatedConfig(num_rounds=1)), tmp_path, callbacks=[cb])
        module, data = PromptTuning(model="tiny-llama", num_virtual_tokens=2), make_data(write_csv(tmp_path / "d.csv"))
        with pytest.raises(ValueError, match=re.escape(str(refusal(cb, "_Probe")))):
            trainer.fit(module, datamodule=data)
        assert "setup" not in strategy_box  # refused before the strategy or the loop did anything
        return
    # accepted: it must let the run finish, and where its effect is known here, show it
    trainer, strategy = _fit(tmp_path, [cb], num_rounds=2)
    assert strategy.loop.round == 2 and trainer.global_step == 2
    if name in EFFECTS:
        EFFECTS[name](cb, trainer, tmp_path)


# effect checks for public callbacks that declare `federated_support = "run"` (none does today)
EFFECTS: dict[str, Callable[[pl.Callback, pl.Trainer, Path], None]] = {}


def test_refusals_say_what_to_use_instead() -> None:
    opacus = refusal(callbacks.OpacusDP(target_epsilon=3.0, delta=1e-5), "FederatedSimulation")
    assert opacus is not None and "client-level DP (`strategy.init_args.federated.client_dp`" in opacus
    fedprox = refusal(callbacks.FedProx(), "FederatedDDP")
    assert fedprox is not None and "federated.proximal_mu" in fedprox and "FederatedDDP" in fedprox
    scaffold = refusal(callbacks.ScaffoldCorrection(), "FederatedSimulation")
    assert scaffold is not None and "privtune.federated.Scaffold" in scaffold


class _GradientHook(pl.Callback):
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass


class _CountsRounds(pl.Callback):
    federated_support: ClassVar[str] = "run"
    federated_alternative: ClassVar[str] = ""

    def __init__(self) -> None:
        self.ticks = 0

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.ticks += 1


class _FitEnd(pl.Callback):
    def __init__(self) -> None:
        self.prompt: torch.Tensor | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prompt = trainer.strategy.loop.global_state["prefix"].clone()


def test_a_projects_own_callbacks(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"`_GradientHook` works on training batches or gradients \(on_after_backward\)"
    ):
        _fit(tmp_path, [_GradientHook()])
    counter, fit_end, ckpt = _CountsRounds(), _FitEnd(), ModelCheckpoint(dirpath=str(tmp_path / "ck"))
    trainer, strategy = _fit(tmp_path, [counter, fit_end, ckpt], num_rounds=2)
    assert strategy.loop.round == 2
    assert trainer.global_step == 2  # a round is one Lightning step
    assert counter.ticks == 2  # a declared callback sees one tick per round
    assert fit_end.prompt is not None and torch.equal(fit_end.prompt, strategy.loop.global_state["prefix"])
    assert list((tmp_path / "ck").glob("*.ckpt"))  # Lightning's own checkpointing works on round ticks
