"""Deep prefix prompts: trainable key/value prefixes at every layer of a frozen transformer.

P-tuning v2 (Liu et al., arXiv 2110.07602) as used by FedPepTAO (Che et al., EMNLP 2023, arXiv 2310.15080):
one tensor, no reparameterisation MLP, handed to the model as a key/value ``Cache`` prefilled with the prefix, so
that every block's self-attention sees ``P`` extra key/value positions. The backbone stays frozen. The logits equal
peft's ``PrefixTuning`` (``prefix_projection=False``) with the same prefix (``tests/test_prompts_prefix.py``).

Threat model: in federated prompt tuning the prefix is the only trained state, so it is the only thing a client
ever sends; the client's text never leaves it. (The prefix itself can leak information about the data; this
module does not add noise.)

Layout of the parameter (layer-major, then key/value, then the key/value width; the same flattening as peft's
prefix embedding ``[P, L * 2 * H_kv]``)::

    weight : [P, L, 2, H_kv]          H_kv = num_key_value_heads * head_dim  (GQA: not the hidden size)
              |  |  |
              |  |  +-- 0 = key, 1 = value
              |  +----- transformer block
              +-------- virtual token

    slice(layers) -> weight[:, layers]   [P, |layers|, 2, H_kv]   what FedPepTAO communicates

At forward time ``cache(B)`` builds a transformers ``DynamicCache`` through the cache API (``Cache.update`` per
layer) whose layer ``l`` holds ``key = weight[:, l, 0]`` and ``value = weight[:, l, 1]`` reshaped to
``[B, heads_kv, P, head_dim]``, after dropout; ``extend_mask`` prepends ``P`` ones to the attention mask;
``forward_kwargs`` passes the cache as ``cache=`` (transformers 5.24 renamed the forward argument
``past_key_values`` to ``cache`` and removes the old name in 5.40; with an older transformers the old name is
used). Decoders (Llama, GPT-2, OPT families) and BERT-family encoders accept this cache; positions of the real
tokens then start at ``P``, as they did in the original P-tuning v2 code. A fresh cache is built for every forward
because the model appends the real tokens' keys to it.

Initialisation is ``N(0, 0.02)`` from a seeded generator (the spec leaves it open; this is the usual
transformer init scale and it is reproducible from the seed alone).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaModel

from privtune.models.blocks import num_blocks, unwrap


def _cache_argument() -> str:
    """The name of the models' forward argument that takes a ``Cache`` in the installed transformers.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns and goes away in 5.40); passing
    ``cache=`` to an older release would land in ``**kwargs`` and drop the prefix without an error.
    """
    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


CACHE_ARGUMENT = _cache_argument()


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(num_layers, num_key_value_heads, head_dim)`` of a Hugging Face model's self-attention.

    Grouped-query attention models (SmolLM2: 9 query heads, 3 key/value heads of 64) store keys/values with the
    smaller head count, so the prefix width is ``num_key_value_heads * head_dim`` (192 for SmolLM2-135M).
    """
    config = unwrap(model).config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return num_blocks(model), int(kv_heads), int(head_dim)


def _check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"`layers` must index the {num_layers} prompt layers (0..{num_layers - 1}); got {bad}.")
    if len(set(layers)) != len(layers):
        raise ValueError(f"`layers` must not repeat a layer; got {layers}.")
    return layers


