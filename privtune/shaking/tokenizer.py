"""The data owner's tokenizer: text to shaken ids, shaken ids back to text.

CypherTalk (arXiv 2403.07283), private tuning and inference: the client sends ``pi[tokenize(x)]`` and
reads ``detokenize(pi^-1[out])``; the cloud sees only shaken ids. :class:`ShakenTokenizer` wraps any
Hugging Face tokenizer so that ``__call__``/``encode`` return shaken ids and ``decode``/``batch_decode``
accept them; special-token id attributes are mapped too (pinned specials map to themselves). Everything
else is delegated to the wrapped tokenizer, so a datamodule can use it as its tokenizer; a method the
wrapped tokenizer lacks (``build_inputs_with_special_tokens`` in transformers 5) is missing here too.

Threat model: it runs on the client only; it holds the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from privtune.shaking.key import ShakeKey

_ID_ATTRS = (
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
    "unk_token_id",
    "cls_token_id",
    "sep_token_id",
    "mask_token_id",
)


#: tokenizer methods that take and return ids: wrapped (in the shaken space) only when the tokenizer has them
_ID_METHODS = {
    "build_inputs_with_special_tokens": "_build_inputs_with_special_tokens",
    "apply_chat_template": "_apply_chat_template",
}


class ShakenTokenizer:
    """A tokenizer whose ids live in the key's shaken space.

    Args:
        tokenizer: the plain Hugging Face tokenizer of the model.
        key: the data owner's key.

    Raises:
        ValueError: if the tokenizer has more ids than the key's vocabulary.
    """

    def __init__(self, tokenizer: Any, key: ShakeKey) -> None:
        if len(tokenizer) > key.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} ids but the key covers only {key.vocab_size}; "
                "use a key generated for this model."
            )
        self.tokenizer = tokenizer
        self.key = key

    # -- ids ---------------------------------------------------------------------------------------
    def _map(self, ids: Any, fn) -> Any:  # noqa: ANN001 - fn: Tensor -> Tensor
        if isinstance(ids, Tensor):
            return fn(ids)
        if isinstance(ids, int):
            return int(fn(torch.tensor(ids)))
        if isinstance(ids, Sequence) and ids and not isinstance(ids[0], int):
            return [self._map(row, fn) for row in ids]
        return fn(torch.tensor(list(ids), dtype=torch.long)).tolist()

    def shake_ids(self, ids: Any) -> Any:
        """Plain ids (int, list, nested list or tensor) to shaken ids."""
        return self._map(ids, self.key.encode_ids)

    def unshake_ids(self, ids: Any) -> Any:
        """Shaken ids to plain ids."""
        return self._map(ids, self.key.decode_ids)

    # -- tokenizer API -------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Tokenize like the wrapped tokenizer and return shaken ``input_ids``."""
        enc = self.tokenizer(*args, **kwargs)
        enc["input_ids"] = self.shake_ids(enc["input_ids"])
        return enc

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """Shaken ids of one text."""
        return self.shake_ids(self.tokenizer.encode(*args, **kwargs))

    def decode(self, ids: Any, **kwargs: Any) -> str:
        """Text of shaken ids."""
        return self.tokenizer.decode(self.unshake_ids(ids), **kwargs)

    def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
        """Texts of a batch of shaken id sequences."""
        return self.tokenizer.batch_decode(self.unshake_ids(ids), **kwargs)

    def convert_tokens_to_ids(self, tokens: Any) -> Any:
        """Shaken ids of tokens."""
        return self.shake_ids(self.tokenizer.convert_tokens_to_ids(tokens))

    def convert_ids_to_tokens(self, ids: Any, **kwargs: Any) -> Any:
        """Tokens of shaken ids."""
        return self.tokenizer.convert_ids_to_tokens(self.unshake_ids(ids), **kwargs)

    def _build_inputs_with_special_tokens(self, ids: list[int], *rest: Any) -> list[int]:
        """Add the model's special tokens around shaken ids (in the shaken space)."""
        plain = self.tokenizer.build_inputs_with_special_tokens(self.unshake_ids(list(ids)), *rest)
        return self.shake_ids(list(plain))

    def _apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """The chat template's text (``tokenize=False``) or its shaken ids (never plain ids)."""
        out = self.tokenizer.apply_chat_template(*args, **kwargs)
        if isinstance(out, str) or (isinstance(out, list) and out and isinstance(out[0], str)):
            return out
        if hasattr(out, "keys") and "input_ids" in out:
            out["input_ids"] = self.shake_ids(out["input_ids"])
            return out
        return self.shake_ids(out)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name: str) -> Any:
        # Special-token ids are mapped; everything else (padding_side, pad_token, chat template...) is delegated.
        if name in ("tokenizer", "key"):
            raise AttributeError(name)
        value = getattr(self.tokenizer, name)  # a method the wrapped tokenizer lacks stays missing here too
        if name in _ID_METHODS:
            # Only offered where the wrapped tokenizer has it (transformers 5 fast tokenizers do not), so that
            # callers probing with getattr/hasattr take their fallback, as they would with the plain tokenizer.
            return getattr(self, _ID_METHODS[name])
        if name in _ID_ATTRS and value is not None:
            return self.shake_ids(int(value))
        if name == "all_special_ids":
            return self.shake_ids(list(value))
        return value

    def __repr__(self) -> str:
        return f"ShakenTokenizer({type(self.tokenizer).__name__}, key={self.key.fingerprint()})"
