"""ScaleOT stage 1 with an imitation term beside the LM loss (``HarmonizerImportance(imitation_weight=...)``)."""

from __future__ import annotations

import statistics

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from privtune.callbacks.layer_replace import LayerReplace
from privtune.emulator import install_switches, lm_loss, make_harmonizers, set_replace_mask
from privtune.modules.offsite_importance import HarmonizerImportance, harmonizer_errors


class _LM(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(3, 500, (8, 12), generator=torch.Generator().manual_seed(5))
        return DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids], 2)

    val_dataloader = train_dataloader


def _replace() -> LayerReplace:
    return LayerReplace(
        adapter_bottom=1, adapter_top=1, harmonizer_rank=8, group_size=2, num_candidates=2, error_every=1, seed=0
    )


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _with_switches(weight: float) -> tuple[HarmonizerImportance, dict]:
    module = HarmonizerImportance("tiny-llama", imitation_weight=weight)
    module.harmonizers.update(make_harmonizers(module.model.config.hidden_size, [1, 2], rank=8))
    return module, install_switches(module.model, module.harmonizers)


def test_the_imitation_term_anchors_every_harmonizer_including_those_not_replaced_this_step() -> None:
    module, switches = _with_switches(weight=1.0)
    set_replace_mask(switches, {1: False, 2: True})  # block 1 replaced, block 2 runs itself
    loss = module.training_step(_batch(), 0)
    loss.backward()
    assert all(switches[i].harmonizer.up.weight.grad.abs().sum() > 0 for i in (1, 2))
    assert (switches[1].replaced, switches[2].replaced) == (True, False)  # the sampled set is back for the LM loss

    lm_only, plain = _with_switches(weight=0.0)
    set_replace_mask(plain, {1: False, 2: True})
    lm_only.training_step(_batch(), 0).backward()
    assert plain[2].harmonizer.up.weight.grad is None  # the published loss never reaches a block that ran itself


def test_the_loss_is_the_lm_loss_plus_the_weighted_mean_normalised_error() -> None:
    module, switches = _with_switches(weight=3.0)
    with torch.no_grad():
        for switch in switches.values():  # away from the identity, so the two errors differ from 1 and each other
            torch.nn.init.normal_(switch.harmonizer.up.weight, std=0.05)
    set_replace_mask(switches, {1: False})
    batch = _batch()
    with torch.no_grad():
        total = float(module.training_step(batch, 0))
        lm = float(lm_loss(module.model, batch))  # the sampled set: block 1 replaced
        errors = harmonizer_errors(module.model, switches, batch)  # the diagnostic's path (no block left replaced)
    imitation = statistics.mean(errors.values())
    assert imitation != pytest.approx(1.0, abs=1e-3)
    assert total == pytest.approx(lm + 3.0 * imitation, rel=1e-5)
    set_replace_mask(switches, {1: False})
    module.imitation_weight = 0.0
    with torch.no_grad():
        assert float(module.training_step(batch, 0)) == pytest.approx(lm, rel=1e-5)


def test_stage1_with_the_term_keeps_the_harmonizers_closer_to_their_blocks(tiny_trainer) -> None:
    errors = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        replace = _replace()
        trainer = tiny_trainer(max_steps=4, limit_train_batches=4, callbacks=[replace])
        trainer.fit(HarmonizerImportance("tiny-llama", lr=1e-2, imitation_weight=weight), datamodule=_LM())
        errors[weight] = statistics.mean(replace.error_curve[-1][b] for b in ("1", "2"))
    # a random tiny model's blocks are beyond a rank-8 token-wise map (errors stay near or above 1 either way);
    # what the term must do is hold the harmonizers nearer their blocks than the LM loss alone (measured: 1.8 vs 6.0)
    assert errors[5.0] < 0.5 * errors[0.0]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"imitation_weight=-1.0.*>= 0"):
        HarmonizerImportance("tiny-llama", imitation_weight=-1.0)
    module = HarmonizerImportance("tiny-llama", imitation_weight=1.0)
    with pytest.raises(ValueError, match="no harmonizer.*LayerReplace"):
        module._imitation(_batch())
