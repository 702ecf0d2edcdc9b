"""Resolve ``name_or_path`` to a model and its tokenizer, offline.

A name is one of, in this order:

1. a packaged offline model: ``smollm2-135m-instruct`` (Llama decoder) or ``all-minilm-l6-v2`` (BERT
   encoder), see :mod:`privtune.assets`;
2. a tiny random configuration for tests: ``tiny-llama``, ``tiny-gpt2``, ``tiny-bert``, ``tiny-opt``;
3. a local folder holding a Hugging Face ``config.json``;
4. a Hugging Face hub id (``org/name``), used from the local hub cache only when ``HF_HUB_OFFLINE=1``.

Anything else fails at once, before any weight is read, with a message that lists the choices.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from privtune import assets
from privtune.models.tiny import TINY_CONFIGS, tiny_config, tiny_tokenizer

Task = Literal["causal_lm", "sequence_classification", "base"]

PACKAGED_MODELS: dict[str, str] = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Llama decoder, 30 blocks, tied embeddings)",
    "all-minilm-l6-v2": "all-MiniLM-L6-v2 (BERT encoder, 6 blocks, no MLM head)",
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def known_model_names() -> list[str]:
    """Every built-in name :func:`resolve_model` accepts besides folders and hub ids."""
    return [*PACKAGED_MODELS, *TINY_CONFIGS]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model comes from: ``kind`` is ``packaged``, ``tiny``, ``local`` or ``hub``."""

    name: str
    kind: Literal["packaged", "tiny", "local", "hub"]
    #: folder or hub id to pass to ``from_pretrained`` (``None`` for tiny configs)
    source: str | None = None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"} or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in {"1", "true", "yes"}


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an unusual cache layout counts as "not cached"
        return False
    return isinstance(hit, str)


def _unknown(name: str, why: str) -> ValueError:
    return ValueError(
        f"Unknown model `name_or_path={name!r}`: {why}. Allowed: a packaged model "
        f"({', '.join(PACKAGED_MODELS)}), a tiny test model ({', '.join(TINY_CONFIGS)}), a local folder with a "
        "config.json, or a hub id already in the local Hugging Face cache. "
        "HINT: to use your own model offline, save it with `save_pretrained(folder)` and pass that folder."
    )


def resolve_model(name_or_path: str) -> ResolvedModel:
    """Decide where ``name_or_path`` comes from without loading any weight.

    Raises:
        ValueError: if the name is none of the accepted kinds, or names a hub id that is not cached while
            the hub is offline.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise _unknown(str(name_or_path), "expected a non-empty string")
    key = name_or_path.lower()
    if key in PACKAGED_MODELS:
        return ResolvedModel(key, "packaged")
    if key in TINY_CONFIGS:
        return ResolvedModel(key, "tiny")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _unknown(name_or_path, f"the folder {path} has no config.json")
        return ResolvedModel(name_or_path, "local", str(path))
    if _HUB_ID.match(name_or_path):
        if _hub_offline() and not _hub_cached(name_or_path):
            raise _unknown(name_or_path, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1")
        return ResolvedModel(name_or_path, "hub", name_or_path)
    raise _unknown(name_or_path, "it is neither a built-in name, an existing folder nor a hub id")


def _source(resolved: ResolvedModel) -> str:
    if resolved.kind == "packaged":
        if resolved.name == "smollm2-135m-instruct":
            return str(assets.smollm2_fp32())
        return str(assets.minilm_dir())
    assert resolved.source is not None
    return resolved.source


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, with a pad token set (right padding).

    Raises:
        ValueError: for an unknown name, or a local model folder that holds no tokenizer files.
    """
    resolved = resolve_model(name_or_path)
    if resolved.kind == "tiny":
        return tiny_tokenizer()
    if resolved.kind == "local" and not any((Path(_source(resolved)) / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(
            f"`name_or_path={name_or_path!r}` is a model folder without tokenizer files (none of "
            f"{', '.join(_TOKENIZER_FILES)}). HINT: save the tokenizer next to the model with "
            "`tokenizer.save_pretrained(folder)`."
        )
    tokenizer = AutoTokenizer.from_pretrained(_source(resolved))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_config(name_or_path: str):  # noqa: ANN201 - a transformers PretrainedConfig subclass
    """The model's config, without weights (cheap: used for validation before training)."""
    resolved = resolve_model(name_or_path)
    if resolved.kind == "tiny":
        return tiny_config(resolved.name)
    return AutoConfig.from_pretrained(_source(resolved))


def load_model(
    name_or_path: str,
    *,
    task: Task = "causal_lm",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PreTrainedModel:
    """Load a model for ``task``, offline, in train mode.

    Args:
        name_or_path: see the module docstring.
        task: ``causal_lm`` (decoders), ``sequence_classification`` (a fresh head with ``num_labels``
            outputs) or ``base`` (the headless backbone).
        num_labels: classes of the head; required for ``sequence_classification``.
        dtype: parameter dtype.
        seed: seeds the random init of tiny models and fresh heads, so runs repeat.

    Raises:
        ValueError: for an unknown name, or ``sequence_classification`` without ``num_labels``.
    """
    resolved = resolve_model(name_or_path)
    if task == "sequence_classification" and (num_labels is None or num_labels < 2):
        raise ValueError(f"`num_labels={num_labels}` must be an int >= 2 for `task='sequence_classification'`.")
    auto = {
        "causal_lm": AutoModelForCausalLM,
        "sequence_classification": AutoModelForSequenceClassification,
        "base": AutoModel,
    }[task]
    extra = {"num_labels": num_labels} if task == "sequence_classification" else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if resolved.kind == "tiny":
            config = tiny_config(resolved.name)
            for key, value in extra.items():
                setattr(config, key, value)
            model = auto.from_config(config, dtype=dtype)
        else:
            model = auto.from_pretrained(_source(resolved), dtype=dtype, **extra)
    if task == "sequence_classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    model.train()  # from_pretrained returns eval mode; Lightning expects trainable modules in train mode
    return model


def max_positions(module: torch.nn.Module) -> tuple[int, str] | None:
    """The longest input ``module`` can read, and the model type that sets it.

    The smallest position limit (``max_position_embeddings`` / ``n_positions``) of the Hugging Face models held
    in ``module`` (the module itself included); ``None`` when it holds none that declares one.
    """
    limits = []
    for sub in module.modules():
        config = getattr(sub, "config", None) if isinstance(sub, PreTrainedModel) else None
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                limits.append((value, str(getattr(config, "model_type", type(sub).__name__))))
                break
    return min(limits) if limits else None


def check_length_fits(module: torch.nn.Module, length: int, argument: str, extra: int = 0) -> None:
    """Refuse inputs of ``length`` tokens (plus ``extra`` virtual positions) that the model cannot place.

    A learned position table (GPT-2, BERT, OPT) would fail with an ``IndexError`` at the first step; a rotary
    model would run on positions it was never trained on. Either way the length is refused before training.

    Raises:
        ValueError: naming ``argument``, the model's limit and the largest allowed value.
    """
    found = max_positions(module)
    if found is None or length + extra <= found[0]:
        return
    limit, model_type = found
    plus = f" plus {extra} virtual tokens" if extra else ""
    raise ValueError(
        f"`{argument}={length}`{plus} is longer than the {limit} positions of the {model_type} model "
        f"(`max_position_embeddings`): set `{argument}` to at most {limit - extra}."
    )
