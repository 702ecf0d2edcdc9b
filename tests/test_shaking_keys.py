"""Keys that cannot be swapped: resume under any key path, identity keys, key options against the key file,
and a failed run that leaves the model as it came (tiny models)."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from privtune.callbacks.embedding_shaking import EmbeddingShaking, KeyMismatchError
from privtune.datamodules import TextFile
from privtune.modules import TextClassifier
from privtune.shaking import KeySetting, ShakeKey, shake_model, shaking_state
from privtune.shaking.key import compare_key_options

POS = ["good", "great", "happy", "love", "fine", "okay"]
NEG = ["bad", "awful", "sad", "hate"]


@pytest.fixture
def csv_file(tmp_path: Path) -> str:
    rows = ["text,label"]
    rows += [f"the {a} and {b} show,positive" for a, b in itertools.product(POS, POS)]
    rows += [f"the {a} and {b} film,negative" for a, b in itertools.product(NEG, NEG + NEG[:2])]
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
        test_size=8,
        max_length=24,
        batch_size=8,
        seed=0,
    )


def _module(tuning: str = "full") -> TextClassifier:
    pl.seed_everything(0)
    return TextClassifier(model="tiny-llama", tuning=tuning, lr=1e-2)


def _key(seed: int, **setting) -> ShakeKey:
    return ShakeKey.generate(KeySetting(**setting), torch.randn(512, 32), seed=seed)


def _trained_checkpoint(tiny_trainer, csv_file: str, tmp_path: Path, key_path: Path) -> Path:
    cb = EmbeddingShaking(str(key_path), chain_length=1, recovery="none")
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[cb])
    trainer.fit(_module(), datamodule=_data(csv_file))
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


# ---------------------------------------------------------------------------------------------- 1. resume
def test_resume_under_another_key_path_is_refused_showing_both_fingerprints(tiny_trainer, csv_file, tmp_path, caplog):
    original = tmp_path / "a" / "k.json"
    ckpt = _trained_checkpoint(tiny_trainer, csv_file, tmp_path, original)
    saved = torch.load(ckpt, weights_only=True)
    assert not any(str(original) in name for name in saved["callbacks"])  # the state is not keyed by the path
    key_a = ShakeKey.load(original)
    other = tmp_path / "b" / "k.json"
    ShakeKey.generate(KeySetting(chain_length=1), torch.randn(512, 32)).save(other)  # a real 128-bit seed
    key_b = ShakeKey.load(other)
    cb = EmbeddingShaking(str(other), recovery="none")
    with caplog.at_level(logging.WARNING), pytest.raises(KeyMismatchError) as err:
        tiny_trainer(max_steps=2, callbacks=[cb]).fit(_module(), datamodule=_data(csv_file), ckpt_path=ckpt)
    message = str(err.value)
    assert key_a.fingerprint() in message and key_b.fingerprint() in message
    for secret in (key_a.to_dict()["seed"], key_b.to_dict()["seed"]):
        assert secret not in message and secret not in caplog.text
    assert "checkpoint's key" in caplog.text  # the module holds the checkpoint's weights: not "recovered"
    # a missing key file under a new path: refused, and no new key is left behind
    missing = tmp_path / "c" / "k.json"
    with pytest.raises(KeyMismatchError, match=f"needs the key the checkpoint was trained with.*{key_a.fingerprint()}"):
        tiny_trainer(max_steps=2, callbacks=[EmbeddingShaking(str(missing), recovery="none")]).fit(
            _module(), datamodule=_data(csv_file), ckpt_path=ckpt
        )
    assert not missing.exists()


def test_resume_with_the_same_key_under_another_path_continues(tiny_trainer, csv_file, tmp_path):
    original = tmp_path / "a" / "k.json"
    ckpt = _trained_checkpoint(tiny_trainer, csv_file, tmp_path, original)
    moved = tmp_path / "moved" / "k.json"
    moved.parent.mkdir()
    shutil.copy(original, moved)
    cb = EmbeddingShaking(str(moved), recovery="none")
    module = _module()
    tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[cb]).fit(
        module, datamodule=_data(csv_file), ckpt_path=ckpt
    )
    assert cb.key == ShakeKey.load(original) and shaking_state(module.model) == "shaken"


def test_checkpoint_state_keyed_by_an_old_path_is_still_checked(tiny_trainer, csv_file, tmp_path):
    ckpt = _trained_checkpoint(tiny_trainer, csv_file, tmp_path, tmp_path / "k.json")
    saved = torch.load(ckpt, weights_only=True)
    # the form older versions wrote: the callback state under a key-path-derived name
    (state,) = saved["callbacks"].values()
    saved["callbacks"] = {"EmbeddingShaking{'key_path': '/old/k.json'}": state}
    torch.save(saved, ckpt)
    other = tmp_path / "other.json"
    _key(7, chain_length=1).save(other)
    with pytest.raises(KeyMismatchError, match="different key"):
        tiny_trainer(max_steps=2, callbacks=[EmbeddingShaking(str(other))]).fit(
            _module(), datamodule=_data(csv_file), ckpt_path=ckpt
        )
    # a checkpoint of a run without shaking: its tables are not shaken with any key of ours
    del saved["privtune_shaking"]
    saved["callbacks"] = {}
    torch.save(saved, ckpt)
    with pytest.raises(ValueError, match="no `privtune_shaking` record"):
        tiny_trainer(max_steps=2, callbacks=[EmbeddingShaking(str(tmp_path / "k.json"))]).fit(
            _module(), datamodule=_data(csv_file), ckpt_path=ckpt
        )


def test_a_model_shaken_with_another_key_is_refused_at_setup(tiny_trainer, csv_file, tmp_path):
    module = _module()
    shake_model(module.model, _key(1, chain_length=1))
    before = module.model.get_input_embeddings().weight.detach().clone()
    _key(2, chain_length=1).save(tmp_path / "k.json")
    with pytest.raises(KeyMismatchError, match="shaken with the key of fingerprint"):
        tiny_trainer(max_steps=1, callbacks=[EmbeddingShaking(str(tmp_path / "k.json"))]).fit(
            module, datamodule=_data(csv_file)
        )
    assert torch.equal(module.model.get_input_embeddings().weight, before)


# ---------------------------------------------------------------------------------------------- 2. identity
def test_an_identity_key_is_refused_unless_allowed(tiny_trainer, csv_file, tmp_path):
    with pytest.raises(ValueError, match="identity key.*allow_identity_key"):
        EmbeddingShaking(str(tmp_path / "k.json"), permute=False, chain_length=0)
    identity = tmp_path / "identity.json"
    _key(3, chain_length=0, permute=False).save(identity)
    module = _module()
    before = module.model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ValueError, match="holds an identity key"):
        tiny_trainer(max_steps=1, callbacks=[EmbeddingShaking(str(identity))]).fit(module, datamodule=_data(csv_file))
    assert shaking_state(module.model) == "plain"
    assert torch.equal(module.model.get_input_embeddings().weight, before)
    cb = EmbeddingShaking(str(identity), allow_identity_key=True, recovery="none")
    tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(module, datamodule=_data(csv_file))
    assert cb.key.is_identity and torch.equal(module.model.get_input_embeddings().weight, before)


def test_a_key_without_permutation_warns_that_the_ids_are_plain(tiny_trainer, csv_file, tmp_path):
    cb = EmbeddingShaking(str(tmp_path / "k.json"), permute=False, chain_length=1, recovery="none")
    with pytest.warns(UserWarning, match="no vocabulary permutation: the ids the cloud sees are the plain ids"):
        tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(_module(), datamodule=_data(csv_file))
    assert not cb.key.is_identity


# ---------------------------------------------------------------------------------------------- 3. options
def test_key_options_that_contradict_the_key_file_are_an_error():
    key = _key(4, operators=("gaussian",), chain_length=1, scales={"gaussian": {"kappa": 0.5}})
    assert compare_key_options(key, {}) == []
    assert compare_key_options(key, {"operators": ["gaussian"], "chain_length": 1, "permute": True}) == []
    assert compare_key_options(key, {"scales": {"gaussian": {"kappa": 0.5}}, "pin": "special"}) == []
    cases = {
        "permute": (False, "`permute=False` (the file has True)"),
        "chain_length": (2, "`chain_length=2` (the file has 1)"),
        "chain": (["tilt"], "`chain=['tilt']` (the file has ['gaussian'])"),
        "operators": (["tilt"], "`operators=['tilt']` (the file has ['gaussian'])"),
        "pin": ("none", "`pin='none'` (the file has 'special')"),
        "scales": ({"gaussian": {"kappa": 0.2}}, "`scales.gaussian.kappa=0.2` (the file has 0.5)"),
    }
    for option, (value, expected) in cases.items():
        with pytest.raises(ValueError, match="contradicts the configured key option") as err:
            compare_key_options(key, {option: value}, source="`key_path='k.json'`")
        assert expected in str(err.value) and "k.json" in str(err.value), option
    # every conflict is named at once
    with pytest.raises(ValueError, match="chain_length=2.*permute=False"):
        compare_key_options(key, {"permute": False, "chain_length": 2})
    ignored = compare_key_options(key, {"operators": ["gaussian", "tilt"], "scales": {"laplace": {"kappa": 0.3}}})
    assert any("['tilt']" in item for item in ignored) and any("scales.laplace" in item for item in ignored)


def test_conflicting_options_fail_at_setup_and_ignored_ones_warn(tiny_trainer, csv_file, tmp_path):
    key_path = tmp_path / "k.json"
    _key(5, chain_length=1).save(key_path)  # gaussian, default scale, permuted
    module = _module()
    before = module.model.get_input_embeddings().weight.detach().clone()
    cb = EmbeddingShaking(str(key_path), permute=False, scales={"gaussian": {"kappa": 0.3}})
    with pytest.raises(
        ValueError, match=r"`permute=False` \(the file has True\).*`scales.gaussian.kappa=0.3` \(the file has 0.5\)"
    ):
        tiny_trainer(max_steps=1, callbacks=[cb]).fit(module, datamodule=_data(csv_file))
    assert torch.equal(module.model.get_input_embeddings().weight, before)
    cb = EmbeddingShaking(str(key_path), operators=["gaussian", "tilt"], recovery="none")
    with pytest.warns(UserWarning, match=r"configured key options are ignored: operators \['tilt'\]"):
        tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(module, datamodule=_data(csv_file))
    assert cb.key == ShakeKey.load(key_path)


# ---------------------------------------------------------------------------------------------- 4. failures
class FailsAtStep2(TextClassifier):
    """A module whose second training step raises (a crash in the middle of fit), after noting what it saw."""

    def training_step(self, batch, batch_idx):  # noqa: D102
        if self.global_step == 1:
            with torch.no_grad():
                self.seen = batch["input_ids"].clone(), self.model(input_ids=batch["input_ids"]).logits
            raise RuntimeError("boom at step 2")
        return super().training_step(batch, batch_idx)


def test_a_failed_run_leaves_the_model_unshaken(tiny_trainer, csv_file, tmp_path, caplog):
    pl.seed_everything(0)
    module = FailsAtStep2(model="tiny-llama", tuning="lora", lr=1e-2)
    original = {k: v.detach().clone() for k, v in module.model.state_dict().items() if "lora_" not in k}
    dm = _data(csv_file)
    cb = EmbeddingShaking(str(tmp_path / "k.json"), operators=["gaussian", "tilt"], chain_length=2, recovery="none")
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="boom at step 2"):
        tiny_trainer(max_steps=4, limit_val_batches=0, callbacks=[cb]).fit(module, datamodule=dm)
    assert module.global_step == 1 and shaking_state(module.model) == "plain"
    after = module.model.state_dict()
    for name, value in original.items():  # the shaken (frozen) tables come back; LoRA left the rest alone
        assert torch.allclose(after[name], value, atol=1e-6), name
    assert torch.equal(module.label_token_ids.cpu(), dm.label_token_ids)
    assert "restored to the original model" in caplog.text
    # the restored model can be shaken again by a new run
    cb2 = EmbeddingShaking(str(tmp_path / "k.json"), recovery="none")
    tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[cb2]).fit(_module("lora"), datamodule=_data(csv_file))


def test_a_failed_run_with_trained_tables_is_recovered_horizontally(tiny_trainer, csv_file, tmp_path):
    pl.seed_everything(0)
    module = FailsAtStep2(model="tiny-llama", tuning="full", lr=1e-2)
    cb = EmbeddingShaking(str(tmp_path / "k.json"), chain_length=1, freeze_shaken=False, recovery="none")
    with pytest.raises(RuntimeError, match="boom"):
        tiny_trainer(max_steps=4, limit_val_batches=0, callbacks=[cb]).fit(module, datamodule=_data(csv_file))
    assert shaking_state(module.model) == "recovered-horizontal"
    # function-preserving: on plain ids the model gives the logits the shaken model gave on the shaken ids
    shaken_ids, shaken_logits = module.seen
    with torch.no_grad():
        plain_logits = module.model(input_ids=cb.key.decode_ids(shaken_ids)).logits
    assert torch.allclose(cb.key.plain_logits(shaken_logits), plain_logits, atol=1e-5)


def test_an_unrecoverable_failure_logs_where_the_key_is(tiny_trainer, csv_file, tmp_path, caplog, monkeypatch):
    import privtune.callbacks.embedding_shaking as shaking_callback

    def broken(model, key):  # noqa: ANN001, ANN202
        raise RuntimeError("cannot recover")

    monkeypatch.setattr(shaking_callback, "restore_plain", broken)
    pl.seed_everything(0)
    module = FailsAtStep2(model="tiny-llama", tuning="lora", lr=1e-2)
    key_path = tmp_path / "k.json"
    cb = EmbeddingShaking(str(key_path), chain_length=1, recovery="none")
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="boom"):
        tiny_trainer(max_steps=4, limit_val_batches=0, callbacks=[cb]).fit(module, datamodule=_data(csv_file))
    assert shaking_state(module.model) == "shaken"
    assert str(key_path) in caplog.text and "recover_model" in caplog.text and cb.key.fingerprint() in caplog.text
    assert key_path.exists() and cb.key.to_dict()["seed"] not in caplog.text


def test_the_fingerprint_is_recorded_in_the_model_config_but_never_the_seed(tmp_path):
    from privtune.models import load_model

    model = load_model("tiny-llama")
    key = ShakeKey.generate(KeySetting(chain_length=1), model.get_input_embeddings().weight)  # a real 128-bit seed
    shake_model(model, key)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["privtune_shaking_key"] == key.fingerprint()
    assert key.to_dict()["seed"] not in (tmp_path / "m" / "config.json").read_text()


class SaveOnFailure(pl.Callback):
    """Saves a checkpoint in ``on_exception`` after EmbeddingShaking's, as train.py's SIGTERM saver does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(self, trainer, pl_module, exception) -> None:  # noqa: ANN001, D102
        trainer.save_checkpoint(self.path)


