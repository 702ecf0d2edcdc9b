"""OpacusDP: per-sample clipping, the accountant's epsilon, bad configuration (skipped without opacus)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

pytest.importorskip("opacus")

from privtune.callbacks.dp_sgd import OpacusDP  # noqa: E402
from privtune.datamodules import TextFile  # noqa: E402
from privtune.modules import TextClassifier  # noqa: E402


@pytest.fixture
def data(tmp_path: Path) -> TextFile:
    rows = ["text,label"]
    pos, neg = ["good", "great", "happy", "love", "fine"], ["bad", "awful", "sad", "hate", "sad"]
    rows += [f"the {a} and {b} show,positive" for a, b in itertools.product(pos, repeat=2)]
    rows += [f"the {a} and {b} film,negative" for a, b in itertools.product(neg, repeat=2)]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    return TextFile(
        str(tmp_path / "s.csv"),
        template="Tweet: {text}\nSentiment:",
        label_words=[" negative", " positive"],
        train_size=32,
        val_size=8,
        test_size=8,
        max_length=24,
        batch_size=8,
    )


@pytest.mark.slow
def test_epsilon_matches_opacus_and_reaches_the_target(tiny_trainer, data):
    from opacus.accountants import PRVAccountant

    cb = OpacusDP(target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    module = TextClassifier(model="tiny-llama", tuning="lora", lr=1e-2)
    tiny_trainer(max_steps=8, max_epochs=10, limit_val_batches=0, callbacks=[cb]).fit(module, datamodule=data)
    reference = PRVAccountant()
    for _ in range(8):
        reference.step(noise_multiplier=cb.noise_multiplier, sample_rate=8 / 32)
    assert cb.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)
    assert cb.epsilon() == pytest.approx(3.0, abs=0.1)
    report = cb.report()
    assert report["steps"] == 8 and report["sample_rate"] == 0.25 and report["accountant"] == "prv"


def test_per_sample_gradients_are_clipped(tiny_trainer, data):
    import lightning.pytorch as pl

    norms = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001
            for p in pl_module.parameters():
                if p.requires_grad and getattr(p, "grad_sample", None) is not None:
                    gs = p.grad_sample
                    norms.append(gs.reshape(gs.shape[0], -1).norm(dim=1))

    cb = OpacusDP(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=1e-3)
    module = TextClassifier(model="tiny-llama", tuning="lora", lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[cb, Spy()]).fit(module, datamodule=data)
    assert norms and max(float(n.max()) for n in norms) > 1e-3  # raw per-sample norms exceed C...
    # ...but the applied update, with no noise, is the mean of clipped gradients: its norm is <= C
    grads = [p.grad.reshape(-1) for p in module.parameters() if p.requires_grad and p.grad is not None]
    assert torch.cat(grads).norm() <= 1e-3 * (1 + 1e-5)
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters() if n in before)


def test_bad_configuration_is_refused(tiny_trainer, data):
    with pytest.raises(ValueError, match="target_epsilon=0"):
        OpacusDP(target_epsilon=0)
    with pytest.raises(ValueError, match="max_grad_norm=-1"):
        OpacusDP(max_grad_norm=-1)
    with pytest.raises(ValueError, match="accountant='gdp2'"):
        OpacusDP(accountant="gdp2")
    module = TextClassifier(model="tiny-llama", tuning="lora")
    with pytest.raises(ValueError, match="gradient_clip_val"):
        tiny_trainer(max_steps=1, gradient_clip_val=1.0, callbacks=[OpacusDP()]).fit(module, datamodule=data)
