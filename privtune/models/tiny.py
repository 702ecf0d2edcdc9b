"""Tiny random models and a tiny byte-level tokenizer, for tests and quick mechanics checks.

One config per architecture family of :mod:`privtune.models.blocks` (2-4 blocks, hidden size 32, vocab
512), built in memory from a seed: nothing is read from disk or a hub. The tokenizer is a byte-level BPE
trained at run time on a small hand-written word list, so that any text round-trips exactly and the
default label words (" negative", " business", ...) are single tokens, as they are for the packaged
SmolLM2 tokenizer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from transformers import (
    BertConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

TINY_VOCAB = 512
PAD, EOS, BOS, UNK, CLS, SEP, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "[CLS]", "[SEP]", "[MASK]"
_SPECIALS = [PAD, EOS, BOS, UNK, CLS, SEP, MASK]

# Hand-written words (no dataset text): the label words of the packaged datamodules plus filler.
_WORDS = [
    "negative",
    "neutral",
    "positive",
    "business",
    "entertainment",
    "politics",
    "sport",
    "tech",
    "yes",
    "no",
    "true",
    "false",
    "tweet",
    "sentiment",
    "article",
    "topic",
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "with",
    "as",
    "at",
    "by",
    "this",
    "good",
    "bad",
    "great",
    "awful",
    "happy",
    "sad",
    "love",
    "hate",
    "fine",
    "okay",
    "market",
    "film",
    "game",
    "vote",
    "phone",
    "team",
    "music",
    "news",
    "price",
    "shares",
    "court",
    "minister",
    "player",
    "album",
    "election",
    "software",
    "match",
    "bank",
    "stock",
    "goal",
    "screen",
    "show",
]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic 512-token byte-level BPE tokenizer (pad id 0, eos id 1, bos id 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Every word with and without a leading space, in a few cased forms, enough times to be merged whole.
    corpus = [f"{w} {w}: {w.capitalize()}. " * 8 for w in _WORDS]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
    )
    fast.padding_side = "right"
    return fast


def _common() -> dict[str, int]:
    return {"vocab_size": TINY_VOCAB, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}


TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-llama": lambda: LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **_common(),
    ),
    "tiny-gpt2": lambda: GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=512, **_common()),
    "tiny-bert": lambda: BertConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        **_common(),
    ),
    "tiny-opt": lambda: OPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        ffn_dim=64,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=512,
        **_common(),
    ),
}


def tiny_config(name: str) -> PretrainedConfig:
    """A fresh config object for one of :data:`TINY_CONFIGS`."""
    return TINY_CONFIGS[name]()
