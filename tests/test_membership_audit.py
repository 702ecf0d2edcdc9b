"""MembershipAudit in a Lightning run: the report it writes, its reference pass, and its set-up checks."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from privtune.attacks.membership import example_statistics
from privtune.callbacks import MembershipAudit
from privtune.contracts import ContractError
from privtune.data import EncodedClassification, PadCollator
from privtune.datamodules import TextFile
from privtune.modules import TextClassifier

WORDS = ["good", "great", "happy", "love", "fine", "bad", "awful", "sad", "hate", "okay"]


@pytest.fixture
def csv_file(tmp_path: Path) -> str:
    rows = ["text,label"]
    for i, (a, b) in enumerate(itertools.product(WORDS, WORDS)):
        rows.append(f"the {a} and {b} show,{'positive' if i % 2 else 'negative'}")  # labels carry no signal
    path = tmp_path / "synthetic.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _data(csv_file: str) -> TextFile:
    return TextFile(
        csv_file,
        template="Tweet: {text}\nSentiment:",
        label_words=[" negative", " positive"],
        train_size=24,
        val_size=8,
        test_size=24,
        max_length=24,
        batch_size=8,
        seed=0,
    )


def test_audit_writes_report_with_every_attack(tiny_trainer, csv_file, tmp_path):
    pl.seed_everything(0)
    module = TextClassifier(model="tiny-llama", tuning="full", lr=1e-3)
    untuned = copy.deepcopy(module.model)
    audit = MembershipAudit(max_examples=24, output_dir=str(tmp_path / "audit"))
    trainer = tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[audit])
    trainer.fit(module, datamodule=_data(csv_file))
    report = json.loads((tmp_path / "audit" / "membership_report.json").read_text())
    assert report == audit.report
    assert set(report["attacks"]) == {"loss", "reference", "min_k", "zlib"}
    assert report["meta"]["task"] == "label_word" and report["meta"]["nonmember_split"] == "test"
    assert report["meta"]["steps"] == trainer.global_step > 0
    for res in report["attacks"].values():
        assert res["n_members"] == res["n_nonmembers"] == 24
        assert res["auc"]["low"] <= res["auc"]["value"] <= res["auc"]["high"]
        assert set(res) >= {"auc", "tpr@1%", "tpr@0.1%"}
    for res in report["negative_control"].values():
        assert res["n_members"] == res["n_nonmembers"] == 12
    assert "| loss |" in (tmp_path / "audit" / "membership_report.md").read_text()
    # the reference is the model as it entered training, scored on the same members
    ref = example_statistics(
        untuned, audit._loaders[0], task="label_word", label_token_ids=module.label_token_ids, token_stats=False
    )
    kept = audit.state_dict()["reference"]["member"]["loss"]
    assert torch.allclose(torch.tensor(kept, dtype=torch.float64), torch.tensor(ref.loss), atol=1e-5)
    tuned = example_statistics(
        module.model, audit._loaders[0], task="label_word", label_token_ids=module.label_token_ids, token_stats=False
    )
    assert not torch.allclose(torch.tensor(kept, dtype=torch.float64), torch.tensor(tuned.loss), atol=1e-5)
    restored = MembershipAudit()
    restored.load_state_dict(audit.state_dict())  # a resumed run keeps the first start's reference
    assert restored.state_dict() == audit.state_dict()


def test_explicit_loaders_and_causal_lm_batches(tiny_trainer, tmp_path):
    pl.seed_everything(0)
    module = TextClassifier(model="tiny-llama", tuning="full", lr=1e-2)
    collate = PadCollator(0)
    seqs = [[3 + (i * 7 + j) % 200 for j in range(10)] for i in range(20)]
    lm = EncodedClassification(seqs, [0] * 20)
    lm_items = [{"input_ids": s} for s in seqs]
    members = DataLoader(lm_items[:10], batch_size=5, collate_fn=collate)
    nonmembers = DataLoader(lm_items[10:], batch_size=5, collate_fn=collate)
    audit = MembershipAudit(
        member_dataloader=members, nonmember_dataloader=nonmembers, reference=False, output_dir=str(tmp_path)
    )
    assert len(lm) == 20
    audit._loaders = audit._sample_loaders(trainer=None)  # type: ignore[arg-type]
    assert audit._resolve_task(audit._loaders[0]) == "causal_lm"
    stats = audit._statistics(module, audit._loaders[0])
    assert len(stats) == 10 and stats.min_k is not None and stats.zlib_bytes is not None


def test_setup_refuses_missing_model_and_data(tiny_trainer, csv_file):
    module = TextClassifier(model="tiny-llama", tuning="none")
    trainer = tiny_trainer(max_steps=1, callbacks=[MembershipAudit(model_attr="net")])
    with pytest.raises(ContractError, match="model_attr='net'"):
        trainer.fit(module, datamodule=_data(csv_file))
    loader = DataLoader([{"input_ids": [1, 2], "labels": 0}], collate_fn=PadCollator(0))
    trainer = tiny_trainer(max_steps=1, callbacks=[MembershipAudit()])
    with pytest.raises(ContractError, match="no datamodule"):
        trainer.fit(module, train_dataloaders=loader)


def test_federated_runs_are_refused_with_the_alternative():
    from privtune.contracts import FederatedAware
    from privtune.strategies.callback_policy import refusal

    audit = MembershipAudit()
    assert isinstance(audit, FederatedAware) and audit.federated_support == "refuse"
    reason = refusal(audit, "FederatedSimulation")
    assert reason is not None and "audit_model" in reason


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="nonmember_split='train'"):
        MembershipAudit(nonmember_split="train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="draws=10"):
        MembershipAudit(draws=10)
    with pytest.raises(ValueError, match="max_examples=1"):
        MembershipAudit(max_examples=1)
    with pytest.raises(ValueError, match="both"):
        MembershipAudit(member_dataloader=DataLoader([1]))


def test_shaken_model_is_refused_at_fit_end(tiny_trainer, csv_file, tmp_path):
    from privtune.callbacks.embedding_shaking import EmbeddingShaking

    pl.seed_everything(0)
    module = TextClassifier(model="tiny-llama", tuning="lora", lr=1e-2)
    shaking = EmbeddingShaking(str(tmp_path / "k.json"), chain_length=0, recovery="none")
    audit = MembershipAudit(max_examples=8, reference=False, output_dir=str(tmp_path))
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[shaking, audit])
    with pytest.raises(ValueError, match="still shaken"):
        trainer.fit(module, datamodule=_data(csv_file))
    assert torch.is_tensor(module.label_token_ids)
