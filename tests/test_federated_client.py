"""Client-side local updates: FedAvg equals centralized SGD, FedProx's term, state kept compactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from privtune.federated import (
    ClientStore,
    ClientUpdate,
    FedAvg,
    LocalConfig,
    add_proximal_gradient,
    local_update,
    proximal_term,
)
from privtune.models import load_model
from privtune.prompts import DeepPrefixPrompt, freeze_backbone


def _loss(model, prompt: DeepPrefixPrompt):
    def fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, target = batch
        mask = torch.ones_like(ids)
        logits = model(input_ids=ids, use_cache=False, **prompt.forward_kwargs(mask)).logits[:, -1]
        return F.cross_entropy(logits, target)

    return fn


def test_fedavg_one_sgd_step_equals_centralized_step_on_the_union() -> None:
    model = load_model("tiny-llama", task="causal_lm", seed=0).eval()
    freeze_backbone(model)
    prompt = DeepPrefixPrompt.for_model(model, num_virtual_tokens=2, dropout=0.0, seed=0)
    w0 = prompt.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(10, 500, (3, 5), generator=g), torch.randint(0, 512, (3,), generator=g)) for _ in range(3)
    ]
    cfg = LocalConfig(optimizer="sgd", lr=0.5, clip_norm=0.0, max_steps=1)
    ups = []
    for i, b in enumerate(batches):
        with torch.no_grad():
            prompt.weight.copy_(w0)
        k, _ = local_update(prompt.weight, [b], _loss(model, prompt), cfg)
        assert k == 1
        ups.append(ClientUpdate(i, {"prefix": prompt.weight.detach().clone()}, num_examples=1))
    fed = FedAvg().step({"prefix": w0}, ups)["prefix"]
    with torch.no_grad():
        prompt.weight.copy_(w0)
    union = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    local_update(prompt.weight, [union], _loss(model, prompt), cfg)
    torch.testing.assert_close(fed, prompt.weight.detach(), atol=1e-6, rtol=1e-5)
    assert not torch.equal(fed, w0)


def test_adamw_state_is_kept_or_reset_and_grads_accumulate_without_zero_grad() -> None:
    w = torch.zeros(3, requires_grad=True)
    target = torch.tensor([1.0, 2.0, 3.0])

    def loss(_: object) -> torch.Tensor:
        return ((w - target) ** 2).sum()

    _, state = local_update(w, [0, 1], loss, LocalConfig(lr=0.1, clip_norm=0.0))
    assert int(state["state"][0]["step"]) == 2
    _, state2 = local_update(w, [0], loss, LocalConfig(lr=0.1, clip_norm=0.0), optimizer_state=state)
    assert int(state2["state"][0]["step"]) == 3
    _, state3 = local_update(w, [0], loss, LocalConfig(lr=0.1, reset_optimizer=True), optimizer_state=state)
    assert int(state3["state"][0]["step"]) == 1
    seen = []
    local_update(
        w,
        [0, 1],
        loss,
        LocalConfig(optimizer="sgd", lr=1e-9, zero_grad=False, clip_norm=0.0),
        grad_hook=lambda ps: seen.append(ps[0].grad.clone()),
    )
    torch.testing.assert_close(seen[1], 2 * seen[0], atol=1e-6, rtol=1e-6)  # accumulated


def test_fedprox_gradient_term_matches_the_paper() -> None:
    w, wg = torch.tensor([1.0, -1.0], requires_grad=True), torch.tensor([0.0, 1.0])
    term = proximal_term([w], [wg], mu=0.1)
    assert float(term) == pytest.approx(0.05 * (1 + 4))
    term.backward()
    auto = w.grad.clone()
    w.grad = torch.zeros(2)
    add_proximal_gradient([w], [wg], mu=0.1)
    torch.testing.assert_close(w.grad, auto)
    with pytest.raises(ValueError, match="mu"):
        add_proximal_gradient([w], [wg], mu=-1)


def test_client_store_is_lazy_and_roundtrips() -> None:
    store = ClientStore(initial_prompt=torch.zeros(2, 3))
    assert store.get(5).prompt.shape == (2, 3)
    assert store.nbytes() == 0
    s = store.get(5)
    s.prompt += 1
    store.put(5, s)
    copy = ClientStore(initial_prompt=torch.ones(1))
    copy.load_state_dict(store.state_dict())
    torch.testing.assert_close(copy.get(5).prompt, torch.ones(2, 3))
    assert copy.nbytes() == 24
