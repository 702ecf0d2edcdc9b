"""EmbeddingShaking in someone else's project: its own batches (dict under another key, tuples, objects), two
Hugging Face models in one module, and ShakenTokenizer as a datamodule's tokenizer (tiny models)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from privtune.callbacks.embedding_shaking import EmbeddingShaking
from privtune.data.encoding import PromptTemplate
from privtune.models import load_model, load_tokenizer, tiny_tokenizer
from privtune.shaking import KeySetting, ShakeKey, ShakenTokenizer, shaking_state
from privtune.shaking.batches import BatchIds, UnreadableBatchError

IDS = torch.randint(3, 512, (8, 6), generator=torch.Generator().manual_seed(0))


class Outside(pl.LightningModule):
    """A user's module: a random-init Hugging Face LM, its own DataLoader, its own batch format."""

    def __init__(self, batches: Dataset, read, teacher: bool = False) -> None:  # noqa: ANN001 - read: batch -> ids, labels
        super().__init__()
        self.model = load_model("tiny-llama")
        if teacher:
            self.teacher = load_model("tiny-llama", seed=1).requires_grad_(False)
        self.batches, self.read, self.seen = batches, read, []

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201, D102
        ids, labels = self.read(batch)
        self.seen.append((ids.clone(), labels.clone()))
        return self.model(input_ids=ids, labels=labels).loss

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        return DataLoader(self.batches, batch_size=4, shuffle=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:  # noqa: D102
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)


class DictData(Dataset):
    def __init__(self, name: str) -> None:
        self.name = name

    def __len__(self) -> int:
        return len(IDS)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {self.name: IDS[i], "target": IDS[i]}


def _fit(tiny_trainer, module: pl.LightningModule, cb: EmbeddingShaking) -> None:
    tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[cb]).fit(module)


def _plain(module: Outside) -> torch.Tensor:
    return module.model.get_input_embeddings().weight.detach().clone()


# ---------------------------------------------------------------------------------------------- 5. batches
def test_dict_batches_under_another_key_are_shaken(tiny_trainer, tmp_path):
    module = Outside(DictData("tokens"), lambda b: (b["tokens"], b["target"]))
    cb = EmbeddingShaking(str(tmp_path / "k.json"), batch_key="tokens", labels_key="target", recovery="none")
    _fit(tiny_trainer, module, cb)
    for step, (ids, labels) in enumerate(module.seen):
        plain = IDS[4 * step : 4 * step + 4]
        assert torch.equal(ids, cb.key.encode_ids(plain)) and torch.equal(labels, cb.key.encode_ids(plain))
        assert not torch.equal(ids, plain)


def test_dict_batches_without_the_key_are_refused_at_setup(tiny_trainer, tmp_path):
    module = Outside(DictData("tokens"), lambda b: (b["tokens"], b["target"]))
    before = _plain(module)
    with pytest.raises(UnreadableBatchError, match=r"first training batch.*keys \['target', 'tokens'\].*batch_key"):
        _fit(tiny_trainer, module, EmbeddingShaking(str(tmp_path / "k.json")))
    assert module.seen == [] and shaking_state(module.model) == "plain"  # refused before shaking or training
    assert torch.equal(_plain(module), before) and not (tmp_path / "k.json").exists()


def test_tuple_batches_need_an_index_and_say_which_element_holds_labels(tiny_trainer, tmp_path):
    mask = torch.ones_like(IDS)
    data = TensorDataset(IDS, mask, IDS.clone())
    read = lambda b: (b[0], b[2])  # noqa: E731
    with pytest.raises(UnreadableBatchError, match="`batch_key='input_ids'` names a key, but the batch is a sequence"):
        _fit(tiny_trainer, Outside(data, read), EmbeddingShaking(str(tmp_path / "k.json")))
    with pytest.raises(UnreadableBatchError, match=r"elements \[1, 2\] are integer tensors shaped like the ids"):
        _fit(tiny_trainer, Outside(data, read), EmbeddingShaking(str(tmp_path / "k.json"), batch_key=0))
    with pytest.raises(UnreadableBatchError, match="`batch_key=5` is out of range"):
        _fit(tiny_trainer, Outside(data, read), EmbeddingShaking(str(tmp_path / "k.json"), batch_key=5))
    module = Outside(data, read)
    cb = EmbeddingShaking(str(tmp_path / "k.json"), batch_key=0, labels_key=2, recovery="none")
    _fit(tiny_trainer, module, cb)
    ids, labels = module.seen[0]
    assert torch.equal(ids, cb.key.encode_ids(IDS[:4])) and torch.equal(labels, cb.key.encode_ids(IDS[:4]))
    assert torch.equal(data.tensors[0], IDS)  # mapped in place on the collated copy, never on the dataset


class Stream(IterableDataset):
    """An iterable dataset (cannot be peeked at setup) yielding a batch format the callback cannot read."""

    def __iter__(self):  # noqa: ANN204
        for row in IDS:
            yield {"tokens": row, "target": row}


