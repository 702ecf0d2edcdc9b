"""Bad user data is refused with the file, the line and the fix; what can be read is read.

Every case is a row of docs/reliability/data.md. The files are hand-written synthetic rows (no dataset text).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from privtune.data import encode_lm_blocks, read_table, read_texts
from privtune.datamodules import LMCorpus, TextFile
from privtune.models import tiny_tokenizer
from privtune.modules import TextClassifier

ROWS = [("the film was great", "pos"), ("awful price and bad show", "neg"), ("fine match", "pos")] * 4


def _csv(rows: list[tuple[str, str]]) -> str:
    return "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows)


def _jsonl(rows: list[tuple[str, str]]) -> str:
    return "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows)


def test_header_only_csv_is_refused_naming_the_file(tmp_path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("text,label\n")
    with pytest.raises(ValueError, match=r"header\.csv has no data rows \(columns found: \['text', 'label'\]\)"):
        TextFile(str(path))


def test_empty_file_is_refused(tmp_path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl has no data rows"):
        TextFile(str(path))


@pytest.mark.parametrize("missing", ["nan", "", "NaN", "None", "null"])
def test_missing_labels_are_refused_naming_their_lines(tmp_path, missing) -> None:
    rows = list(ROWS)
    rows[2] = ("fine match", missing)  # file line 4
    rows[7] = ("bad show", missing)  # file line 9
    path = tmp_path / "labels.csv"
    path.write_text(_csv(rows))
    with pytest.raises(ValueError, match=r"labels\.csv: line 4, line 9 \(2 rows\) have no label.*`label_names`"):
        TextFile(str(path))


def test_a_class_called_nan_is_read_when_label_names_lists_it(tmp_path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(_csv([*ROWS, ("odd one", "nan")]))
    data = read_table(path, label_names=["neg", "nan", "pos"])
    assert data.label_names[data.labels[-1]] == "nan" and len(data) == len(ROWS) + 1


@pytest.mark.parametrize("label", [None, float("nan")])
def test_json_null_and_nan_labels_are_refused_with_their_line(tmp_path, label) -> None:
    lines = [json.dumps({"text": t, "label": lab}) for t, lab in ROWS]
    lines[5] = json.dumps({"text": "a text", "label": label})  # json.dumps writes NaN for a float nan
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"labels\.jsonl: line 6 \(1 rows\) have no label"):
        read_table(path)


def test_empty_texts_are_refused_naming_their_lines(tmp_path) -> None:
    rows = list(ROWS)
    rows[0] = ("", "pos")
    path = tmp_path / "texts.csv"
    path.write_text(_csv(rows))
    with pytest.raises(ValueError, match=r"texts\.csv: line 2 \(1 rows\) have an empty `text`"):
        TextFile(str(path))


def test_non_utf8_file_names_the_file_the_line_and_the_encoding_option(tmp_path) -> None:
    path = tmp_path / "latin.csv"
    rows = [*ROWS, ("caf\u00e9 cr\u00e8me", "pos")]
    path.write_bytes(_csv(rows).encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv: byte 0xe9 on line 14 is not valid utf-8.*`encoding: latin-1`"):
        TextFile(str(path))
    data = TextFile(str(path), encoding="latin-1")._dataset
    assert data.texts[-1] == "caf\u00e9 cr\u00e8me"


def test_unknown_encoding_name_is_refused(tmp_path) -> None:
    path = tmp_path / "x.csv"
    path.write_text(_csv(ROWS))
    with pytest.raises(ValueError, match=r"`encoding='utf-9'` is not an encoding"):
        read_table(path, encoding="utf-9")


def test_lm_corpus_takes_an_encoding(tmp_path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_bytes(("text\n" + "caf\u00e9 noir et cr\u00e8me\n" * 40).encode("cp1252"))
    with pytest.raises(ValueError, match=r"corpus\.csv: byte 0xe9 on line 2.*encoding"):
        LMCorpus(str(path), block_size=8, tokenizer="tiny-llama").setup("fit")
    assert read_texts(path, encoding="cp1252")[0] == "caf\u00e9 noir et cr\u00e8me"
    dm = LMCorpus(str(path), block_size=8, tokenizer="tiny-llama", encoding="cp1252")
    dm.setup("fit")
    assert dm.blocks["train"].shape[1] == 8


def test_malformed_json_lines_line_is_reported_with_its_real_number(tmp_path) -> None:
    lines = [json.dumps({"text": f"row {i}", "label": "pos" if i % 2 else "neg"}) for i in range(70)]
    lines[57] = '{"text": "row 57", "label": "pos"'  # file line 58: no closing brace
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 58: not valid JSON"):
        TextFile(str(path))


def test_json_lines_line_that_is_not_an_object_is_refused(tmp_path) -> None:
    path = tmp_path / "lists.jsonl"
    path.write_text(_jsonl(ROWS[:3]) + '["a", "b"]\n')
    with pytest.raises(ValueError, match=r"lists\.jsonl, line 4: a JSON list, not an object"):
        read_table(path)


def test_json_array_file_is_read_like_json_lines(tmp_path) -> None:
    lines = tmp_path / "rows.jsonl"
    lines.write_text(_jsonl(ROWS))
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"text": t, "label": lab} for t, lab in ROWS], indent=2))
    also_lines = tmp_path / "lines.json"
    also_lines.write_text(_jsonl(ROWS))
    expected = read_table(lines)
    for path in (array, also_lines):
        got = read_table(path)
        assert got.texts == expected.texts and got.labels == expected.labels
    assert read_texts(array) == expected.texts


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"data": [{"text": "a", "label": "b"}],\n "version": 1}', r"obj\.json, line 1: not valid JSON"),
        ('[{"text": "a", "label": "pos"},\n {"text": "b", "label": "neg"},\n 3]', r"obj\.json, item 2 of the array"),
        ('[{"text": "a", "label": "pos"},\n {"text": "b" "label": "neg"}]', r"obj\.json, line 2: not valid JSON"),
        ('"just a string"', r"obj\.json, line 1: a JSON str, not an object"),
    ],
)
def test_json_file_that_is_not_an_array_of_objects_is_refused(tmp_path, content, match) -> None:
    path = tmp_path / "obj.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_table(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_utf8_byte_order_mark_is_accepted(tmp_path, suffix) -> None:
    path = tmp_path / f"bom{suffix}"
    path.write_text(_csv(ROWS) if suffix == ".csv" else _jsonl(ROWS), encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    data = read_table(path)
    assert data.texts[0] == "the film was great" and data.label_names == ["neg", "pos"]


def test_csv_row_with_an_unquoted_delimiter_is_refused(tmp_path) -> None:
    path = tmp_path / "commas.csv"
    path.write_text(_csv(ROWS[:3]) + "great film, really,pos\n")
    with pytest.raises(ValueError, match=r"commas\.csv, line 5: 3 fields but the header has 2.*quote fields"):
        TextFile(str(path))


def test_single_class_file_is_refused(tmp_path) -> None:
    path = tmp_path / "one.csv"
    path.write_text(_csv([(t, "pos") for t, _ in ROWS]))
    with pytest.raises(ValueError, match=r"one\.csv: `label_column='label'` holds one class \['pos'\]"):
        TextFile(str(path))


# ---------------------------------------------------------------------- lengths against the model


@pytest.fixture
def synthetic_csv(tmp_path):
    rng = random.Random(0)
    words = {"good": ["great", "fine", "love"], "bad": ["awful", "hate", "sad"]}
    lines = ["text,label"]
    for i in range(40):
        label = "good" if i % 2 else "bad"
        lines.append(" ".join(rng.choice(words[label]) for _ in range(6)) + f",{label}")
    path = tmp_path / "synthetic.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _data(path, max_length: int) -> TextFile:
    return TextFile(
        str(path),
        label_words=[" negative", " positive"],
        train_size=16,
        val_size=4,
        test_size=4,
        max_length=max_length,
        batch_size=4,
    )


class _NoStep(TextClassifier):
    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        raise AssertionError("a training step ran")


def test_max_length_beyond_the_models_positions_is_refused_at_setup(synthetic_csv, tiny_trainer) -> None:
    module = _NoStep("tiny-gpt2", tuning="full")  # learned positions: 512
    trainer = tiny_trainer(max_steps=1)
    with pytest.raises(ValueError, match=r"`max_length=600` is longer than the 512 positions of the gpt2 model"):
        trainer.fit(module, datamodule=_data(synthetic_csv, 600))
    assert trainer.global_step == 0


def test_soft_prompt_counts_against_the_positions(synthetic_csv, tiny_trainer) -> None:
    module = _NoStep("tiny-gpt2", tuning="prompt", num_virtual_tokens=16)
    with pytest.raises(ValueError, match=r"`max_length=500` plus 16 virtual tokens .* at most 496"):
        tiny_trainer(max_steps=1).fit(module, datamodule=_data(synthetic_csv, 500))


def test_lm_block_size_beyond_the_models_positions_is_refused_at_setup(tmp_path, tiny_trainer) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": "good film " * 300}) + "\n" for _ in range(4)))
    module = _NoStep("tiny-llama", tuning="full")
    with pytest.raises(ValueError, match=r"`block_size=1024` is longer than the 512 positions"):
        tiny_trainer(max_steps=1).fit(module, datamodule=LMCorpus(str(path), block_size=1024))


# ---------------------------------------------------------------------- small LM corpora


def test_one_document_lm_corpus_holds_out_its_last_blocks(tmp_path) -> None:
    text = " ".join(f"word{i}" for i in range(200))
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    dm = LMCorpus(str(path), block_size=16, tokenizer="tiny-llama", val_fraction=0.25)
    dm.setup("fit")
    train, val = dm.blocks["train"], dm.blocks["val"]
    assert train.shape[0] >= 1 and val.shape[0] >= 1
    assert abs(val.shape[0] / (train.shape[0] + val.shape[0]) - 0.25) < 0.1
    # the blocks of the one document, in order: the head trains, the tail validates, none is in both
    assert torch.equal(torch.cat([train, val]), encode_lm_blocks(tiny_tokenizer(), [text], 16))
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[1] == 16


def test_two_short_documents_fall_back_to_a_block_split(tmp_path) -> None:
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps({"text": "good film " * 20}) + "\n" + json.dumps({"text": "bad"}) + "\n")
    dm = LMCorpus(str(path), block_size=8, tokenizer="tiny-llama")
    dm.setup("fit")
    assert dm.blocks["train"].shape[0] >= 1 and dm.blocks["val"].shape[0] >= 1


def test_corpus_shorter_than_two_blocks_is_refused_with_the_fix(tmp_path) -> None:
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"text": "good film"}) + "\n")
    match = r"1 document\(s\) that fill 0 block\(s\) of `block_size=64`.*lower `block_size`"
    with pytest.raises(ValueError, match=match):
        LMCorpus(str(path), block_size=64, tokenizer="tiny-llama").setup("fit")


def test_corpus_without_any_text_is_refused(tmp_path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text("text,other\n,1\n  ,2\n")
    with pytest.raises(ValueError, match=r"blank\.csv: every row has an empty `text_column='text'`"):
        LMCorpus(str(path), block_size=8, tokenizer="tiny-llama").setup("fit")


def test_sizes_beyond_the_file_name_the_size_arguments_and_the_file(tmp_path) -> None:
    path = tmp_path / "small.csv"
    path.write_text(_csv(ROWS))
    dm = TextFile(str(path), label_words=[" bad", " good"], train_size=100, tokenizer="tiny-llama")
    match = r"`train_size=100`, `val_size=200`, `test_size=500` cannot be drawn from the 12 examples of .*small\.csv"
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")


def test_lm_corpus_file_that_does_not_exist_fails_at_construction(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"`source='.*nowhere\.jsonl'` does not exist"):
        LMCorpus(str(tmp_path / "nowhere.jsonl"))


class _NoPad:
    """A tokenizer wrapper without a pad token (as many decoders' tokenizers come)."""

    def __init__(self, eos: int | None) -> None:
        self.inner = tiny_tokenizer()
        self.pad_token_id = None
        self.eos_token_id = eos

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("eos", [2, None])
def test_tokenizer_without_a_pad_token_pads_with_eos_or_is_refused(tmp_path, eos, monkeypatch) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(_csv(ROWS))
    dm = TextFile(str(path), label_words=[" bad", " good"], train_size=4, val_size=2, test_size=2, batch_size=4)
    monkeypatch.setattr(dm, "_resolve_tokenizer", lambda: _NoPad(eos))
    if eos is None:
        with pytest.raises(ValueError, match=r"neither a pad nor an EOS token.*`tokenizer.pad_token`"):
            dm.setup("fit")
        return
    dm.setup("fit")
    batch = dm.train_dataloader().collate_fn([{"input_ids": [5, 6, 7], "labels": 0}, {"input_ids": [5], "labels": 1}])
    assert batch["input_ids"][1].tolist() == [5, eos, eos] and batch["attention_mask"][1].tolist() == [1, 0, 0]


# ---------------------------------------------------------------------- resuming on other data


def _fit_and_checkpoint(path, tmp_path, tiny_trainer):  # noqa: ANN001, ANN202
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = tiny_trainer(
        max_steps=2, max_epochs=3, limit_train_batches=None, callbacks=[ckpt], enable_checkpointing=True
    )
    trainer.fit(TextClassifier("tiny-llama", tuning="full"), datamodule=_data(path, 24))
    return tmp_path / "ckpt" / "last.ckpt"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("labels", r"trained on the classes \['bad', 'good'\] but .*synthetic\.csv now has \['awful', 'good'\]"),
        ("rows", r"trained on another training split \(fingerprint \w+\) than .*synthetic\.csv gives now"),
        ("seed", r"another training split .*`seed`"),
    ],
)
def test_resume_on_other_data_is_refused_before_a_step(synthetic_csv, tmp_path, tiny_trainer, change, match) -> None:
    last = _fit_and_checkpoint(synthetic_csv, tmp_path, tiny_trainer)
    data = _data(synthetic_csv, 24)
    if change == "labels":
        synthetic_csv.write_text(synthetic_csv.read_text().replace(",bad", ",awful"))
        data = _data(synthetic_csv, 24)
    elif change == "rows":
        lines = synthetic_csv.read_text().splitlines()
        synthetic_csv.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
        data = _data(synthetic_csv, 24)
    else:
        data.seed = 1
    module = _NoStep("tiny-llama", tuning="full")
    trainer = tiny_trainer(max_steps=4, max_epochs=3, limit_train_batches=None)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, datamodule=data, ckpt_path=str(last))


