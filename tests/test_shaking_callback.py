"""EmbeddingShaking in a Lightning run: lossless horizontal tuning, recovery, checkpoints, resume, hygiene."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from privtune.callbacks.embedding_shaking import EmbeddingShaking
from privtune.datamodules import TextFile
from privtune.modules import TextClassifier
from privtune.shaking import KeySetting, ShakeKey, shaking_state

POS = ["good", "great", "happy", "love", "fine", "okay"]
NEG = ["bad", "awful", "sad", "hate"]


@pytest.fixture
def csv_file(tmp_path: Path) -> str:
    rows = ["text,label"]
    for a, b in itertools.product(POS, POS):
        rows.append(f"the {a} and {b} show,positive")
    for a, b in itertools.product(NEG, NEG + NEG[:2]):
        rows.append(f"the {a} and {b} film,negative")
    path = tmp_path / "synthetic.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _data(csv_file: str, batch_size: int = 8) -> TextFile:
    return TextFile(
        csv_file,
        template="Tweet: {text}\nSentiment:",
        label_words=[" negative", " positive"],
        train_size=24,
        val_size=8,
        test_size=8,
        max_length=24,
        batch_size=batch_size,
        seed=0,
    )


def _module(tuning: str = "lora") -> TextClassifier:
    pl.seed_everything(0)
    return TextClassifier(model="tiny-llama", tuning=tuning, lr=1e-2)


def _params(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_horizontal_shaking_trains_exactly_like_plain(tiny_trainer, csv_file, tmp_path):
    plain = _module()
    tiny_trainer(max_steps=3, limit_val_batches=1).fit(plain, datamodule=_data(csv_file))
    shaken = _module()
    cb = EmbeddingShaking(str(tmp_path / "k.json"), chain_length=0, recovery="horizontal")
    trainer = tiny_trainer(max_steps=3, limit_val_batches=1, callbacks=[cb])
    trainer.fit(shaken, datamodule=_data(csv_file))
    assert shaking_state(shaken.model) == "recovered-horizontal"
    a, b = _params(plain), _params(shaken)
    assert a.keys() == b.keys()
    for name in a:  # the permutation only re-indexes: identical gradients, identical weights
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    plain_acc = tiny_trainer(limit_test_batches=1).test(plain, datamodule=_data(csv_file))[0]["test/acc"]
    shaken_acc = tiny_trainer(limit_test_batches=1, callbacks=[cb]).test(shaken, datamodule=_data(csv_file))[0][
        "test/acc"
    ]
    assert plain_acc == shaken_acc


def test_recovered_model_with_plain_ids_matches_shaken_model_with_shaken_ids(tiny_trainer, csv_file, tmp_path):
    module = _module()
    cb = EmbeddingShaking(str(tmp_path / "k.json"), operators=["gaussian", "tilt"], chain_length=2, recovery="none")
    trainer = tiny_trainer(max_steps=3, limit_val_batches=1, callbacks=[cb])
    dm = _data(csv_file)
    trainer.fit(module, datamodule=dm)
    assert shaking_state(module.model) == "shaken" and not torch.equal(cb.key.perm, torch.arange(512))
    batch = next(iter(dm.test_dataloader()))
    module.eval()
    with torch.no_grad():
        plain_ids = dm.label_token_ids
        shaken_out = module.model(
            input_ids=cb.key.encode_ids(batch["input_ids"]), attention_mask=batch["attention_mask"]
        ).logits
        cb.recovery = "horizontal"
        cb.on_train_end(trainer, module)
        assert shaking_state(module.model) == "recovered-horizontal"
        assert torch.equal(module.label_token_ids, plain_ids)
        plain_out = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(cb.key.plain_logits(shaken_out), plain_out)


@pytest.mark.parametrize(("policy", "tuning"), [("shaken", "full"), ("recovered", "full"), ("recovered", "lora")])
def test_kill_and_resume_keeps_the_key_and_ends_with_the_same_weights(tiny_trainer, csv_file, tmp_path, policy, tuning):
    key_path = str(tmp_path / "k.json")

    # One full batch per epoch and checkpoints at epoch ends: the resumed data order is then exactly the
    # straight run's, so any difference in the final weights comes from the shaking state.
    def run(max_steps: int, ckpt_path: str | None = None, save: bool = False) -> TextClassifier:
        module = _module(tuning=tuning)
        cb = EmbeddingShaking(key_path, chain_length=1, recovery="none", checkpoint_weights=policy)
        saver = ModelCheckpoint(
            dirpath=tmp_path / "ckpt", every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1
        )
        trainer = tiny_trainer(
            max_steps=max_steps,
            max_epochs=10,
            limit_train_batches=1,
            limit_val_batches=0,
            callbacks=[cb, saver] if save else [cb],
            enable_checkpointing=save,
        )
        trainer.fit(module, datamodule=_data(csv_file, batch_size=24), ckpt_path=ckpt_path)
        return module

    straight = run(5)
    key = ShakeKey.load(key_path)
    run(3, save=True)
    ckpt = next((tmp_path / "ckpt").glob("*step=3*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["privtune_shaking"]["weights"] == ("shaken" if policy == "shaken" else "recovered-horizontal")
    emb = "model.model.embed_tokens.weight"
    if tuning == "full":  # a recovered checkpoint does not hold the shaken table (LoRA checkpoints hold no table)
        assert torch.equal(saved["state_dict"][emb], _params(straight)[emb]) == (policy == "shaken")
    resumed = run(5, ckpt_path=str(ckpt))
    assert ShakeKey.load(key_path) == key
    a, b = _params(straight), _params(resumed)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_resume_with_another_key_is_refused(tiny_trainer, csv_file, tmp_path):
    key_path = tmp_path / "k.json"
    cb = EmbeddingShaking(str(key_path), chain_length=0, recovery="none")
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[cb])
    trainer.fit(_module(tuning="full"), datamodule=_data(csv_file))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    key_path.unlink()
    other = EmbeddingShaking(str(key_path), chain_length=0, recovery="none")
    with pytest.raises(ValueError, match="needs the key the checkpoint was trained with"):
        tiny_trainer(max_steps=2, callbacks=[other]).fit(_module("full"), datamodule=_data(csv_file), ckpt_path=ckpt)
    assert not key_path.exists()  # no wrong key left behind
    ShakeKey.generate(KeySetting(chain_length=0), torch.zeros(512, 32), seed=99).save(key_path)
    other = EmbeddingShaking(str(key_path), chain_length=0, recovery="none")
    with pytest.raises(ValueError, match="different key"):
        tiny_trainer(max_steps=2, callbacks=[other]).fit(_module("full"), datamodule=_data(csv_file), ckpt_path=ckpt)


def test_the_key_never_reaches_checkpoints_logs_or_config(tiny_trainer, csv_file, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    key_path = tmp_path / "secret" / "k.json"
    cb = EmbeddingShaking(str(key_path), operators=["gaussian"], chain_length=1, recovery="none")
    module = _module(tuning="full")
    trainer = tiny_trainer(max_steps=2, limit_val_batches=1, callbacks=[cb], logger=CSVLogger(tmp_path / "logs"))
    trainer.fit(module, datamodule=_data(csv_file))
    trainer.save_checkpoint(tmp_path / "cloud.ckpt")
    module.model.save_pretrained(tmp_path / "cloud_model")
    key = ShakeKey.load(key_path)
    assert (key_path.stat().st_mode & 0o777) == 0o600
    seed = key.to_dict()["seed"]
    for path in [*(tmp_path / "logs").rglob("*"), tmp_path / "cloud.ckpt", *(tmp_path / "cloud_model").rglob("*")]:
        if path.is_file():
            assert seed.encode() not in path.read_bytes(), path
    saved = torch.load(tmp_path / "cloud.ckpt", weights_only=True)
    tensors = list(saved["state_dict"].values())
    assert not any(t.shape == key.perm.shape and t.dtype == torch.long for t in tensors)
    flat = json.dumps(saved.get("callbacks", {}), default=str) + json.dumps(
        saved.get("hyper_parameters", {}), default=str
    )
    assert seed not in flat and '"seed"' not in flat


def test_bad_configuration_fails_before_training(tiny_trainer, csv_file, tmp_path):
    with pytest.raises(ValueError, match="Unknown shaking operator 'rotate'"):
        EmbeddingShaking(str(tmp_path / "k.json"), operators=["rotate"])
    with pytest.raises(ValueError, match=r"gaussian.kappa=0.0"):
        EmbeddingShaking(str(tmp_path / "k.json"), scales={"gaussian": {"kappa": 0.0}})
    with pytest.raises(ValueError, match="`recovery='partial'`"):
        EmbeddingShaking(str(tmp_path / "k.json"), recovery="partial")
    wrong = tmp_path / "wrong.json"
    ShakeKey.generate(KeySetting(), torch.zeros(100, 32), seed=1).save(wrong)
    module = _module()
    before = copy.deepcopy(module.model.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="vocabulary of 100 ids.*512 rows"):
        tiny_trainer(max_steps=1, callbacks=[EmbeddingShaking(str(wrong))]).fit(module, datamodule=_data(csv_file))
    assert torch.equal(module.model.get_input_embeddings().weight, before)

    class NoEmbedding(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="Cannot find the input embedding"):
        EmbeddingShaking(str(tmp_path / "k2.json")).setup(tiny_trainer(), NoEmbedding(), "fit")
    assert not (tmp_path / "k2.json").exists()
