"""Keys, operators, embedding shaking and the shaken tokenizer (privtune.shaking, torch only)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from privtune.models import get_lm_head, load_model, tiny_tokenizer
from privtune.shaking import (
    KeySetting,
    ShakeKey,
    ShakenTokenizer,
    apply_vertical,
    available_operators,
    find_embedding,
    head_is_vertical,
    invert_vertical,
    is_tied,
    recover_embedding,
    recover_model,
    shake_embedding,
    shake_model,
    shaking_state,
    untie_lm_head,
)

OPS = available_operators()
SPECIALS = tiny_tokenizer().all_special_ids


def _table(v: int = 512, d: int = 32) -> torch.Tensor:
    return torch.randn(v, d, generator=torch.Generator().manual_seed(3)) * 0.02


def _key(chain: int = 0, ops: tuple[str, ...] = ("gaussian",), seed: int = 7, table=None, **kw) -> ShakeKey:
    table = _table() if table is None else table
    return ShakeKey.generate(KeySetting(operators=ops, chain_length=chain, **kw), table, pinned=SPECIALS, seed=seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------- keys
def test_key_round_trip_regenerates_identical_tensors(tmp_path):
    key = _key(chain=4, ops=tuple(OPS))
    path = key.save(tmp_path / "k.json")
    assert (path.stat().st_mode & 0o777) == 0o600
    again = ShakeKey.load(path, vocab_size=512, dim=32)
    assert again == key and again.fingerprint() == key.fingerprint()
    assert torch.equal(again.perm, key.perm)
    for i in range(len(key.ops)):
        assert torch.equal(again.op_state(i), key.op_state(i))
        assert torch.equal(again.op_state(i, "head"), key.op_state(i, "head"))
        assert not torch.equal(key.op_state(i, "head"), key.op_state(i))  # an independent draw
    with pytest.raises(ValueError, match="stream='lm'"):
        key.op_state(0, "lm")
    assert ShakeKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key


def test_explicit_chain_fixes_the_operators_of_every_key():
    setting = KeySetting(chain=("laplace", "tilt", "laplace"), scales={"laplace": {"kappa": 2.0}})
    assert setting.chain_length == 3 and setting.operators == ("laplace", "tilt")
    for seed in range(4):
        key = ShakeKey.generate(setting, _table(), seed=seed)
        assert [s.name for s in key.ops] == ["laplace", "tilt", "laplace"]
        assert key.ops[0].params["kappa"] == 2.0
    with pytest.raises(ValueError, match="chain_length=2.*disagrees"):
        KeySetting(chain=("gaussian",), chain_length=2)
    with pytest.raises(ValueError, match="Unknown shaking operator 'swirl'"):
        KeySetting(chain=("gaussian", "swirl"))


def test_key_repr_and_describe_hide_the_seed():
    key = _key(chain=2, seed="c0ffee1234567890")
    text = repr(key) + json.dumps(key.describe()) + key.fingerprint()
    assert "c0ffee1234567890" not in text
    assert "seed" not in text


def test_default_seed_is_random_and_differs():
    a, b = ShakeKey.generate(KeySetting(), _table()), ShakeKey.generate(KeySetting(), _table())
    assert len(a.to_dict()["seed"]) == 32 and not torch.equal(a.perm, b.perm)


def test_permutation_pins_specials_and_is_a_bijection():
    key = _key()
    assert torch.equal(key.perm[SPECIALS], torch.tensor(SPECIALS))
    assert torch.equal(key.perm.sort().values, torch.arange(512))
    assert torch.equal(key.inv_perm[key.perm], torch.arange(512))
    assert (key.perm != torch.arange(512)).float().mean() > 0.9
    unpinned = ShakeKey.generate(KeySetting(pin="none"), _table(), pinned=SPECIALS, seed=7)
    assert unpinned.pinned == ()


def test_encode_decode_keep_ignore_labels():
    key = _key()
    ids = torch.tensor([[5, 9, -100], [0, 1, 2]])
    shaken = key.encode_ids(ids)
    assert shaken[0, 2] == -100 and torch.equal(key.decode_ids(shaken), ids)


# ---------------------------------------------------------------------------------------------- operators
@pytest.mark.parametrize("op", OPS)
def test_each_operator_inverts_exactly_and_changes_the_table(op):
    table = _table()
    key = _key(chain=1, ops=(op,))
    shaken = apply_vertical(table, key)
    assert _rel(shaken, table) > 1e-2  # the operator does something
    assert _rel(invert_vertical(shaken, key), table) <= 1e-5


@pytest.mark.parametrize("seed", range(6))
def test_random_chains_recover(seed):
    table = _table()
    key = _key(chain=1 + seed % 4, ops=tuple(OPS), seed=seed)
    shaken = shake_embedding(table, key)
    assert _rel(recover_embedding(shaken, key), table) <= 1e-5
    horizontal = _key(seed=seed)
    assert torch.equal(recover_embedding(shake_embedding(table, horizontal), horizontal), table)


def test_noise_scale_sets_the_noise_size():
    table = _table(4096, 64)
    for kappa in (0.25, 1.0):
        key = _key(chain=1, ops=("gaussian",), table=table, scales={"gaussian": {"kappa": kappa}})
        noise = apply_vertical(table, key) - table
        assert noise.std().item() == pytest.approx(kappa * table.std().item(), rel=0.05)
    key = _key(chain=1, ops=("dx-fixp",), table=table)
    norms = (apply_vertical(table, key) - table).norm(dim=1)
    assert norms.mean().item() == pytest.approx(0.5 * table.norm(dim=1).mean().item(), rel=0.05)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_fail_with_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown shaking operator 'rotate'"):
        KeySetting(operators=("rotate",))
    with pytest.raises(ValueError, match=r"gaussian.kappa=0.0.*> 0"):
        KeySetting(scales={"gaussian": {"kappa": 0.0}})
    with pytest.raises(ValueError, match=r"laplace.kappa=-1.0"):
        KeySetting(operators=("laplace",), scales={"laplace": {"kappa": -1}})
    with pytest.raises(ValueError, match="inflate.a=1.5"):
        KeySetting(operators=("inflate",), scales={"inflate": {"a": 1.5}})
    with pytest.raises(ValueError, match="`pin='all'`"):
        KeySetting(pin="all")
    with pytest.raises(ValueError, match="noise_mode"):
        KeySetting(noise_mode="fresh")
    path = _key().save(tmp_path / "k.json")
    with pytest.raises(ValueError, match="vocabulary of 512 ids.*49152 rows"):
        ShakeKey.load(path, vocab_size=49152)
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match="not a shaking key"):
        ShakeKey.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="vocabulary of 512"):
        shake_embedding(torch.zeros(100, 32), _key())


def test_model_without_embedding_and_double_shaking_fail():
    with pytest.raises(ValueError, match="Cannot find the input embedding"):
        find_embedding(torch.nn.Linear(4, 4))
    model = load_model("tiny-llama")
    key = ShakeKey.generate(KeySetting(chain_length=0), model.get_input_embeddings().weight, seed=1)
    shake_model(model, key)
    with pytest.raises(ValueError, match="already shaken"):
        shake_model(model, key)
    other = load_model("tiny-gpt2")
    recover_model(model, key)
    with pytest.raises(ValueError, match="Only a shaken model"):
        recover_model(other, key)
    with pytest.raises(ValueError, match="recovery mode"):
        recover_model(model, key, mode="partial")


# ---------------------------------------------------------------------------------------------- models
def _ids() -> torch.Tensor:
    tok = tiny_tokenizer()
    return torch.tensor([tok.encode("the market is good and the team won the match")])


@pytest.mark.parametrize(("name", "untie"), [("tiny-llama", False), ("tiny-llama", True), ("tiny-gpt2", False)])
def test_horizontal_shaking_is_lossless(name, untie):
    model = load_model(name).eval()
    if untie:
        assert untie_lm_head(model)
    key = ShakeKey.generate(KeySetting(chain_length=0), model.get_input_embeddings().weight, pinned=SPECIALS, seed=3)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        shaken = copy.deepcopy(model)
        shake_model(shaken, key)
        assert is_tied(shaken) == is_tied(model)
        out = shaken(key.encode_ids(ids)).logits
        assert not torch.equal(out, ref)
        assert torch.equal(key.plain_logits(out), ref)
        # greedy generation in the shaken space decodes to the plain generation
        plain_gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        shaken_gen = shaken.generate(key.encode_ids(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(key.decode_ids(shaken_gen), plain_gen)
        # horizontal recovery: plain ids on the recovered model == shaken ids on the shaken model
        recover_model(shaken, key, "horizontal")
        assert shaking_state(shaken) == "recovered-horizontal"
        assert torch.equal(shaken(ids).logits, ref)


def test_horizontal_shaking_of_an_encoder_classifier():
    model = load_model("tiny-bert", task="sequence_classification", num_labels=3).eval()
    key = ShakeKey.generate(KeySetting(chain_length=0), model.get_input_embeddings().weight, pinned=SPECIALS, seed=3)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        shake_model(model, key)
        assert torch.equal(model(key.encode_ids(ids)).logits, ref)


def _vertical_key(model, seed: int = 5) -> ShakeKey:
    setting = KeySetting(operators=tuple(OPS), chain_length=3)
    return ShakeKey.generate(setting, model.get_input_embeddings().weight, pinned=SPECIALS, seed=seed)


def test_vertical_shaking_keeps_a_tied_head_tied_and_full_recovery_restores():
    model = load_model("tiny-llama").eval()
    assert is_tied(model)
    original = copy.deepcopy(model)
    key = _vertical_key(model)
    ids = _ids()
    with torch.no_grad():
        ref = original(ids).logits
        shake_model(model, key)
        # one table: the head carries exactly the embedding's shaken rows (no second, averageable noise draw)
        assert is_tied(model) and head_is_vertical(model)
        assert not torch.equal(get_lm_head(model).weight, get_lm_head(original).weight[key.inv_perm])
        shaken_logits = key.plain_logits(model(key.encode_ids(ids)).logits)
        assert not torch.allclose(shaken_logits, ref, atol=1e-3)  # vertical noise changes the function
        recover_model(model, key, "full")
        assert _rel(model.get_input_embeddings().weight, original.get_input_embeddings().weight) <= 1e-5
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)


def test_untied_head_gets_its_own_noise_and_full_recovery_restores_both():
    model = load_model("tiny-llama").eval()
    untie_lm_head(model)
    with torch.no_grad():  # make head and embedding differ, as in a model trained untied
        get_lm_head(model).weight.mul_(1.5).add_(0.01)
    original = copy.deepcopy(model)
    key = _vertical_key(model)
    with torch.no_grad():
        shake_model(model, key)
    emb, head = model.get_input_embeddings().weight, get_lm_head(model).weight
    plain_diff = (original.get_input_embeddings().weight - get_lm_head(original).weight)[key.inv_perm]
    # with the embedding's own draw the noise would cancel in E_s - W_s and expose pi to table matching
    assert not torch.allclose(emb - head, plain_diff, atol=1e-3)
    assert not torch.allclose(head, get_lm_head(original).weight[key.inv_perm], atol=1e-3)
    with torch.no_grad():
        recover_model(model, key, "full")
    assert _rel(get_lm_head(model).weight, get_lm_head(original).weight) <= 1e-5
    assert _rel(model.get_input_embeddings().weight, original.get_input_embeddings().weight) <= 1e-5


def test_permute_only_head_is_untied_and_keeps_the_plain_rows():
    model = load_model("tiny-llama").eval()
    original = copy.deepcopy(model)
    key = _vertical_key(model)
    with torch.no_grad():
        shake_model(model, key, shake_lm_head_vertical=False)
    assert not is_tied(model) and model.config.tie_word_embeddings is False and not head_is_vertical(model)
    assert torch.equal(get_lm_head(model).weight, get_lm_head(original).weight[key.inv_perm])
    with torch.no_grad():
        recover_model(model, key, "full")
    assert torch.equal(get_lm_head(model).weight, get_lm_head(original).weight)


def test_untied_model_survives_save_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_model("tiny-llama")
    key = ShakeKey.generate(KeySetting(chain_length=1), model.get_input_embeddings().weight, seed=5)
    shake_model(model, key, shake_lm_head_vertical=False)  # unties the head
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not is_tied(again)
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(get_lm_head(again).weight, get_lm_head(model).weight)
    assert shaking_state(again) == "shaken"
    assert "seed" not in (tmp_path / "config.json").read_text()


# ---------------------------------------------------------------------------------------------- tokenizer
def test_shaken_tokenizer_round_trip():
    tok = tiny_tokenizer()
    key = _key()
    st = ShakenTokenizer(tok, key)
    text = "the market is good"
    plain = tok(text)["input_ids"]
    shaken = st(text)["input_ids"]
    assert shaken == key.encode_ids(torch.tensor(plain)).tolist() and shaken != plain
    assert st.decode(shaken) == text
    batch = st([text, "bad news"], padding=True, return_tensors="pt")
    assert torch.equal(
        key.decode_ids(batch["input_ids"]), tok([text, "bad news"], padding=True, return_tensors="pt")["input_ids"]
    )
    assert st.batch_decode(batch["input_ids"], skip_special_tokens=True) == [text, "bad news"]
    assert st.pad_token_id == tok.pad_token_id  # pinned special
    assert st.convert_tokens_to_ids(tok.convert_ids_to_tokens(plain)) == shaken
    with pytest.raises(ValueError, match="covers only"):
        ShakenTokenizer(tok, ShakeKey.generate(KeySetting(), _table(100), seed=1))


@pytest.mark.slow
def test_core_imports_without_lightning():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):\n"
        "            raise ImportError('lightning is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import privtune.shaking, privtune.shaking.search, privtune.shaking.cost, privtune.shaking.inference\n"
        "import privtune.shaking.recovery, privtune.attacks\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.assets
@pytest.mark.parametrize("untie", [False, True])
def test_horizontal_shaking_is_lossless_on_smollm2(untie):
    from privtune.models import load_tokenizer

    model = load_model("smollm2-135m-instruct").eval()
    tok = load_tokenizer("smollm2-135m-instruct")
    if untie:
        untie_lm_head(model)
    key = ShakeKey.generate(KeySetting(chain_length=0), model.get_input_embeddings().weight, pinned=tok.all_special_ids)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        ref = model(ids).logits
        plain_gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        shake_model(model, key)
        assert is_tied(model) != untie
        assert torch.equal(key.plain_logits(model(key.encode_ids(ids)).logits), ref)
        shaken_gen = model.generate(
            key.encode_ids(ids), max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id
        )
        assert torch.equal(key.decode_ids(shaken_gen), plain_gen)
        recover_model(model, key, "horizontal")
        assert torch.equal(model(ids).logits, ref)
