"""PromptTuning's encoder heads: frozen label-name embeddings (zero extra bytes) or a trained linear head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from privtune.modules.prompt_tuning import PromptTuning

NAMES = ["negative", "positive"]


def _batch(module: PromptTuning) -> dict[str, torch.Tensor]:
    enc = module.tokenizer(["a good day", "the worst film ever made"], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([1, 0])}


def test_label_name_head_is_scaled_cosine_to_frozen_name_embeddings() -> None:
    module = PromptTuning(model="tiny-bert", num_virtual_tokens=2, num_labels=2, label_scale=7.0).eval()
    module.configure_labels(None, 2, NAMES)
    assert list(module.client_parameters()) == ["prefix"]
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["prompt.weight"]

    # independent reference: mean-pooled, normalised last hidden states, names without a prefix
    names = module.tokenizer(NAMES, padding=True, return_tensors="pt")
    h = module.model.base_model(**names).last_hidden_state
    m = names["attention_mask"].unsqueeze(-1).float()
    e = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(module.label_embeddings, e)

    batch = _batch(module)
    out = module.model(
        input_ids=batch["input_ids"], output_hidden_states=True, **module.prompt.forward_kwargs(batch["attention_mask"])
    )
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = F.normalize((out.hidden_states[-1] * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(module(batch), 7.0 * pooled @ e.T)


def test_label_name_head_trains_the_prefix_only() -> None:
    module = PromptTuning(model="tiny-bert", num_virtual_tokens=2, num_labels=2)
    for layer in module.model.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.5
    module.train()
    module.configure_labels(None, 2, NAMES)
    first = module.label_embeddings.clone()
    module.configure_labels(None, 2, NAMES)
    torch.testing.assert_close(module.label_embeddings, first, rtol=0, atol=0)  # computed without dropout
    assert module.model.training  # and the mode is restored
    loss = module.client_loss(_batch(module))
    loss.backward()
    assert module.prompt.weight.grad is not None and module.prompt.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in module.named_parameters() if n != "prompt.weight")


def test_linear_head_is_trained_and_named() -> None:
    module = PromptTuning(model="tiny-bert", num_virtual_tokens=2, num_labels=2, encoder_head="linear")
    module.configure_labels(None, 2, NAMES)
    assert set(module.client_parameters()) == {"prefix", "head.weight", "head.bias"}
    assert module.label_embeddings is None
    assert module(_batch(module)).shape == (2, 2)


def test_bad_head_settings_fail_before_loading() -> None:
    with pytest.raises(ValueError, match=r"`encoder_head='mlm'` must be one of \('label_names', 'linear'\)"):
        PromptTuning(model="tiny-bert", num_labels=2, encoder_head="mlm")
    with pytest.raises(ValueError, match=r"`label_scale=0.0` must be > 0"):
        PromptTuning(model="tiny-bert", num_labels=2, label_scale=0.0)
    module = PromptTuning(model="tiny-bert", num_virtual_tokens=2, num_labels=2)
    with pytest.raises(ValueError, match="no `label_names`"):
        module.configure_labels(None, 2, None)
    with pytest.raises(RuntimeError, match="configure_labels"):
        module(_batch(module))


@pytest.mark.assets
def test_minilm_label_name_head_is_a_zero_shot_classifier_on_bbc() -> None:
    from privtune.datamodules import BBCNews

    sizes = {"train_size": 10, "val_size": 5, "test_size": 60}
    data = BBCNews(**sizes, max_length=64, eval_batch_size=30, tokenizer="all-minilm-l6-v2")
    data.setup("fit")
    module = PromptTuning(model="all-minilm-l6-v2", num_virtual_tokens=4, num_labels=5, init_std=0.0).eval()
    module.configure_labels(data.label_token_ids, data.num_classes, data.label_names)
    correct = sum(int((module.predict(b) == b["labels"]).sum()) for b in data.test_dataloader())
    # five balanced topics: chance is 0.2; the sentence encoder's own geometry does far better untuned
    assert correct / 60 > 0.5
