"""ScaleOT stage-1 diagnostics: each harmonizer's normalised error through training and the owner's loss curve."""

from __future__ import annotations

import json
import math
import random

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from privtune.callbacks.layer_replace import LayerReplace
from privtune.callbacks.offsite_pipeline import OffsitePipeline
from privtune.callbacks.offsite_tuning import EmulatorExport
from privtune.emulator import install_switches, make_harmonizers
from privtune.models import get_blocks, load_model
from privtune.modules.offsite_importance import HarmonizerImportance, harmonizer_errors

WORDS = {"good": ["great", "fine", "love"], "bad": ["awful", "hate", "sad"]}


class _LM(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(3, 500, (6, 12), generator=torch.Generator().manual_seed(5))
        return DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids], 2)

    val_dataloader = train_dataloader


def _replace(**kw) -> LayerReplace:
    args = {"adapter_bottom": 1, "adapter_top": 1, "harmonizer_rank": 8, "group_size": 2, "num_candidates": 2}
    return LayerReplace(**args | kw, seed=0)


class ZeroMap(torch.nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(h)


def test_harmonizer_error_is_one_for_a_layer_drop_and_follows_its_definition() -> None:
    model = load_model("tiny-llama")
    hidden = model.config.hidden_size
    switches = install_switches(model, make_harmonizers(hidden, [1, 2], rank=8))
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    errors = harmonizer_errors(model, switches, batch)
    assert set(errors) == {1, 2}
    assert all(e == pytest.approx(1.0, abs=1e-5) for e in errors.values())  # identity start: h_out - h_in missed

    seen = {}
    handle = switches[1].block.register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(
            h_in=args[0] if args else kwargs["hidden_states"], h_out=out[0] if isinstance(out, tuple) else out
        ),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(**batch)
    handle.remove()
    h_out = seen["h_out"]
    expected = float((h_out**2).sum() / ((h_out - seen["h_in"]) ** 2).sum())
    switches[1].harmonizer = ZeroMap()  # a harmonizer that outputs nothing misses all of h_out
    assert harmonizer_errors(model, switches, batch)[1] == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx(1.0, abs=1e-3)
    assert not any(s.replaced for s in switches.values())  # the switches are left on their blocks
    assert len(get_blocks(model)) == 4


def test_layer_replace_records_each_blocks_error_through_training_and_resumes_it(tiny_trainer) -> None:
    module = HarmonizerImportance("tiny-llama", lr=5e-2)
    replace = _replace(error_every=2)
    tiny_trainer(max_steps=3, limit_train_batches=3, callbacks=[replace]).fit(module, datamodule=_LM())
    assert [row["step"] for row in replace.error_curve] == [1, 2, 3]  # the first step, every 2nd, the last
    assert all(set(row) == {"step", "1", "2"} for row in replace.error_curve)
    first, last = replace.error_curve[0], replace.error_curve[-1]
    assert all(math.isfinite(row[b]) and row[b] > 0 for row in replace.error_curve for b in ("1", "2"))
    assert first["1"] != last["1"]  # the harmonizers trained between the measurements
    again = _replace(error_every=2)
    again.load_state_dict(replace.state_dict())
    assert again.error_curve == replace.error_curve
    off = _replace(error_every=0)
    tiny_trainer(max_steps=1, callbacks=[off]).fit(HarmonizerImportance("tiny-llama"), datamodule=_LM())
    assert off.error_curve == []
    with pytest.raises(ValueError, match="error_every=-1"):
        _replace(error_every=-1)


@pytest.mark.parametrize("imitation_weight", [0.0, 1.0])
def test_the_pipeline_report_carries_the_stage1_curves(tmp_path, tiny_trainer, imitation_weight: float) -> None:
    rng = random.Random(0)
    rows = [f"{' '.join(rng.choice(WORDS[lab]) for _ in range(5))},{lab}" for lab in ["good", "bad"] * 20]
    (tmp_path / "task.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75)
    pipeline = OffsitePipeline(
        str(tmp_path / "report"), task=str(tmp_path / "task.csv"), train_size=16, val_size=8, test_size=8,
        max_length=16, batch_size=8, max_steps=1, lr=1e-2, template="Text: {text}\nSentiment:",
        label_words=[" negative", " positive"], label_names=["bad", "good"],
    )  # fmt: skip
    callbacks = [_replace(error_every=1), export, pipeline]
    tiny_trainer(max_steps=2, limit_train_batches=2, callbacks=callbacks).fit(
        HarmonizerImportance("tiny-llama", lr=1e-2, imitation_weight=imitation_weight), datamodule=_LM()
    )
    curves = json.loads((tmp_path / "report" / "offsite_report.json").read_text())["stage1_curves"]
    assert curves["loss"]["step"] == [1, 2] and len(curves["loss"]["loss"]) == 2
    if imitation_weight:  # the two parts of the loss, each step: loss = lm + λ_im · imitation
        parts = zip(curves["loss"]["loss"], curves["loss"]["lm"], curves["loss"]["imitation"])
        assert all(total == pytest.approx(lm + imitation_weight * im, rel=1e-5) for total, lm, im in parts)
    else:
        assert set(curves["loss"]) == {"step", "loss"}
    assert all(math.isfinite(v) and v > 0 for v in curves["loss"]["loss"])
    assert curves["harmonizer_error"]["step"] == [1, 2] and set(curves["harmonizer_error"]) == {"step", "1", "2"}
    assert "layer drop" in curves["harmonizer_error_definition"]
    markdown = (tmp_path / "report" / "offsite_report.md").read_text()
    assert "| block 1 harmonizer: normalised error (step 1 → 2) |" in markdown
    assert "| loss (step 1 → 2) |" in markdown
