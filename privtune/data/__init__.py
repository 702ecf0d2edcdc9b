"""Data helpers shared by the datamodules and plain-PyTorch users (torch and transformers only)."""

from privtune.data.encoding import (
    EncodedBlocks,
    EncodedClassification,
    PadCollator,
    PromptTemplate,
    encode_lm_blocks,
    label_token_ids,
)
from privtune.data.sources import TextDataset, read_bbc_news, read_table, read_texts, read_tweets
from privtune.data.splits import stratified_split

__all__ = [
    "EncodedBlocks",
    "EncodedClassification",
    "PadCollator",
    "PromptTemplate",
    "TextDataset",
    "encode_lm_blocks",
    "label_token_ids",
    "read_bbc_news",
    "read_table",
    "read_texts",
    "read_tweets",
    "stratified_split",
]