def test_resume_on_the_same_data_is_accepted(synthetic_csv, tmp_path, tiny_trainer) -> None:
    last = _fit_and_checkpoint(synthetic_csv, tmp_path, tiny_trainer)
    trainer = tiny_trainer(max_steps=3, max_epochs=3, limit_train_batches=None)
    trainer.fit(TextClassifier("tiny-llama", tuning="full"), datamodule=_data(synthetic_csv, 24), ckpt_path=str(last))
    assert trainer.global_step == 3


def test_lm_corpus_resume_on_another_corpus_is_refused(tmp_path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"good film {i} and bad show " * 6}) + "\n" for i in range(12)))
    dm = LMCorpus(str(path), block_size=8, tokenizer="tiny-llama")
    dm.setup("fit")
    state = dm.state_dict()
    same = LMCorpus(str(path), block_size=8, tokenizer="tiny-llama")
    same.setup("fit")
    same.load_state_dict(state)  # the same corpus: accepted
    other = LMCorpus(str(path), block_size=8, tokenizer="tiny-llama", seed=3)
    other.setup("fit")
    match = r"trained on other LM blocks \(fingerprint \w+\) than `source=.*corpus\.jsonl'`"
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(state)


def test_label_outside_label_names_is_refused_naming_its_rows(tmp_path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(_csv([*ROWS, ("so so", "meh")]))
    with pytest.raises(
        ValueError, match=r"labels \['meh'\] \(line 14 \(1 rows\)\) are not in `label_names=\['neg', 'pos'\]`"
    ):
        read_table(path, label_names=["neg", "pos"])


def test_label_names_with_a_class_no_row_has_is_refused(tmp_path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(_csv(ROWS))
    with pytest.raises(ValueError, match=r"`label_names` lists \['neutral'\], which no row has"):
        TextFile(str(path), label_names=["neg", "neutral", "pos"])
    with pytest.raises(ValueError, match=r"repeats a class"):
        read_table(path, label_names=["neg", "pos", "neg"])


def test_repeated_header_column_is_refused(tmp_path) -> None:
    path = tmp_path / "twice.csv"
    path.write_text("text,label,text\n" + "".join(f"{t},{lab},other\n" for t, lab in ROWS))
    with pytest.raises(ValueError, match=r"twice\.csv, line 1: the header repeats the columns \['text'\]"):
        read_table(path)


def test_tsv_and_quoted_commas_are_read(tmp_path) -> None:
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"{t}, really\t{lab}\n" for t, lab in ROWS))
    quoted = tmp_path / "rows.csv"
    quoted.write_text("text,label\n" + "".join(f'"{t}, really",{lab}\n' for t, lab in ROWS))
    for path in (tsv, quoted):
        data = read_table(path)
        assert data.texts[0] == "the film was great, really" and len(data) == len(ROWS)


def test_lm_corpus_without_a_tokenizer_says_how_to_give_one(tmp_path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "good film " * 40}) + "\n")
    with pytest.raises(ValueError, match=r"LMCorpus needs a tokenizer: pass `tokenizer=<model name>`"):
        LMCorpus(str(path), block_size=8).setup("fit")
