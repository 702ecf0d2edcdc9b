"""Measured layer importance (``EmulatorExport(importance: measured)``, docs/offsite_tuning.md "Diagnosis"): each
candidate block scored by the owner's LM loss rise when it alone runs its trained harmonizer; a harmful harmonizer's
block is kept, the emulator is built from these scores, and the model is left as it was."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from privtune.callbacks.layer_replace import LayerReplace
from privtune.callbacks.offsite_tuning import EmulatorExport
from privtune.contracts import ContractError
from privtune.emulator import install_switches, read_plan, remove_switches, set_replace_mask
from privtune.emulator.harmonizer import Harmonizer, LayerSwitch
from privtune.emulator.measured_importance import corpus_loss, measured_importance
from privtune.models import get_blocks, load_model
from privtune.modules.offsite_importance import HarmonizerImportance


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(3, 500, (2 * n, 12), generator=torch.Generator().manual_seed(3))
    return [
        {"input_ids": ids[i : i + 2], "attention_mask": torch.ones_like(ids[i : i + 2]), "labels": ids[i : i + 2]}
        for i in range(0, 2 * n, 2)
    ]


def _harmonizers(bad: int) -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    harmonizers = torch.nn.ModuleDict({str(i): Harmonizer(32, 8) for i in (1, 2)})
    torch.nn.init.normal_(harmonizers[str(bad)].up.weight, std=3.0)  # far from any block: a harmful stand-in
    torch.nn.init.normal_(harmonizers[str(bad)].down.weight, std=3.0)
    return harmonizers


def test_scores_are_the_loss_rise_of_each_harmonizer_alone_and_the_model_is_left_as_it_was() -> None:
    model = load_model("tiny-llama").train()
    batches = _batches()
    before = [type(b) for b in get_blocks(model)]
    harmonizers = _harmonizers(bad=2)
    scores = measured_importance(model, harmonizers, batches)
    assert [type(b) for b in get_blocks(model)] == before and model.training  # no switch left, mode restored
    model.eval()
    base = corpus_loss(model, batches)
    for k, index in enumerate((1, 2)):  # by value: the loss with that block alone swapped, minus the base
        switches = install_switches(model, {str(index): harmonizers[str(index)]})
        set_replace_mask(switches, {index: False})
        assert scores[k].item() == pytest.approx(corpus_loss(model, batches) - base, rel=1e-5, abs=1e-6)
        remove_switches(model)
    assert scores[1] > scores[0]  # the harmful harmonizer's block is the important one (kept)


def test_installed_stage1_switches_are_used_and_left_running_their_blocks() -> None:
    model = load_model("tiny-llama").eval()
    harmonizers = _harmonizers(bad=1)
    switches = install_switches(model, harmonizers)
    fresh = measured_importance(load_model("tiny-llama").eval(), harmonizers, _batches())
    torch.testing.assert_close(measured_importance(model, harmonizers, _batches()), fresh)
    assert all(isinstance(get_blocks(model)[i], LayerSwitch) for i in switches)
    assert not any(s.replaced for s in switches.values())
    with pytest.raises(ValueError, match="at least one"):
        measured_importance(model, harmonizers, [])


class _LM(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(3, 500, (8, 12), generator=torch.Generator().manual_seed(5))
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
        return DataLoader(rows, batch_size=2)

    val_dataloader = train_dataloader


def test_export_builds_the_emulator_from_the_measured_scores(tmp_path, tiny_trainer) -> None:
    torch.manual_seed(0)
    module = HarmonizerImportance("tiny-llama")
    replace = LayerReplace(adapter_bottom=1, adapter_top=1, harmonizer_rank=8, group_size=2, num_candidates=2, seed=0)
    export = EmulatorExport(
        str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.5, importance="measured",
        importance_batches=2,
    )  # fmt: skip
    tiny_trainer(max_steps=2, callbacks=[replace, export]).fit(module, _LM())
    plan = read_plan(tmp_path / "emu")
    measured = export.measured_scores
    assert plan.info["importance"] == "measured" and plan.info["measured_importance"] == measured
    torch.testing.assert_close(module.layer_importance.cpu(), torch.tensor(measured, dtype=torch.float64))
    middle = sorted(int(k) for k in module.harmonizers)
    lowest = middle[min(range(len(middle)), key=lambda i: measured[i])]
    assert [i for i, kind in plan.middle if kind == "harmonizer"] == [lowest]  # α = 0.5 of 2: the lower rise


def test_bad_importance_settings_are_refused_before_training(tiny_trainer) -> None:
    with pytest.raises(ValueError, match="importance='loo'.*importance_batches=0"):
        EmulatorExport("x", importance="loo", importance_batches=0)  # type: ignore[arg-type]
    export = EmulatorExport("x", adapter_layers=2, beta=0.5, beta_mlp=0.5, importance="measured")
    replace = LayerReplace(adapter_bottom=1, adapter_top=1, harmonizer_rank=8, group_size=2, num_candidates=2)
    with pytest.raises(ContractError, match="importance: measured"):
        tiny_trainer(max_steps=1, callbacks=[replace, export]).fit(
            HarmonizerImportance("tiny-llama"), train_dataloaders=_LM().train_dataloader()
        )