def test_an_unreadable_batch_that_cannot_be_peeked_fails_at_the_first_batch(tiny_trainer, tmp_path):
    module = Outside(Stream(), lambda b: (b["tokens"], b["target"]))
    original = _plain(module)
    with pytest.raises(UnreadableBatchError, match="training batch.*no key `batch_key='input_ids'`"):
        _fit(tiny_trainer, module, EmbeddingShaking(str(tmp_path / "k.json"), chain_length=1))
    assert module.seen == []  # no step ran on plain ids
    assert shaking_state(module.model) == "plain"  # and the failed run left the model unshaken
    assert torch.allclose(_plain(module), original, atol=1e-6)


@dataclass
class Batch:
    tokens: torch.Tensor


def test_an_ids_getter_reads_any_batch_and_maps_it_in_place(tiny_trainer, tmp_path):
    class Objects(Dataset):
        def __len__(self) -> int:
            return len(IDS)

        def __getitem__(self, i: int) -> torch.Tensor:
            return IDS[i]

    module = Outside(Objects(), lambda b: (b.tokens, b.tokens))
    module.train_dataloader = lambda: DataLoader(Objects(), batch_size=4, collate_fn=lambda r: Batch(torch.stack(r)))
    cb = EmbeddingShaking(str(tmp_path / "k.json"), ids_getter=lambda b: b.tokens, recovery="none")
    _fit(tiny_trainer, module, cb)
    assert torch.equal(module.seen[0][0], cb.key.encode_ids(IDS[:4]))
    with pytest.raises(UnreadableBatchError, match="neither a mapping nor a list/tuple"):
        _fit(tiny_trainer, Outside(Objects(), lambda b: (b.tokens, b.tokens)), EmbeddingShaking(str(tmp_path / "j")))


def test_batch_reading_without_a_trainer():
    key = ShakeKey.generate(KeySetting(chain_length=0), torch.zeros(512, 4), seed=3)
    from transformers import BatchEncoding

    enc = BatchEncoding({"input_ids": IDS.clone(), "attention_mask": torch.ones_like(IDS), "labels": IDS.clone()})
    BatchIds().shake(enc, key)  # a BatchEncoding is a mapping, not a dict: read, never skipped
    assert torch.equal(enc["input_ids"], key.encode_ids(IDS)) and torch.equal(enc["labels"], key.encode_ids(IDS))
    classes = {"input_ids": IDS.clone(), "labels": torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])}
    BatchIds().shake(classes, key)
    assert torch.equal(classes["labels"], torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]))  # class labels left alone
    with pytest.raises(UnreadableBatchError, match="gives Tensor torch.float32, not an integer tensor"):
        BatchIds().shake({"input_ids": IDS.float()}, key)
    with pytest.raises(UnreadableBatchError, match="`labels_key='target'` is not an integer tensor"):
        BatchIds(labels_key="target").shake({"input_ids": IDS.clone()}, key)
    kept = (IDS.clone(),)
    reader = BatchIds(batch_key=0)
    reader.shake(kept, key)
    with pytest.raises(UnreadableBatchError, match="the same ids tensor arrived twice"):
        reader.shake(kept, key)  # a loader that yields the tensor it keeps would be mapped twice
    with pytest.raises(ValueError, match="`labels_key=0` must differ"):
        BatchIds(batch_key=0, labels_key=0)


# ---------------------------------------------------------------------------------------------- 6. two models
def test_two_hugging_face_models_need_model_attr(tiny_trainer, tmp_path):
    module = Outside(DictData("input_ids"), lambda b: (b["input_ids"], b["target"]), teacher=True)
    student, teacher = _plain(module), module.teacher.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ValueError, match=r"2 Hugging Face models.*\(model, teacher\).*`model_attr='model'`"):
        _fit(tiny_trainer, module, EmbeddingShaking(str(tmp_path / "k.json")))
    assert torch.equal(_plain(module), student) and shaking_state(module.model) == "plain"
    with pytest.raises(ValueError, match=r"`model_attr='student'`.*found in it are \['model', 'teacher'\]"):
        _fit(tiny_trainer, module, EmbeddingShaking(str(tmp_path / "k.json"), model_attr="student"))
    cb = EmbeddingShaking(str(tmp_path / "k.json"), model_attr="model", chain_length=0, recovery="none")
    _fit(tiny_trainer, module, cb)
    assert shaking_state(module.model) == "shaken" and shaking_state(module.teacher) == "plain"
    assert torch.equal(_plain(module), student[cb.key.inv_perm])
    assert torch.equal(module.teacher.get_input_embeddings().weight, teacher)


def test_a_peft_wrapped_model_counts_once(tiny_trainer, tmp_path):
    from peft import LoraConfig, get_peft_model

    module = Outside(DictData("input_ids"), lambda b: (b["input_ids"], b["target"]))
    module.model = get_peft_model(module.model, LoraConfig(r=2, target_modules=["q_proj"]))
    cb = EmbeddingShaking(str(tmp_path / "k.json"), chain_length=0, recovery="none")
    _fit(tiny_trainer, module, cb)
    assert shaking_state(module.model) == "shaken"


