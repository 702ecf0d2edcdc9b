"""Private inference through a shaken model: the client maps ids, the cloud never sees plain token ids.

CypherTalk (arXiv 2403.07283), private inference (spec §3.4): the client "encrypts" a query with its key
(``pi[tokenize(x)]``), the cloud runs the shaken model and returns shaken ids or scores, and the client
decodes them (``detokenize(pi^-1[out])``). :class:`ShakenClient` is the key holder's side and
:class:`ShakenServer` the cloud's, which receives only shaken tensors; stop and pad tokens are pinned
(or mapped by the client).

Threat model: an honest-but-curious cloud; the id sequences it sees are shaken, but their lengths and the
frequencies of shaken ids are visible (see the frequency attack in :mod:`privtune.attacks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from privtune.models.scoring import label_word_logits
from privtune.shaking.key import ShakeKey


class ShakenServer:
    """The cloud: runs a shaken model on shaken ids only (it holds no key)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, attention_mask: Tensor, eos_token_id: int, pad_token_id: int, max_new_tokens: int = 20
    ) -> Tensor:
        """Greedy continuation ``[B, T + new]`` in the shaken id space."""
        return self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )

    @torch.no_grad()
    def score(self, input_ids: Tensor, attention_mask: Tensor, label_token_ids: Tensor) -> Tensor:
        """Label-word scores ``[B, C]`` for shaken label-word ids (classification)."""
        return label_word_logits(self.model, input_ids, attention_mask, label_token_ids)


class ShakenClient:
    """The data owner: tokenizes, shakes queries and decodes the cloud's answers with the key.

    Args:
        tokenizer: the plain tokenizer (right padding).
        key: the data owner's key.
    """

    def __init__(self, tokenizer: Any, key: ShakeKey) -> None:
        self.tokenizer = tokenizer
        self.key = key

    def encode(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Shaken ``input_ids`` and the ``attention_mask`` of a batch of texts."""
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
        return {"input_ids": self.key.encode_ids(enc["input_ids"]), "attention_mask": enc["attention_mask"]}

    def shaken_id(self, token_id: int) -> int:
        """The shaken id of one plain id (e.g. EOS)."""
        return int(self.key.perm[token_id])

    def label_ids(self, words: Sequence[str]) -> Tensor:
        """Shaken ids of single-token label words."""
        from privtune.data import label_token_ids

        return self.key.encode_ids(label_token_ids(self.tokenizer, words))

    def decode(self, shaken_ids: Tensor, prompt_length: int = 0) -> list[str]:
        """Texts of shaken id sequences (after the first ``prompt_length`` positions)."""
        plain = self.key.decode_ids(shaken_ids[:, prompt_length:])
        return self.tokenizer.batch_decode(plain, skip_special_tokens=True)


def private_generate(
    client: ShakenClient, server: ShakenServer, texts: Sequence[str], max_new_tokens: int = 20
) -> list[str]:
    """Greedy generation where the server only ever handles shaken ids (left padding is not needed: one
    query per call keeps positions exact; batches are generated one by one)."""
    out = []
    for text in texts:
        query = client.encode([text])
        eos = client.shaken_id(client.tokenizer.eos_token_id)
        pad = client.shaken_id(client.tokenizer.pad_token_id)
        ids = server.generate(query["input_ids"], query["attention_mask"], eos, pad, max_new_tokens)
        out.append(client.decode(ids, prompt_length=query["input_ids"].shape[1])[0])
    return out


def private_classify(
    client: ShakenClient, server: ShakenServer, texts: Sequence[str], label_words: Sequence[str]
) -> Tensor:
    """Class indices ``[B]`` from label-word scores computed by the server on shaken ids."""
    query = client.encode(texts)
    return server.score(query["input_ids"], query["attention_mask"], client.label_ids(label_words)).argmax(-1)
