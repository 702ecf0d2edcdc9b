"""Embedding-inversion attacks A1-A4 and learned inversion against shaken tables (privtune.attacks)."""

from __future__ import annotations

import copy

import pytest
import torch

from privtune.attacks import (
    EmbeddingRegressionProbe,
    InversionProbe,
    anchor_aligned_matching,
    attack_report,
    combined_attack,
    frequency_attack,
    hidden_states,
    model_attack_report,
    recovery_rate,
    table_matching,
    token_counts,
)
from privtune.models import get_lm_head, load_model, tiny_tokenizer
from privtune.shaking import KeySetting, ShakeKey, shake_embedding, shake_model

SPECIALS = tiny_tokenizer().all_special_ids


def _table(v: int = 512, d: int = 32) -> torch.Tensor:
    return torch.randn(v, d, generator=torch.Generator().manual_seed(11))


def _key(table, ops=("gaussian",), chain=0, **scales) -> ShakeKey:
    setting = KeySetting(operators=ops, chain_length=chain, scales=dict(scales))
    return ShakeKey.generate(setting, table, pinned=SPECIALS, seed=4)


def test_horizontal_only_is_fully_recovered_by_table_matching():
    table = _table()
    key = _key(table)
    cand, _ = table_matching(shake_embedding(table, key), table, k=5)
    assert recovery_rate(cand, key.inv_perm)["top1"] == 1.0


def test_noise_lowers_table_matching_monotonically():
    table = _table()
    rates = []
    for kappa in (0.1, 1.0, 3.0):
        key = _key(table, chain=1, gaussian={"kappa": kappa})
        cand, _ = table_matching(shake_embedding(table, key), table)
        rates.append(recovery_rate(cand, key.inv_perm)["top1"])
    assert rates[0] > 0.95 and rates[0] > rates[1] > rates[2]
    assert rates[2] < 0.2


def test_anchor_alignment_defeats_a_strong_tilt():
    table = _table(512, 16)
    key = _key(table, ops=("tilt",), chain=2, tilt={"epsilon": 1.0})
    shaken = shake_embedding(table, key)
    a1 = recovery_rate(table_matching(shaken, table)[0], key.inv_perm)["top1"]
    anchors = torch.arange(64)  # the attacker knows 64 pairs (pinned + template tokens)
    cand, _ = anchor_aligned_matching(shaken, table, key.perm[anchors], anchors, method="affine", ridge=1e-6)
    a2 = recovery_rate(cand, key.inv_perm)["top1"]
    assert a2 > 0.95 and a2 > a1 + 0.2


def test_frequency_attack_recovers_distinct_frequencies():
    v = 64
    key = ShakeKey.generate(KeySetting(chain_length=0, pin="none"), _table(v, 8), seed=2)
    public = torch.arange(v, 0, -1).float() * 10  # every id a distinct frequency
    traffic = torch.repeat_interleave(torch.arange(v), public.long())
    shaken_counts = token_counts(key.encode_ids(traffic)[None], v)
    guess = frequency_attack(shaken_counts, public)
    assert recovery_rate(guess, key.inv_perm)["top1"] == 1.0


def test_combined_attack_is_one_to_one_and_reports_the_maximum():
    table = _table()
    key = _key(table, chain=1, gaussian={"kappa": 1.0})
    shaken = shake_embedding(table, key)
    counts = torch.arange(512, 0, -1).float()
    guess = combined_attack(shaken, table, counts[key.inv_perm], counts, k=5)
    assert guess.unique().numel() > 0.9 * 512
    report = attack_report(
        shaken, table, key.inv_perm, known=SPECIALS, shaken_counts=counts[key.inv_perm], public_counts=counts
    )
    assert set(report) == {"A1", "A2", "A3", "A4", "A"}
    assert report["A"]["top1"] == max(r["top1"] for k, r in report.items() if k != "A")
    assert report["A3"]["top1"] == 1.0  # distinct public frequencies give the permutation away


@pytest.mark.parametrize("untied", [False, True])
def test_a_permute_only_head_gives_the_permutation_away(untied):
    """The cloud holds the head too: strong noise on the embedding alone protects nothing."""
    public = load_model("tiny-llama").eval()
    if untied:
        from privtune.shaking import untie_lm_head

        untie_lm_head(public)
    setting = KeySetting(operators=("gaussian",), chain_length=1, scales={"gaussian": {"kappa": 16.0}})
    key = ShakeKey.generate(setting, public.get_input_embeddings().weight, pinned=SPECIALS, seed=4)
    leaky, shaken = copy.deepcopy(public), copy.deepcopy(public)
    shake_model(leaky, key, shake_lm_head_vertical=False)
    shake_model(shaken, key)
    leak = model_attack_report(leaky, public, key.inv_perm, known=SPECIALS, sample=None)
    assert leak["embedding"]["A1"]["top1"] < 0.2  # the noisy input table alone looks safe...
    assert leak["head"]["A1"]["top1"] == 1.0 and leak["A"] == {"top1": 1.0, "table": "head"}  # ...the head is not
    safe = model_attack_report(shaken, public, key.inv_perm, known=SPECIALS, sample=None)
    assert set(safe) == ({"embedding", "head", "A"} if untied else {"embedding", "A"})  # a tied head is one table
    assert safe["A"]["top1"] < 0.2
    assert get_lm_head(shaken).weight.shape == get_lm_head(public).weight.shape


def test_learned_inversion_reads_shaken_hidden_states():
    model = load_model("tiny-llama").eval()
    key = ShakeKey.generate(KeySetting(chain_length=0), model.get_input_embeddings().weight, pinned=SPECIALS, seed=1)
    shaken = copy.deepcopy(model)
    shake_model(shaken, key)
    gen = torch.Generator().manual_seed(0)
    public = torch.randint(7, 512, (64, 32), generator=gen)
    private = torch.randint(7, 512, (4, 32), generator=gen)
    probe = InversionProbe(32, 512).fit(hidden_states(model, public, 1).reshape(-1, 32), public.reshape(-1), steps=150)
    plain = recovery_rate(probe.predict(hidden_states(model, private, 1).reshape(-1, 32)), private.reshape(-1))
    attacked = probe.predict(hidden_states(shaken, key.encode_ids(private), 1).reshape(-1, 32))
    # the permutation does not change the hidden states of the first block, so the probe reads them equally
    assert recovery_rate(attacked, private.reshape(-1))["top1"] == pytest.approx(plain["top1"])
    assert plain["top1"] > 0.1  # far above chance (1/505)


def test_embedding_regression_probe_inverts_first_block_states():
    model = load_model("tiny-llama").eval()
    table = model.get_input_embeddings().weight.detach()
    gen = torch.Generator().manual_seed(0)
    public = torch.randint(7, 512, (64, 32), generator=gen)
    private = torch.randint(7, 512, (4, 32), generator=gen)
    probe = EmbeddingRegressionProbe(ridge=1e-4).fit(
        hidden_states(model, public, 1).reshape(-1, 32), public.reshape(-1), table
    )
    guess = probe.predict(hidden_states(model, private, 1).reshape(-1, 32), table)
    assert recovery_rate(guess, private.reshape(-1))["top1"] > 0.3