# ---------------------------------------------------------------------------------------------- 7. tokenizer
def _check_prompt_encoding(tok) -> None:  # noqa: ANN001
    key = ShakeKey.generate(KeySetting(chain_length=0), torch.zeros(len(tok), 4), pinned=tok.all_special_ids, seed=2)
    shaken = ShakenTokenizer(tok, key)
    assert hasattr(shaken, "build_inputs_with_special_tokens") == hasattr(tok, "build_inputs_with_special_tokens")
    template = PromptTemplate("Tweet: {text}\nSentiment:")
    texts = ["the good show", "the awful film and the sad show"]
    plain = template.encode(tok, texts, 12)
    got = template.encode(shaken, texts, 12)
    assert got == [key.encode_ids(torch.tensor(row)).tolist() for row in plain]
    assert got != plain


def test_shaken_tokenizer_encodes_prompts_with_the_tiny_tokenizer():
    _check_prompt_encoding(tiny_tokenizer())


def test_shaken_tokenizer_wraps_special_tokens_only_where_the_tokenizer_adds_them():
    class WithSpecials:
        """A BERT-style tokenizer: [CLS]=2 ... [SEP]=1 around the ids."""

        all_special_ids = [0, 1, 2]

        def __init__(self) -> None:
            self.inner = tiny_tokenizer()

        def __len__(self) -> int:
            return len(self.inner)

        def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
            return self.inner(*args, **kwargs)

        def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
            return [2, *ids, 1]

    tok = WithSpecials()
    key = ShakeKey.generate(KeySetting(chain_length=0), torch.zeros(512, 4), pinned=[0, 1, 2], seed=4)
    shaken = ShakenTokenizer(tok, key)
    ids = key.encode_ids(torch.tensor([10, 20])).tolist()
    assert shaken.build_inputs_with_special_tokens(ids) == [2, *ids, 1]
    _check_prompt_encoding(tok)
    with pytest.raises(AttributeError):
        ShakenTokenizer(tiny_tokenizer(), key).build_inputs_with_special_tokens  # noqa: B018


@pytest.mark.assets
def test_shaken_tokenizer_encodes_prompts_with_smollm2s_tokenizer():
    tok = load_tokenizer("smollm2-135m-instruct")
    _check_prompt_encoding(tok)
    key = ShakeKey.generate(KeySetting(chain_length=0), torch.zeros(len(tok), 4), pinned=tok.all_special_ids, seed=5)
    chat = [{"role": "user", "content": "the good show"}]
    plain = tok.apply_chat_template(chat, tokenize=True)
    shaken = ShakenTokenizer(tok, key).apply_chat_template(chat, tokenize=True)
    plain_ids = plain["input_ids"] if hasattr(plain, "keys") else plain
    shaken_ids = shaken["input_ids"] if hasattr(shaken, "keys") else shaken
    assert shaken_ids == key.encode_ids(torch.tensor(plain_ids)).tolist() != plain_ids  # never plain ids
    text = tok.apply_chat_template(chat, tokenize=False)
    assert ShakenTokenizer(tok, key).apply_chat_template(chat, tokenize=False) == text


def test_peeking_follows_the_loader_batch_sampler_and_unbatched_loaders(tiny_trainer, tmp_path):
    from torch.utils.data import BatchSampler, SequentialSampler

    data = TensorDataset(IDS)
    module = Outside(data, lambda b: (b[0], b[0]))
    module.train_dataloader = lambda: DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 4, False))
    cb = EmbeddingShaking(str(tmp_path / "k.json"), batch_key=0, recovery="none")
    _fit(tiny_trainer, module, cb)  # no false refusal from a peek that batches differently from the loader
    assert torch.equal(module.seen[0][0], cb.key.encode_ids(IDS[:4]))

    class Prebatched(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": IDS[4 * i : 4 * i + 4].clone(), "labels": IDS[4 * i : 4 * i + 4].clone()}

    module = Outside(Prebatched(), lambda b: (b["input_ids"], b["labels"]))
    module.train_dataloader = lambda: DataLoader(Prebatched(), batch_size=None)
    cb = EmbeddingShaking(str(tmp_path / "k.json"), recovery="none")
    _fit(tiny_trainer, module, cb)
    assert torch.equal(module.seen[1][1], cb.key.encode_ids(IDS[4:]))


def test_federated_strategies_are_told_to_refuse_shaking(tmp_path):
    from privtune.contracts import FederatedAware
    from privtune.strategies.callback_policy import refusal

    cb = EmbeddingShaking(str(tmp_path / "k.json"))
    assert isinstance(cb, FederatedAware) and cb.federated_support == "refuse"
    assert "ShakenTokenizer" in refusal(cb, "FederatedSimulation")