class DeepPrefixPrompt(nn.Module):
    """A ``[P, L, 2, H_kv]`` key/value prefix for every block of a frozen transformer.

    Args:
        num_layers: number of transformer blocks ``L``.
        num_kv_heads: key/value heads per block.
        head_dim: width of one head.
        num_virtual_tokens: prefix length ``P`` (20 for RoBERTa-large, 5 for decoders in the FedPepTAO code).
        dropout: dropout on the prefix at forward time (0.1 in P-tuning v2).
        init_std: standard deviation of the normal initialisation.
        seed: seeds the initialisation, so every client starts from the same prefix.

    Raises:
        ValueError: if a size is not positive or ``dropout`` is outside ``[0, 1)``.

    Example::

        prompt = DeepPrefixPrompt.for_model(model, num_virtual_tokens=5)
        out = model(input_ids=ids, use_cache=False, **prompt.forward_kwargs(mask))
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_virtual_tokens: int = 5,
        dropout: float = 0.1,
        init_std: float = 0.02,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("num_virtual_tokens", num_virtual_tokens),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {dropout}.")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_virtual_tokens = num_virtual_tokens
        self.kv_width = num_kv_heads * head_dim
        generator = torch.Generator().manual_seed(seed)
        init = torch.randn(num_virtual_tokens, num_layers, 2, self.kv_width, generator=generator) * init_std
        self.weight = nn.Parameter(init)  # [P, L, 2, H_kv]
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def for_model(cls, model: nn.Module, num_virtual_tokens: int = 5, **kwargs: float) -> DeepPrefixPrompt:
        """A prefix sized for ``model`` (one slice per block, GQA-aware width)."""
        num_layers, kv_heads, head_dim = kv_geometry(model)
        return cls(num_layers, kv_heads, head_dim, num_virtual_tokens, **kwargs)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"P={self.num_virtual_tokens}, L={self.num_layers}, H_kv={self.kv_width}"

    # --- what is communicated -------------------------------------------------------------------------------
    def slice(self, layers: Sequence[int]) -> Tensor:
        """A detached copy of the selected layers' prefixes, ``[P, |layers|, 2, H_kv]``."""
        idx = _check_layers(layers, self.num_layers)
        return self.weight.detach()[:, idx].clone()

    @torch.no_grad()
    def load_slice(self, layers: Sequence[int], value: Tensor) -> None:
        """Overwrite the selected layers' prefixes in place with ``value`` of shape ``[P, |layers|, 2, H_kv]``.

        Raises:
            ValueError: if ``value`` does not have the slice's shape.
        """
        idx = _check_layers(layers, self.num_layers)
        expected = (self.num_virtual_tokens, len(idx), 2, self.kv_width)
        if tuple(value.shape) != expected:
            raise ValueError(f"`value` must have shape {expected} for layers {idx}; got {tuple(value.shape)}.")
        self.weight[:, idx] = value.to(self.weight)

    # --- what the model consumes ----------------------------------------------------------------------------
    def cache(self, batch_size: int) -> DynamicCache:
        """A fresh ``DynamicCache`` pre-filled with the prefix for a batch of ``batch_size`` rows.

        Filled through the cache API (``Cache.update(key, value, layer_idx)``), as transformers fills it itself;
        gradients flow from the cached keys/values back to ``weight``.
        """
        prefix = self.dropout(self.weight)  # [P, L, 2, H_kv]
        prefix = prefix.view(self.num_virtual_tokens, self.num_layers, 2, self.num_kv_heads, self.head_dim)
        # -> [L, 2, heads_kv, P, head_dim], then broadcast over the batch (expand: no copy)
        prefix = prefix.permute(1, 2, 3, 0, 4)
        shape = (batch_size, self.num_kv_heads, self.num_virtual_tokens, self.head_dim)
        cache = DynamicCache()
        for layer in range(self.num_layers):
            key, value = prefix[layer, 0].unsqueeze(0).expand(shape), prefix[layer, 1].unsqueeze(0).expand(shape)
            cache.update(key, value, layer)
        return cache

    def extend_mask(self, attention_mask: Tensor) -> Tensor:
        """Prepend ``P`` ones (the prefix is always attended) to a ``[B, T]`` mask -> ``[B, P + T]``."""
        ones = attention_mask.new_ones(attention_mask.shape[0], self.num_virtual_tokens)
        return torch.cat([ones, attention_mask], dim=1)

    def forward_kwargs(self, attention_mask: Tensor) -> dict[str, object]:
        """``attention_mask`` and the prefilled cache (as ``cache``, see :data:`CACHE_ARGUMENT`) for the forward."""
        return {
            "attention_mask": self.extend_mask(attention_mask),
            CACHE_ARGUMENT: self.cache(attention_mask.shape[0]),
        }


def freeze_backbone(model: nn.Module) -> None:
    """Turn off gradients for every parameter of ``model`` (deep prompt tuning trains the prefix only)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
