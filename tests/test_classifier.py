"""The baseline TextClassifier: tuning modes, learning, bad input, checkpoints and kill-and-resume."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from privtune.callbacks import TuningReport
from privtune.datamodules import TextFile, TweetsSentiment
from privtune.modules import TextClassifier

WORDS = {"good": ["great", "fine", "love", "happy", "good"], "bad": ["awful", "hate", "sad", "bad", "price"]}


@pytest.fixture
def synthetic_csv(tmp_path):
    """Hand-made two-class text whose class is decided by its words (learnable by a tiny model)."""
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(80):
        label = "good" if i % 2 else "bad"
        lines.append(" ".join(rng.choice(WORDS[label]) for _ in range(6)) + f",{label}")
    path = tmp_path / "synthetic.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_data(path, **overrides) -> TextFile:
    kwargs = {
        "template": "Text: {text}\nSentiment:",
        "label_words": [" negative", " positive"],
        "label_names": ["bad", "good"],
        "train_size": 40,
        "val_size": 8,
        "test_size": 16,
        "max_length": 24,
        "batch_size": 8,
        "seed": 0,
    }
    kwargs.update(overrides)
    return TextFile(str(path), **kwargs)


@pytest.mark.parametrize("tuning", ["full", "lora", "prompt", "blocks"])
def test_each_tuning_mode_trains_only_what_it_should(tuning, synthetic_csv, tiny_trainer) -> None:
    module = TextClassifier("tiny-llama", tuning=tuning, lr=1e-2, trainable_blocks=[0, -1], num_virtual_tokens=4)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    tiny_trainer(max_steps=3).fit(module, datamodule=make_data(synthetic_csv))
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    if tuning == "blocks":
        assert all(".layers.0." in n or ".layers.3." in n for n in trainable)
    if tuning in ("lora", "prompt"):
        assert sum(before[n].numel() for n in trainable) < 0.2 * sum(p.numel() for p in before.values())


def test_tiny_model_learns_the_synthetic_task(synthetic_csv, tiny_trainer) -> None:
    module = TextClassifier("tiny-llama", tuning="full", lr=3e-3)
    data = make_data(synthetic_csv)
    report = TuningReport(output_dir=str(synthetic_csv.parent / "report"))
    tiny_trainer(max_epochs=6, limit_train_batches=None, callbacks=[report]).fit(module, datamodule=data)
    assert report.rows["tuned"]["acc"] >= 0.9
    assert report.rows["tuned"]["acc"] > report.rows["zero-shot"]["acc"]
    assert (synthetic_csv.parent / "report" / "tuning_report.md").read_text().count("|") > 10


def test_encoder_uses_its_head(synthetic_csv, tiny_trainer) -> None:
    module = TextClassifier("tiny-bert", tuning="lora", num_labels=2, lr=1e-2)
    assert any("classifier" in n for n, p in module.named_parameters() if p.requires_grad)
    tiny_trainer(max_steps=2).validate(module, datamodule=make_data(synthetic_csv))
    with pytest.raises(ValueError, match="`num_labels` is required"):
        TextClassifier("tiny-bert")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1e-4}, r"`lr=-0.0001` must be > 0"),
        ({"model": "no-such-model"}, r"Unknown model `name_or_path='no-such-model'`"),
        ({"tuning": "blocks"}, "needs `trainable_blocks`"),
        ({"tuning": "blocks", "trainable_blocks": [0, 9]}, r"\[9\] outside a 4-block model"),
        ({"lora_r": 0}, "`lora_r=0`"),
    ],
)
def test_bad_arguments_fail_before_training(kwargs, match) -> None:
    kwargs = {"model": "tiny-llama", **kwargs}
    with pytest.raises(ValueError, match=match):
        TextClassifier(**kwargs)


def test_decoder_without_label_words_fails_at_setup(synthetic_csv, tiny_trainer) -> None:
    data = make_data(synthetic_csv, label_words=None)
    with pytest.raises(ValueError, match="classifies by label words"):
        tiny_trainer(max_steps=1).fit(TextClassifier("tiny-llama", tuning="full"), datamodule=data)


class _Crash(pl.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")  # the process dies here, mid-epoch


@pytest.mark.parametrize(("tuning", "crash_at"), [("full", 3), ("lora", 3), ("full", 5)])
def test_kill_and_resume_matches_uninterrupted_run(tuning, crash_at, synthetic_csv, tmp_path) -> None:
    """A run stopped mid-epoch and resumed from its last checkpoint ends with the same weights and metrics."""

    def run(root, callbacks, ckpt_path=None):
        pl.seed_everything(0)
        module = TextClassifier("tiny-llama", tuning=tuning, lr=5e-3)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=8,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(root),
            callbacks=callbacks,
            deterministic=True,
            num_sanity_val_steps=0,
            limit_val_batches=1,
        )
        trainer.fit(module, datamodule=make_data(synthetic_csv), ckpt_path=ckpt_path)
        return module, trainer

    reference, _ = run(tmp_path / "a", [])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):  # 5 batches/epoch: 3 is mid-epoch, 5 at its end
        run(tmp_path / "b", [ckpt, _Crash(at_step=crash_at)])
    resumed, trainer = run(tmp_path / "b", [], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8
    ref = dict(reference.named_parameters())
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(param, ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.assets
def test_smollm2_lora_step_lowers_loss_on_a_fixed_batch() -> None:
    module = TextClassifier("smollm2-135m-instruct", tuning="lora", lr=1e-3)
    data = TweetsSentiment(
        train_size=8, val_size=3, test_size=3, batch_size=8, max_length=32, tokenizer="smollm2-135m-instruct"
    )
    data.setup("fit")
    module.label_token_ids = data.label_token_ids
    batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0]


def test_model_folder_without_tokenizer_files_is_refused_with_the_fix(tmp_path) -> None:
    from privtune.models import load_model, load_tokenizer

    folder = tmp_path / "my_model"
    load_model("tiny-llama").save_pretrained(folder)  # weights and config, no tokenizer
    with pytest.raises(ValueError, match=r"model folder without tokenizer files.*tokenizer.save_pretrained\(folder\)"):
        TextClassifier(str(folder), tuning="full")
    load_tokenizer("tiny-llama").save_pretrained(folder)
    assert TextClassifier(str(folder), tuning="full").tokenizer is not None
