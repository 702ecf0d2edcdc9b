"""ShakeRecovery (key implantation) with EmbeddingShaking, then private tuning of the implanted model."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from privtune.callbacks.embedding_shaking import EmbeddingShaking
from privtune.datamodules import LMCorpus, TextFile
from privtune.modules import TextClassifier
from privtune.modules.recovery import ShakeRecovery
from privtune.shaking import KeySetting, ShakeKey, shaking_state

WORDS = ["the", "market", "film", "game", "team", "music", "news", "price"] + [
    "shares",
    "court",
    "good",
    "bad",
    "great",
    "awful",
    "happy",
    "sad",
]


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    lines = ["text"] + [
        f"the {a} and the {b} was {c}" for a, b, c in itertools.islice(itertools.product(WORDS, repeat=3), 120)
    ]
    path = tmp_path / "public.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_implantation_then_private_tuning(tiny_trainer, corpus, tmp_path):
    key_path = str(tmp_path / "k.json")
    save_dir = tmp_path / "implanted"
    module = ShakeRecovery(model="tiny-llama", awareness_steps=3, k=2, lr=1e-3, save_dir=str(save_dir))
    shaker = EmbeddingShaking(key_path, operators=["gaussian"], chain_length=1, shake_batches=False, recovery="none")
    data = LMCorpus(corpus, block_size=16, batch_size=4, max_train_blocks=16, max_val_blocks=4)

    trainer = tiny_trainer(max_steps=6, max_epochs=5, limit_val_batches=1, callbacks=[shaker])
    trainer.fit(module, datamodule=data)
    key = ShakeKey.load(key_path)
    assert shaking_state(module.model) == "shaken"
    trained = [p for p in module.model.parameters() if p.requires_grad]
    assert trained and all(not p.requires_grad for p in module.model.get_input_embeddings().parameters())
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert not any(k.startswith("_teacher") for k in module.state_dict())  # the public teacher is not saved
    assert (save_dir / "config.json").is_file()
    assert "seed" not in (save_dir / "config.json").read_text()

    # private tuning of the implanted (already shaken) model: the callback must not shake it again
    rows = (
        ["text,label"] + [f"the {w} show,positive" for w in WORDS[:8]] + [f"the {w} film,negative" for w in WORDS[8:]]
    )
    (tmp_path / "task.csv").write_text("\n".join(rows) + "\n")
    task = TextFile(
        str(tmp_path / "task.csv"),
        template="Tweet: {text}\nSentiment:",
        label_words=[" negative", " positive"],
        train_size=8,
        val_size=4,
        test_size=4,
        max_length=16,
        batch_size=4,
    )
    clf = TextClassifier(model=str(save_dir), tuning="lora", lr=1e-2)
    assert shaking_state(clf.model) == "shaken"
    before = clf.model.get_input_embeddings().weight.detach().clone()
    tuner = EmbeddingShaking(key_path, recovery="horizontal")
    tiny_trainer(max_steps=2, limit_val_batches=1, callbacks=[tuner]).fit(clf, datamodule=task)
    assert tuner.key == key and shaking_state(clf.model) == "recovered-horizontal"
    assert torch.equal(clf.model.get_input_embeddings().weight, before[key.perm])


def test_recovery_module_needs_the_shaking_callback(tiny_trainer, corpus):
    module = ShakeRecovery(model="tiny-llama")
    with pytest.raises(ValueError, match="exactly one EmbeddingShaking"):
        tiny_trainer(max_steps=1).fit(module, datamodule=LMCorpus(corpus, block_size=16, batch_size=4))
    with pytest.raises(ValueError, match="lambda_kl=-1"):
        ShakeRecovery(model="tiny-llama", lambda_kl=-1)


def test_recovery_module_gets_the_key_from_the_callback_and_refuses_batch_mapping(tiny_trainer, corpus, tmp_path):
    from privtune.contracts import ShakingKeyUser

    module = ShakeRecovery(model="tiny-llama")
    assert isinstance(module, ShakingKeyUser)
    before = module.model.get_input_embeddings().weight.detach().clone()
    mapping = EmbeddingShaking(str(tmp_path / "k.json"), recovery="none")  # shake_batches left on
    with pytest.raises(ValueError, match="maps batches itself.*shake_batches: false"):
        tiny_trainer(max_steps=1, callbacks=[mapping]).fit(module, datamodule=LMCorpus(corpus, block_size=16))
    assert shaking_state(module.model) == "plain"  # refused before the student was shaken
    assert torch.equal(module.model.get_input_embeddings().weight, before)
    other = ShakeKey.generate(KeySetting(chain_length=1), before, seed=3)
    module.key = other
    with pytest.raises(ValueError, match="already holds the key of fingerprint"):
        module.attach_shaking_key(ShakeKey.generate(KeySetting(chain_length=1), before, seed=4), maps_batches=False)
