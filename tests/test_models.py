"""Model resolution, offline behaviour, block access per family, and label-word scoring."""

from __future__ import annotations

import pytest
import torch

from privtune.models import (
    family,
    get_blocks,
    get_final_norm,
    get_input_embeddings,
    get_lm_head,
    is_decoder,
    load_model,
    load_tokenizer,
    num_blocks,
    resolve_model,
    set_blocks,
    tiny_tokenizer,
)
from privtune.models.scoring import label_word_logits, last_token_index
from tests.conftest import TINY_DECODERS, TINY_MODELS


@pytest.mark.parametrize("name", TINY_MODELS)
def test_block_access_per_family(name: str) -> None:
    task = "causal_lm" if name in TINY_DECODERS else "base"
    model = load_model(name, task=task)
    assert num_blocks(model) == 4
    assert get_input_embeddings(model).weight.shape == (512, 32)
    assert is_decoder(model) == (name in TINY_DECODERS)
    assert family(model) == name.removeprefix("tiny-")
    if name in TINY_DECODERS:
        assert get_lm_head(model).weight.shape == (512, 32)
        assert get_final_norm(model) is not None


@pytest.mark.parametrize("name", TINY_DECODERS)
def test_set_blocks_runs_every_kept_block(name: str) -> None:
    """A shortened stack runs all of its blocks (config depth and KV-cache indices updated)."""
    model = load_model(name).eval()
    blocks = list(get_blocks(model))
    ids = torch.randint(3, 500, (2, 6))
    set_blocks(model, [blocks[0], blocks[3]])
    assert num_blocks(model) == 2
    out = model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings + 2 blocks
    # With a cache, the two kept blocks use cache slots 0 and 1.
    gen = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 8)


def test_tiny_models_are_seeded() -> None:
    a = load_model("tiny-llama", seed=3).state_dict()
    b = load_model("tiny-llama", seed=3).state_dict()
    c = load_model("tiny-llama", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_tokenizer_round_trips_and_has_single_token_label_words() -> None:
    tok = tiny_tokenizer()
    text = "Ünïcode text 😀 with  spaces\nand lines"
    assert tok.decode(tok(text)["input_ids"]) == text
    for word in (" negative", " neutral", " positive", " business", " tech"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("bad", ["not-a-model", "gpt-5-ultra", ""])
def test_unknown_model_name_fails_with_choices(bad: str) -> None:
    with pytest.raises(ValueError, match=r"(?s)`name_or_path=.*smollm2-135m-instruct.*tiny-llama"):
        resolve_model(bad)


def test_uncached_hub_id_fails_offline_with_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not in the local Hugging Face cache.*HINT.*save_pretrained"):
        resolve_model("some-org/some-model-that-is-not-cached")


def test_local_folder_round_trip(tmp_path) -> None:
    model = load_model("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert resolve_model(str(tmp_path)).kind == "local"
    again = load_model(str(tmp_path))
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)
    assert load_tokenizer(str(tmp_path))("hi")["input_ids"] == tiny_tokenizer()("hi")["input_ids"]


def test_folder_without_config_is_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_last_token_index_handles_right_and_left_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


@pytest.mark.parametrize("name", TINY_DECODERS)
def test_label_word_logits_equal_full_logits_at_last_real_token(name: str) -> None:
    model = load_model(name).eval()
    ids = torch.randint(3, 500, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[1, 6:] = 0
    labels = torch.tensor([10, 20, 30])
    scores = label_word_logits(model, ids, mask, labels)
    full = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
    expected = torch.stack([full[0, 3, labels], full[1, 5, labels], full[2, 6, labels]])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.assets
def test_smollm2_packaged_model_matches_reference() -> None:
    model = load_model("smollm2-135m-instruct").eval()
    tok = load_tokenizer("smollm2-135m-instruct")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert num_blocks(model) == 30 and family(model) == "llama"
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.assets
def test_minilm_packaged_model_sentence_similarity() -> None:
    model = load_model("all-minilm-l6-v2", task="base").eval()
    tok = load_tokenizer("all-minilm-l6-v2")
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] == pytest.approx(0.755, abs=0.01)
    assert emb[0] @ emb[2] == pytest.approx(-0.004, abs=0.01)