def test_a_checkpoint_saved_after_the_model_was_restored_resumes_shaken(tiny_trainer, csv_file, tmp_path):
    key_path = str(tmp_path / "k.json")

    def run(module: TextClassifier, max_steps: int, extra=(), ckpt_path=None) -> TextClassifier:  # noqa: ANN001
        cb = EmbeddingShaking(key_path, chain_length=1, recovery="none")
        trainer = tiny_trainer(max_steps=max_steps, max_epochs=10, limit_train_batches=1, limit_val_batches=0)
        trainer.callbacks[:0] = [cb, *extra]
        trainer.fit(module, datamodule=_data(csv_file), ckpt_path=ckpt_path)
        return module

    straight = run(_module(), 2)
    failing = FailsAtStep2(model="tiny-llama", tuning="full", lr=1e-2)
    with pytest.raises(RuntimeError, match="boom"):
        run(failing, 4, extra=[SaveOnFailure(tmp_path / "failed.ckpt")])
    assert shaking_state(failing.model) == "plain"
    saved = torch.load(tmp_path / "failed.ckpt", weights_only=True)
    assert saved["privtune_shaking"]["weights"] == "plain" and saved["global_step"] == 1
    resumed = run(_module(), 2, ckpt_path=tmp_path / "failed.ckpt")
    assert shaking_state(resumed.model) == "shaken"
    a, b = straight.state_dict(), resumed.state_dict()
    for name in a:  # the plain tables in the checkpoint were shaken again on resume
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_fitting_a_recovered_model_again_is_refused(tiny_trainer, csv_file, tmp_path):
    module = _module("lora")
    cb = EmbeddingShaking(str(tmp_path / "k.json"), chain_length=1, recovery="horizontal")
    tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(module, datamodule=_data(csv_file))
    assert shaking_state(module.model) == "recovered-horizontal"
    with pytest.raises(ValueError, match="would train it unshaken"):
        tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[cb]).fit(module, datamodule=_data(csv_file))
    assert shaking_state(module.model) == "recovered-horizontal"
    tiny_trainer(limit_test_batches=1, callbacks=[cb]).test(module, datamodule=_data(csv_file))  # evaluating is fine


