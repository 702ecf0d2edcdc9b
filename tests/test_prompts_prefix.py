"""Deep prefix prompts on the tiny Llama, GPT-2, OPT and BERT models (transformers 5 cache API)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from privtune.models import load_model
from privtune.prompts import DeepPrefixPrompt, freeze_backbone, kv_geometry
from privtune.prompts.prefix import CACHE_ARGUMENT

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
    assert float(a.weight.detach().std()) == pytest.approx(0.02, rel=0.5)
    cache = a.eval().cache(3)
    assert isinstance(cache, DynamicCache)
    assert cache.get_seq_length() == a.num_virtual_tokens
    assert cache.layers[0].keys.shape == (3, 2, 5, 4)


def _peft_prefix_model(name: str, task: str, prompt: DeepPrefixPrompt) -> torch.nn.Module:
    """peft's PrefixTuning (no projection) on a fresh copy of the same backbone, holding ``prompt``'s prefix."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    peft_task = TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.FEATURE_EXTRACTION
    base = load_model(name, task=task, num_labels=3, seed=0)
    if task != "causal_lm":
        base = base.bert  # peft's sequence-classification wrapper rejects BERT on transformers 5 (no such argument)
    config = PrefixTuningConfig(task_type=peft_task, num_virtual_tokens=prompt.num_virtual_tokens)
    peft_model = get_peft_model(base, config).eval()
    embedding = peft_model.prompt_encoder["default"].embedding.weight  # [P, L * 2 * H_kv]: the same flattening
    assert embedding.shape == (prompt.num_virtual_tokens, prompt.weight[0].numel())
    with torch.no_grad():
        embedding.copy_(prompt.weight.detach().reshape(prompt.num_virtual_tokens, -1))
    return peft_model


@pytest.mark.parametrize(("name", "task"), CASES)
def test_logits_equal_peft_prefix_tuning(name: str, task: str) -> None:
    model = load_model(name, task=task, num_labels=3, seed=0).eval()
    prompt = DeepPrefixPrompt.for_model(model, num_virtual_tokens=3, dropout=0.0, seed=5).eval()
    with torch.no_grad():
        prompt.weight.mul_(50.0)  # a prefix large enough to move the logits far from the backbone's
    ids, mask = _batch()
    ours = model(input_ids=ids, use_cache=False, **prompt.forward_kwargs(mask)).logits
    plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    reference = _peft_prefix_model(name, task, prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft itself still passes `past_key_values`
        if task == "causal_lm":
            theirs = reference(input_ids=ids, attention_mask=mask).logits
        else:  # the classifier of our model on peft's pooled output
            theirs = model.classifier(reference(input_ids=ids, attention_mask=mask).pooler_output)
    # padded positions of a decoder differ by design (peft and privtune both leave them unmasked garbage)
    keep = mask.bool() if task == "causal_lm" else torch.ones(ours.shape[0], dtype=torch.bool)
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-2  # the prefix matters, so the comparison can fail


@pytest.mark.parametrize(("name", "task"), CASES)
def test_the_prefix_goes_through_the_cache_argument(name: str, task: str) -> None:
    """The prefilled cache is passed as ``cache=`` (transformers >= 5.24), with no deprecated argument warning."""
    assert CACHE_ARGUMENT == "cache"  # the installed transformers names it so; the old name goes away in 5.40
    model = load_model(name, task=task, num_labels=3, seed=0).eval()
    prompt = DeepPrefixPrompt.for_model(model, num_virtual_tokens=2, dropout=0.0)
    ids, mask = _batch()
    kwargs = prompt.forward_kwargs(mask)
    assert set(kwargs) == {"attention_mask", "cache"}
    cache = kwargs["cache"]
    assert isinstance(cache, DynamicCache) and len(cache.layers) == prompt.num_layers
    assert cache.layers[0].keys.shape == (2, prompt.num_kv_heads, 2, prompt.head_dim)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        out = model(input_ids=ids, use_cache=False, **kwargs)
    out.logits.float().sum().backward()
    assert prompt.weight.grad is not None and prompt.weight.grad.abs().sum() > 0


def test_an_older_transformers_gets_the_old_argument_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the rename the cache must go in as ``past_key_values``; ``cache=`` would vanish into ``**kwargs``."""
    import privtune.prompts.prefix as prefix

    class OldModel:
        def forward(self, input_ids: object = None, past_key_values: object = None, **kwargs: object) -> None: ...

    monkeypatch.setattr(prefix, "LlamaModel", OldModel)
    assert prefix._cache_argument() == "past_key_values"
