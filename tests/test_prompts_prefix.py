"""Deep prefix prompts on the tiny Llama, GPT-2, OPT and BERT models (transformers 5 cache API)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from privtune.models import load_model
from privtune.prompts import DeepPrefixPrompt, freeze_backbone, kv_geometry

CASES = [
    ("tiny-llama", "causal_lm"),
    ("tiny-gpt2", "causal_lm"),
    ("tiny-opt", "causal_lm"),
    ("tiny-bert", "sequence_classification"),
]


def _batch(b: int = 2, t: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(10, 500, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask


def test_gqa_width_is_kv_heads_times_head_dim() -> None:
    model = load_model("tiny-llama", task="causal_lm", seed=0)
    assert kv_geometry(model) == (4, 2, 8)  # 4 heads of 8, 2 key/value heads
    prompt = DeepPrefixPrompt.for_model(model, num_virtual_tokens=3)
    assert prompt.weight.shape == (3, 4, 2, 16)


@pytest.mark.parametrize(("name", "task"), CASES)
def test_every_layer_gets_gradient_and_padding_is_respected(name: str, task: str) -> None:
    model = load_model(name, task=task, num_labels=3, seed=0).eval()
    freeze_backbone(model)
    prompt = DeepPrefixPrompt.for_model(model, num_virtual_tokens=3, dropout=0.0)
    ids, mask = _batch()
    out = model(input_ids=ids, use_cache=False, **prompt.forward_kwargs(mask))
    out.logits.float().pow(2).sum().backward()
    assert prompt.weight.grad is not None
    per_layer = prompt.weight.grad.abs().sum(dim=(0, 2, 3))
    assert (per_layer > 0).all(), per_layer
    assert all(p.grad is None for p in model.parameters())
    # the padded row gives the same output as the same row unpadded
    single = model(input_ids=ids[1:2, :4], use_cache=False, **prompt.forward_kwargs(mask[1:2, :4]))
    if task == "causal_lm":
        torch.testing.assert_close(single.logits[0], out.logits[1, :4], atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(single.logits[0], out.logits[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_decoder_prefix_equals_a_real_context(name: str) -> None:
    """A prefix holding the keys/values of real context tokens gives the same logits as feeding that context."""
    model = load_model(name, task="causal_lm", seed=0).eval()
    n_layers, kv_heads, head_dim = kv_geometry(model)
    ctx, x = torch.randint(10, 500, (1, 3)), torch.randint(10, 500, (1, 5))
    cache = model(input_ids=ctx, use_cache=True).past_key_values
    prompt = DeepPrefixPrompt(n_layers, kv_heads, head_dim, num_virtual_tokens=3, dropout=0.0)
    with torch.no_grad():
        for i, layer in enumerate(cache.layers):
            # [1, heads, P, d] -> [P, heads * d]
            prompt.weight[:, i, 0] = layer.keys[0].permute(1, 0, 2).reshape(3, -1)
            prompt.weight[:, i, 1] = layer.values[0].permute(1, 0, 2).reshape(3, -1)
    full = model(input_ids=torch.cat([ctx, x], 1), use_cache=False).logits[:, 3:]
    with_prefix = model(input_ids=x, use_cache=False, **prompt.forward_kwargs(torch.ones_like(x))).logits
    torch.testing.assert_close(with_prefix, full, atol=1e-5, rtol=1e-4)


def test_slice_and_load_slice_roundtrip_and_errors() -> None:
    prompt = DeepPrefixPrompt(4, 2, 8, num_virtual_tokens=3, seed=1)
    sel = [2, 0]
    part = prompt.slice(sel)
    assert part.shape == (3, 2, 2, 16)
    torch.testing.assert_close(part[:, 0], prompt.weight[:, 2].detach())
    new = torch.randn_like(part)
    prompt.load_slice(sel, new)
    torch.testing.assert_close(prompt.weight[:, [2, 0]].detach(), new)
    with pytest.raises(ValueError, match="layers"):
        prompt.slice([4])
    with pytest.raises(ValueError, match="shape"):
        prompt.load_slice(sel, torch.zeros(3, 3, 2, 16))
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        DeepPrefixPrompt(4, 2, 8, num_virtual_tokens=0)


def test_initialisation_is_seeded_and_cache_is_fresh() -> None:
    a, b = DeepPrefixPrompt(2, 2, 4, seed=3), DeepPrefixPrompt(2, 2, 4, seed=3)
    torch.testing.assert_close(a.weight, b.weight)
    assert float(a.weight.std()) == pytest.approx(0.02, rel=0.5)
    cache = a.eval().cache(3)
    assert isinstance(cache, DynamicCache)
    assert cache.get_seq_length() == a.num_virtual_tokens
    assert cache.layers[0].keys.shape == (3, 2, 5, 4)