class FailsInTest(TextClassifier):
    """A module whose test step raises."""

    def test_step(self, batch, batch_idx):  # noqa: D102
        raise RuntimeError("boom in test")


def test_a_failed_later_run_leaves_a_model_that_came_shaken_shaken(tiny_trainer, csv_file, tmp_path):
    pl.seed_everything(0)
    module = FailsInTest(model="tiny-llama", tuning="lora", lr=1e-2)
    cb = EmbeddingShaking(str(tmp_path / "k.json"), chain_length=1, recovery="none")
    tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(module, datamodule=_data(csv_file))
    shaken = module.model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom in test"):
        tiny_trainer(limit_test_batches=1, callbacks=[cb]).test(module, datamodule=_data(csv_file))
    assert shaking_state(module.model) == "shaken"  # it came shaken (recovery="none"), so it stays shaken
    assert torch.equal(module.model.get_input_embeddings().weight, shaken)


def test_evaluating_a_plain_model_under_shaking_gives_it_back_plain(tiny_trainer, csv_file, tmp_path):
    module = _module("lora")
    plain = module.model.get_input_embeddings().weight.detach().clone()
    dm = _data(csv_file)
    cb = EmbeddingShaking(str(tmp_path / "k.json"), chain_length=1)
    shaken_acc = tiny_trainer(limit_test_batches=1, callbacks=[cb]).test(module, datamodule=dm)[0]["test/acc"]
    assert shaking_state(module.model) == "plain"
    assert torch.allclose(module.model.get_input_embeddings().weight, plain, atol=1e-6)
    assert torch.equal(module.label_token_ids.cpu(), dm.label_token_ids)
    assert 0.0 <= shaken_acc <= 1.0
    kept = EmbeddingShaking(str(tmp_path / "k.json"), recovery="none")  # private inference: stays shaken
    tiny_trainer(limit_test_batches=1, callbacks=[kept]).test(module, datamodule=dm)
    assert shaking_state(module.model) == "shaken"
