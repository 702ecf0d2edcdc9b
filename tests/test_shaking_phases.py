"""Private inference, recovery losses and module, the setting search and the cost ledger (tiny models)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from privtune.models import get_blocks, load_model, tiny_tokenizer
from privtune.shaking import KeySetting, ShakeKey, shake_model
from privtune.shaking.cost import CostLedger
from privtune.shaking.inference import ShakenClient, ShakenServer, private_classify, private_generate
from privtune.shaking.recovery import awareness_loss, freeze_representation, function_loss, train_first_blocks
from privtune.shaking.search import (
    Candidate,
    SearchSpace,
    TrialResult,
    choose,
    pareto_front,
    run_search,
    sample_candidates,
    save_search,
    write_setting_config,
)

TEXTS = ["the market is good", "the team won the match and the fans sang"]


def _shaken(chain: int = 0):
    model = load_model("tiny-llama").eval()
    tok = tiny_tokenizer()
    key = ShakeKey.generate(
        KeySetting(operators=("gaussian",), chain_length=chain),
        model.get_input_embeddings().weight,
        pinned=tok.all_special_ids,
        seed=8,
    )
    shaken = copy.deepcopy(model)
    shake_model(shaken, key)
    return model, shaken, key, tok


def test_private_inference_matches_plain_and_server_sees_only_shaken_ids():
    model, shaken, key, tok = _shaken()
    seen = []
    handle = shaken.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    client, server = ShakenClient(tok, key), ShakenServer(shaken)
    texts = private_generate(client, server, TEXTS, max_new_tokens=5)
    handle.remove()
    for text, got in zip(TEXTS, texts):
        ids = torch.tensor([tok.encode(text)])
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
        assert got == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    prompts = [s for s in seen if s.shape[1] > 1]  # the prefill of each query (later calls are 1 new token)
    for text, prompt in zip(TEXTS, prompts):
        assert torch.equal(prompt, key.encode_ids(torch.tensor([tok.encode(text)])))
    words = [" negative", " positive"]
    preds = private_classify(client, server, TEXTS, words)
    plain_client = ShakenClient(
        tok, ShakeKey.generate(KeySetting(chain_length=0, permute=False), model.get_input_embeddings().weight, seed=1)
    )
    assert torch.equal(preds, private_classify(plain_client, ShakenServer(model), TEXTS, words))


def test_recovery_losses_are_zero_for_horizontal_keys_and_train_the_first_blocks():
    model, shaken, key, tok = _shaken()
    ids = torch.tensor([tok.encode(TEXTS[1])])
    assert awareness_loss(shaken, model, ids, key, layers=[1, 2]).item() == 0.0
    model_v, shaken_v, key_v, _ = _shaken(chain=1)
    freeze_representation(shaken_v)
    params = train_first_blocks(shaken_v, 2)
    assert all(not p.requires_grad for p in get_blocks(shaken_v)[2].parameters())
    assert not shaken_v.get_input_embeddings().weight.requires_grad
    opt = torch.optim.AdamW(params, lr=1e-3)
    shaken_v.train()
    first = awareness_loss(shaken_v, model_v, ids, key_v, layers=[2]).item()
    assert first > 0
    for _ in range(30):
        loss = awareness_loss(shaken_v, model_v, ids, key_v, layers=[2])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    fn = function_loss(shaken_v, model_v, ids, key_v, lambda_kl=1.0)
    fn.backward()
    assert math.isfinite(fn.item())
    with pytest.raises(ValueError, match="trainable_blocks=9"):
        train_first_blocks(shaken_v, 9)


def test_search_front_and_choice(tmp_path):
    space = SearchSpace(chain_lengths=(1, 2), operators=("gaussian", "laplace"))
    cands = sample_candidates(space, budget=4, seed=0)
    assert [c.name for c in cands[:2]] == ["none", "horizontal"] and len(cands) == 6

    def trial(cand: Candidate, seed: int) -> dict[str, float]:
        n = 0 if cand.setting is None else cand.setting.chain_length
        return {"utility": 0.9 - 0.05 * n, "attack": 1.0 if n == 0 else 0.5 / n, "cost": 1.0 + n}

    search = run_search(trial, cands, seeds=(0, 1), tau_attack=0.3)
    best = search["results"][search["choice"]]
    assert best.attack <= 0.3 and best.candidate.setting.chain_length == 2
    results = [
        TrialResult(Candidate("a", None), 0.9, 0.9, 1),
        TrialResult(Candidate("b", None), 0.8, 0.1, 1),
        TrialResult(Candidate("c", None), 0.7, 0.2, 2),
    ]
    assert pareto_front(results) == [0, 1]
    assert choose(results, tau_attack=0.05) == 1  # infeasible: the lowest attack on the front
    out = save_search(search, tmp_path / "search.json")
    assert json.loads(out.read_text())["choice"] == search["choice"]
    template = tmp_path / "t.yaml"
    template.write_text(
        "# purpose\n# Run: python train.py fit --config t.yaml\ntrainer:\n  callbacks:\n"
        "    - class_path: privtune.callbacks.embedding_shaking.EmbeddingShaking\n"
        "      init_args:\n        key_path: k.json\n"
    )
    written = write_setting_config(best.candidate.setting, template, tmp_path / "chosen.yaml", comment="chosen")
    text = written.read_text()
    assert "chain_length: 2" in text and "key_path: k.json" in text and "seed" not in text
    # a candidate is an explicit chain: every key drawn from the chosen setting has the chain its trials measured
    chain = best.candidate.setting.chain
    assert len(chain) == 2 and "chain:" in text
    table = torch.randn(64, 8)
    for secret in range(5):
        key = ShakeKey.generate(best.candidate.setting, table, seed=secret)
        assert tuple(step.name for step in key.ops) == chain
    with pytest.raises(ValueError, match="tau_attack"):
        run_search(trial, cands, tau_attack=2)


def test_cost_ledger_ratios(tmp_path):
    ledger = CostLedger()
    ledger.add("plain_tuning", 2.0, 4)
    ledger.add("private_tuning", 2.2, 4)
    with ledger.phase("keygen"):
        pass
    assert ledger.ratios() == {"private_tuning": pytest.approx(1.1)}
    assert (
        "keygen" in ledger.markdown()
        and json.loads(ledger.save(tmp_path / "c.json").read_text())["counts"]["plain_tuning"] == 4
    )
