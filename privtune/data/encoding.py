"""Turn text into model inputs: prompt templates, verbalizers, padding, and LM blocks.

Decoders classify by scoring one label word per class after a prompt such as ``"Tweet: {text}\\nSentiment:"``
(see :mod:`privtune.models.scoring`); encoders read the same formatted text with a classification head.
When an example is too long, the *text* is truncated and the template's cue is always kept, so the model
is always asked the question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PromptTemplate:
    """A template with one ``{text}`` slot, e.g. ``"Tweet: {text}\\nSentiment:"``."""

    template: str

    def __post_init__(self) -> None:
        if self.template.count("{text}") != 1:
            raise ValueError(f"`template={self.template!r}` must contain the slot `{{text}}` exactly once.")

    def encode(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids of each formatted text, at most ``max_length`` long, truncating the text only.

        Raises:
            ValueError: if the template alone does not fit in ``max_length``.
        """
        prefix, suffix = self.template.split("{text}")
        pre = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        suf = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        n_special = len(_with_special(tokenizer, []))
        budget = max_length - len(pre) - len(suf) - n_special
        if budget < 1:
            raise ValueError(
                f"`max_length={max_length}` leaves no room for text: the template takes "
                f"{len(pre) + len(suf) + n_special} tokens."
            )
        bodies = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [_with_special(tokenizer, pre + body[:budget] + suf) for body in bodies]


def _with_special(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    # BERT-style tokenizers add [CLS] ... [SEP]; SmolLM2's adds nothing (no BOS).
    build = getattr(tokenizer, "build_inputs_with_special_tokens", None)
    return list(build(ids)) if callable(build) else list(ids)


def label_token_ids(tokenizer: PreTrainedTokenizerBase, label_words: Sequence[str]) -> Tensor:
    """The single token id of every label word.

    Raises:
        ValueError: if a word is not exactly one token, or two words share a token.
    """
    ids = []
    for i, word in enumerate(label_words):
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise ValueError(
                f"`label_words[{i}]={word!r}` is {len(pieces)} tokens {pieces} for this tokenizer; each label word "
                "must be exactly one token. HINT: keep the leading space (' negative'), try lower case, or pick "
                "a shorter synonym."
            )
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"`label_words={list(label_words)}` map to repeated token ids {ids}.")
    return torch.tensor(ids, dtype=torch.long)


class EncodedClassification(torch.utils.data.Dataset):
    """Pre-tokenized classification examples (tokenized once per run, not per epoch)."""

    def __init__(self, input_ids: list[list[int]], labels: Sequence[int]) -> None:
        self.input_ids = input_ids
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict[str, object]:
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx]}


class EncodedBlocks(torch.utils.data.Dataset):
    """Fixed-length LM blocks ``[N, block_size]`` (every token is a target)."""

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, idx: int) -> dict[str, object]:
        return {"input_ids": self.blocks[idx].tolist()}


@dataclass
class PadCollator:
    """Right-pads ``input_ids`` with ``pad_token_id`` and builds ``attention_mask``.

    Classification items carry an int ``labels``; LM items get ``labels`` = ``input_ids`` with -100 on
    padding (the model shifts them).
    """

    pad_token_id: int

    def __call__(self, items: list[dict[str, object]]) -> dict[str, Tensor]:
        width = max(len(item["input_ids"]) for item in items)  # type: ignore[arg-type]
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            seq = item["input_ids"]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)  # type: ignore[arg-type]
            mask[row, : len(seq)] = 1  # type: ignore[arg-type]
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.long)
        else:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        return batch


def encode_lm_blocks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], block_size: int, max_blocks: int | None = None
) -> Tensor:
    """Concatenate texts (EOS between them) and cut the stream into ``[N, block_size]`` blocks.

    Raises:
        ValueError: if there are no texts or they do not fill a single block.
    """
    if block_size < 2:
        raise ValueError(f"`block_size={block_size}` must be >= 2.")
    if not texts:
        raise ValueError("No texts to cut into blocks.")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if max_blocks is not None and len(stream) >= block_size * max_blocks:
            break
    n = len(stream) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"The texts hold {len(stream)} tokens, fewer than one block of `block_size={block_size}`.")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)
