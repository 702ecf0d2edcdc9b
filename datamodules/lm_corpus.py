"""A plain language-modelling corpus: fixed-length token blocks for distillation and recovery training.

Documents are split into train / validation by a seeded shuffle (whole documents, so no block straddles
both), concatenated with EOS between them and cut into ``block_size`` blocks. A corpus of one document (or
one whose held-out documents do not fill a block) is cut into blocks first and its last blocks are held out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from typing_extensions import override

from privtune.data import EncodedBlocks, PadCollator, encode_lm_blocks, read_bbc_news, read_texts, read_tweets
from privtune.datamodules.resumable import resumable_train_loader
from privtune.models import load_tokenizer
from privtune.models.loading import check_length_fits

_SOURCES = ("bbc_news", "tweets")


class LMCorpus(pl.LightningDataModule):
    """LM blocks from a packaged corpus or a user's text file.

    Args:
        source: ``bbc_news``, ``tweets`` or a CSV / JSON-lines file path (read with ``text_column``).
        text_column: text column of a user file.
        block_size: tokens per block.
        max_train_blocks: cap on training blocks (``None``: all).
        max_val_blocks: cap on validation blocks.
        val_fraction: fraction of documents held out for validation.
        batch_size: blocks per batch.
        seed: seed of the document split.
        tokenizer: a model name; ``None`` takes the LightningModule's ``tokenizer``.
        encoding: encoding of a user file (``latin-1`` or ``cp1252`` for files that are not UTF-8).

    Raises:
        FileNotFoundError: for a file ``source`` that does not exist (at construction).
        ValueError: for an unknown source, ``block_size < 2`` or ``val_fraction`` outside (0, 1); at setup, for a
            ``block_size`` beyond the model's positions or a corpus shorter than two blocks.
    """

    def __init__(
        self,
        source: Literal["bbc_news", "tweets"] | str = "bbc_news",
        *,
        text_column: str = "text",
        block_size: int = 128,
        max_train_blocks: int | None = 512,
        max_val_blocks: int | None = 64,
        val_fraction: float = 0.1,
        batch_size: int = 8,
        seed: int = 0,
        tokenizer: str | None = None,
        encoding: str = "utf-8",
    ) -> None:
        super().__init__()
        if source not in _SOURCES and not source.endswith((".csv", ".tsv", ".jsonl", ".json")):
            raise ValueError(f"`source={source!r}` must be one of {_SOURCES} or a .csv/.tsv/.jsonl/.json file path.")
        if source not in _SOURCES and not Path(source).expanduser().is_file():
            raise FileNotFoundError(f"`source={source!r}` does not exist or is not a file.")
        if block_size < 2:
            raise ValueError(f"`block_size={block_size}` must be >= 2.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction={val_fraction}` must be in (0, 1).")
        self.source = source
        self.text_column = text_column
        self.block_size = block_size
        self.max_train_blocks = max_train_blocks
        self.max_val_blocks = max_val_blocks
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.tokenizer_name = tokenizer
        self.encoding = encoding
        self.blocks: dict[str, torch.Tensor] = {}
        self.tokenizer = None

    def _texts(self) -> list[str]:
        if self.source == "bbc_news":
            return read_bbc_news().texts
        if self.source == "tweets":
            return read_tweets().texts
        return read_texts(self.source, self.text_column, self.encoding)  # a user file: only the text column matters

    @override
    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:
            check_length_fits(module, self.block_size, "block_size")
        if self.blocks:
            return
        if self.tokenizer_name:
            tokenizer = load_tokenizer(self.tokenizer_name)
        elif getattr(module, "tokenizer", None) is not None:
            tokenizer = module.tokenizer
        else:
            raise ValueError(
                "LMCorpus needs a tokenizer: pass `tokenizer=<model name>` or use it with a LightningModule that has "
                "a `tokenizer` attribute."
            )
        self.blocks = self._split(tokenizer, self._texts())
        self.tokenizer = tokenizer

    def _split(self, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:  # noqa: ANN001 - a HF tokenizer
        """Train / validation blocks: by whole documents when both parts fill a block, else by blocks."""
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.seed)).tolist()
        if len(texts) >= 2:
            n_val = min(len(texts) - 1, max(1, round(self.val_fraction * len(texts))))
            val_docs = [texts[i] for i in order[:n_val]]
            train_docs = [texts[i] for i in order[n_val:]]
            try:
                return {
                    "train": encode_lm_blocks(tokenizer, train_docs, self.block_size, self.max_train_blocks),
                    "val": encode_lm_blocks(tokenizer, val_docs, self.block_size, self.max_val_blocks),
                }
            except ValueError:
                pass  # a part holds less than one block: split the token stream instead
        try:
            blocks = encode_lm_blocks(tokenizer, [texts[i] for i in order], self.block_size)
        except ValueError:
            blocks = torch.empty(0, self.block_size, dtype=torch.long)
        if blocks.shape[0] < 2:
            raise ValueError(
                f"`source={self.source!r}` holds {len(texts)} document(s) that fill {blocks.shape[0]} block(s) of "
                f"`block_size={self.block_size}` tokens; one block to train and one to validate are needed: lower "
                "`block_size` or add text."
            ) from None
        n_val = min(blocks.shape[0] - 1, max(1, round(self.val_fraction * blocks.shape[0])))
        rank_zero_info(
            f"LMCorpus: {len(texts)} document(s) of `source={self.source!r}` are too few to split by document; the "
            f"last {n_val} of {blocks.shape[0]} blocks are held out for validation."
        )
        train, val = blocks[: blocks.shape[0] - n_val], blocks[blocks.shape[0] - n_val :]
        return {"train": train[: self.max_train_blocks], "val": val[: self.max_val_blocks]}

    def _train_fingerprint(self) -> str:
        """A hash of the training blocks: what the checkpoint was trained on."""
        return hashlib.sha256(self.blocks["train"].numpy().tobytes()).hexdigest()[:16]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"train_fingerprint": self._train_fingerprint()} if self.blocks else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume on another corpus (restored after ``setup``, before the first step)."""
        saved = state_dict.get("train_fingerprint")
        if saved is None or not self.blocks or saved == self._train_fingerprint():
            return
        raise ValueError(
            f"The checkpoint was trained on other LM blocks (fingerprint {saved}) than `source={self.source!r}` gives "
            f"now ({self._train_fingerprint()}): the text, `seed`, `block_size`, `val_fraction`, `max_train_blocks` "
            "or the tokenizer changed. HINT: resume with the run's corpus and settings, or start a new run without "
            "`ckpt_path`."
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        dataset, collate = EncodedBlocks(self.blocks[split]), PadCollator(pad)
        if shuffle:
            return resumable_train_loader(dataset, self.batch_size, self.seed, self.trainer, collate_fn=collate)
        return DataLoader(dataset, batch_size=self.batch_size, collate_fn=collate)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)
