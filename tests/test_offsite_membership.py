"""The offsite recipe's membership audit of the delivered models (each arm's plug-in and full fine-tuning), tiny."""

from __future__ import annotations

import json
import random
import re

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from privtune.attacks.membership import audit_model, member_split
from privtune.callbacks.layer_replace import LayerReplace
from privtune.callbacks.offsite_pipeline import OffsitePipeline
from privtune.callbacks.offsite_tuning import EmulatorExport
from privtune.eval.frontier import attack_validity, best_valid
from privtune.modules.offsite_importance import HarmonizerImportance
from privtune.recipes import offsite as recipe
from privtune.recipes.offsite import make_datamodule, plugged_classifier

WORDS = {"good": ["great", "fine", "love", "happy", "good"], "bad": ["awful", "hate", "sad", "bad", "price"]}
SIZES = {"train_size": 24, "val_size": 8, "test_size": 16, "max_length": 24, "batch_size": 8, "max_steps": 2}


class _LM(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(3, 500, (4, 12), generator=torch.Generator().manual_seed(5))
        return DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids], 2)

    val_dataloader = train_dataloader


@pytest.fixture
def task_csv(tmp_path):
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(60):
        label = "good" if i % 2 else "bad"
        lines.append(" ".join(rng.choice(WORDS[label]) for _ in range(6)) + f",{label}")
    path = tmp_path / "task.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _pipeline(folder, csv, **kw) -> OffsitePipeline:
    words = {"template": "Text: {text}\nSentiment:", "label_words": [" negative", " positive"]}
    return OffsitePipeline(str(folder), task=str(csv), lr=1e-2, label_names=["bad", "good"], **SIZES | words | kw)


def _run(tmp_path, pipeline: OffsitePipeline, tiny_trainer) -> dict:
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75)
    replace = LayerReplace(adapter_bottom=1, adapter_top=1, harmonizer_rank=8, group_size=2, num_candidates=2, seed=0)
    module = HarmonizerImportance("tiny-llama", lr=1e-2)
    tiny_trainer(max_steps=1, callbacks=[replace, export, pipeline]).fit(module, datamodule=_LM())
    return json.loads((tmp_path / "report" / "offsite_report.json").read_text())


def test_every_delivered_model_is_audited_on_disjoint_equal_sets(tmp_path, task_csv, tiny_trainer) -> None:
    pipeline = _pipeline(
        tmp_path / "report", task_csv, uniform_drop_layers=1, membership_audit=True, audit_examples=12, audit_seed=3
    )
    report = _run(tmp_path, pipeline, tiny_trainer)
    membership = report["membership"]
    assert set(membership) == {"full_ft", "scaleot", "ot_uniform_drop_1-1-1"} == set(report["arms"]) | {"full_ft"}
    idx_in, idx_out = member_split(SIZES["train_size"], SIZES["test_size"], size=12, seed=3)
    dm = make_datamodule(pipeline.settings, "tiny-llama")
    dm.setup("fit")
    for arm, rep in membership.items():
        assert set(rep["attacks"]) == {"loss", "reference", "min_k", "zlib"}, arm
        for attack in rep["attacks"].values():
            assert attack["n_members"] == attack["n_nonmembers"] == 12
            assert 0.0 <= attack["auc"]["low"] <= attack["auc"]["value"] <= attack["auc"]["high"] <= 1.0
        meta = rep["meta"]
        assert (meta["model"], meta["reference"], meta["nonmember_split"]) == (arm, "untuned base model", "test")
        assert (meta["member_indices"], meta["nonmember_indices"]) == (idx_in.tolist(), idx_out.tolist())
        assert meta["data_owner_epochs"] == pytest.approx(2 / 3, abs=1e-3)  # 2 steps of the 3 batches of 24 examples
        members = {dm.splits["train"].texts[i] for i in meta["member_indices"]}
        nonmembers = {dm.splits["test"].texts[i] for i in meta["nonmember_indices"]}
        assert len(members) == len(nonmembers) == 12 and not members & nonmembers
        # the frontier reads it as it reads membership_report.json
        controls = {"verdicts": {name: {"positive": True} for name in rep["attacks"]}}
        validity = attack_validity(rep, controls)
        assert set(validity) == set(rep["attacks"])
        assert best_valid(rep, validity) is None or best_valid(rep, validity)["auc"]["value"] >= 0.0
    # scored as the audit library scores the plug-in model the data owner's adapters give
    plugged = plugged_classifier("tiny-llama", tmp_path / "report" / "adapters")
    loaders = [
        DataLoader(Subset(loader.dataset, idx.tolist()), batch_size=8, collate_fn=loader.collate_fn)
        for loader, idx in ((dm.train_dataloader(), idx_in), (dm.test_dataloader(), idx_out))
    ]
    again = audit_model(plugged.model, *loaders, task="label_word", label_token_ids=dm.label_token_ids, seed=3)
    assert again.attacks["loss"].auc.value == pytest.approx(membership["scaleot"]["attacks"]["loss"]["auc"]["value"])
    markdown = (tmp_path / "report" / "offsite_report.md").read_text()
    for arm in membership:
        assert re.search(rf"^\| {re.escape(arm)} \| 12 \| \d\.\d{{3}} \[\d\.\d{{3}}, \d\.\d{{3}}\] \|", markdown, re.M)


def test_with_the_option_off_nothing_is_audited(tmp_path, task_csv, tiny_trainer, monkeypatch) -> None:
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("an audit was started with `membership_audit: false`")

    monkeypatch.setattr(recipe, "PlugInAudit", refuse)
    report = _run(tmp_path, _pipeline(tmp_path / "report", task_csv, max_steps=1), tiny_trainer)
    assert "membership" not in report and report["meta"]["membership_audit"] is False
    assert "membership audit" not in (tmp_path / "report" / "offsite_report.md").read_text()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"audit_examples": 1}, "audit_examples=1"),
        ({"audit_examples": 0}, "audit_examples=0"),
        ({"audit_seed": -1}, "audit_seed=-1"),
        ({"membership_audit": True, "test_size": 1}, "`membership_audit` draws .* each must be >= 2"),
    ],
)
def test_bad_audit_settings_are_refused_before_stage_1(tmp_path, task_csv, bad, message) -> None:
    # at construction, so before the model owner's stage 1 starts
    with pytest.raises(ValueError, match=message):
        _pipeline(tmp_path / "report", task_csv, **bad)
