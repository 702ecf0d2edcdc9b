"""OpacusDP: Poisson sampling, step planning, the hard cap, resume, refusals (skipped without opacus).

The stopping-rule matrix runs a tiny MLP over a synthetic dataset so the file stays fast; the datamodule test
uses ``tiny-llama`` with privtune's TextFile.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

pytest.importorskip("opacus")

from privtune.callbacks.dp_sgd import BUDGET_CHECKPOINT, OpacusDP  # noqa: E402
from privtune.datamodules import TextFile  # noqa: E402
from privtune.dp import epsilon_spent  # noqa: E402
from privtune.modules import TextClassifier  # noqa: E402

N, B = 40, 8  # q = 0.2, 5 batches per epoch
TARGET = 2.0


class TinyMLP(pl.LightningModule):
    """A two-layer classifier over ``(x, y, index)`` batches; records the example indices it trains on."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.lr = lr
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y, index = batch
        self.seen.append(index.tolist())
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def synthetic(n: int = N) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long(), torch.arange(n))


def plain_loader(n: int = N, batch_size: int = B) -> DataLoader:
    return DataLoader(synthetic(n), batch_size=batch_size, shuffle=True)


def trainer_for(tmp_path: Path, callbacks: list, **overrides) -> pl.Trainer:  # noqa: ANN003
    kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
        "deterministic": True,
        "max_epochs": 1000,
        "callbacks": callbacks,
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def fit(tmp_path: Path, cb: OpacusDP, **overrides) -> tuple[TinyMLP, pl.Trainer]:  # noqa: ANN003
    pl.seed_everything(0)
    module = TinyMLP()
    extra = overrides.pop("callbacks", [])
    ckpt_path = overrides.pop("ckpt_path", None)
    trainer = trainer_for(tmp_path, [cb, *extra], **overrides)
    trainer.fit(module, train_dataloaders=plain_loader(), ckpt_path=ckpt_path)
    return module, trainer


def assert_spent_within(cb: OpacusDP, target: float = TARGET) -> float:
    eps = cb.report()["epsilon"]
    assert eps <= target  # never overspends
    assert eps >= 0.9 * target  # and the planned steps use the budget
    assert eps == pytest.approx(epsilon_spent(cb.history, cb.delta, "rdp"))
    return eps


# ---------------------------------------------------------------------- the stopping-rule matrix
@pytest.mark.parametrize(
    ("limits", "steps"),
    [
        ({"max_steps": 12}, 12),
        ({"max_epochs": 3}, 15),
        ({"max_epochs": 2, "max_steps": 100}, 10),  # max_steps beyond what the epochs allow
        ({"max_epochs": 4, "limit_train_batches": 0.6}, 12),  # int(5 * 0.6) = 3 per epoch
        ({"max_epochs": 5, "limit_train_batches": 2}, 10),
    ],
    ids=["max_steps", "max_epochs", "max_steps_beyond_epochs", "fractional_limit", "int_limit"],
)
def test_stopping_rules_spend_the_budget_and_no_more(tmp_path, limits, steps) -> None:
    cb = OpacusDP(target_epsilon=TARGET)
    _, trainer = fit(tmp_path, cb, **limits)
    assert cb.planned_steps == steps and cb.steps_taken == steps == trainer.global_step
    assert_spent_within(cb)
    assert not cb.report()["stopped_early"]


def test_max_time_with_steps_stops_at_the_budget_and_saves(tmp_path) -> None:
    cb = OpacusDP(target_epsilon=TARGET, steps=10)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1000)
    _, trainer = fit(
        tmp_path, cb, max_time={"seconds": 120}, max_epochs=None, enable_checkpointing=True, callbacks=[ckpt]
    )
    report = cb.report()
    assert report["stopped_early"] and report["planned_steps"] == 10
    assert cb.steps_taken == report["budget_steps"] >= 10
    assert trainer.global_step == cb.steps_taken  # stopped long before max_time
    assert_spent_within(cb)
    # one more step would pass the target: the cap is tight
    assert epsilon_spent([(cb.noise_multiplier, cb.sample_rate, cb.steps_taken + 1)], cb.delta, "rdp") > TARGET
    assert (tmp_path / "ckpt" / BUDGET_CHECKPOINT).is_file()


def test_resume_from_the_budget_checkpoint_takes_no_step(tmp_path) -> None:
    fit(
        tmp_path / "a",
        OpacusDP(target_epsilon=TARGET, steps=10),
        max_time={"seconds": 120},
        max_epochs=None,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1000)],
    )
    cb = OpacusDP(target_epsilon=TARGET, steps=10)
    pl.seed_everything(0)
    module = TinyMLP()
    trainer = trainer_for(tmp_path / "b", [cb], max_time={"seconds": 120}, max_epochs=None)
    ckpt = str(tmp_path / "ckpt" / BUDGET_CHECKPOINT)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    trainer.fit(module, train_dataloaders=plain_loader(), ckpt_path=ckpt)
    after = module.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # no update applied past the budget
    assert cb.steps_taken == cb.budget_steps
    assert_spent_within(cb)


class _Crash(pl.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_kill_and_resume_mid_epoch_redraws_the_same_batches_and_spends_the_budget(tmp_path) -> None:
    reference_cb = OpacusDP(target_epsilon=TARGET)
    reference, _ = fit(tmp_path / "a", reference_cb, max_steps=12)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):  # step 7: batch 2 of epoch 1
        fit(
            tmp_path / "b",
            OpacusDP(target_epsilon=TARGET),
            max_steps=12,
            enable_checkpointing=True,
            callbacks=[ckpt, _Crash(7)],
        )
    cb = OpacusDP(target_epsilon=TARGET)
    resumed, trainer = fit(tmp_path / "b", cb, max_steps=12, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 12 and cb.steps_taken == 12
    # the Poisson draws an uninterrupted run made (entry 0 of each run is the two-example probe before step 1)
    assert resumed.seen[1:] == reference.seen[1 + 7 :]
    assert cb.noise_multiplier == reference_cb.noise_multiplier
    assert cb.report()["epsilon"] == pytest.approx(reference_cb.report()["epsilon"])
    assert_spent_within(cb)


def test_a_step_past_the_budget_is_never_applied_even_if_the_trainer_must_go_on(tmp_path) -> None:
    """``min_steps`` overrides ``should_stop``: the cap then skips every further step instead of applying it."""
    params: list[list[torch.Tensor]] = []

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            params.append([p.detach().clone() for p in pl_module.parameters()])

    cb = OpacusDP(target_epsilon=TARGET, steps=6)
    module, trainer = fit(tmp_path, cb, max_time={"seconds": 120}, max_epochs=None, min_steps=12, callbacks=[Snap()])
    assert trainer.global_step == 12 and cb.steps_taken == cb.budget_steps < 12
    assert cb.report()["stopped_early"]
    budget = cb.budget_steps
    assert all(torch.equal(a, b) for later in params[budget:] for a, b in zip(params[budget - 1], later))
    assert all(p.grad is None for p in module.parameters())  # no raw gradient of a refused step left behind
    assert_spent_within(cb)


def test_resume_with_another_sampling_is_refused(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "a", OpacusDP(target_epsilon=TARGET), max_steps=12, enable_checkpointing=True,
            callbacks=[ckpt, _Crash(3)])  # fmt: skip
    with pytest.raises(ValueError, match=r"`sampling='poisson'` but this run has `sampling='shuffle'`"):
        fit(tmp_path / "b", OpacusDP(target_epsilon=TARGET, sampling="shuffle"), max_steps=12,
            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))  # fmt: skip


@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        (
            {"target_epsilon": TARGET},
            {"target_epsilon": 8.0},
            r"`target_epsilon=2\.0` but this run asks for `target_epsilon=8\.0`",
        ),
        (
            {"noise_multiplier": 1.0},
            {"noise_multiplier": 0.5},
            r"`noise_multiplier=1\.0` but .* `noise_multiplier=0\.5`",
        ),
        ({"target_epsilon": TARGET, "delta": 1e-5}, {"target_epsilon": TARGET, "delta": 1e-3}, r"`delta=1e-05` but"),
    ],
    ids=["target", "sigma", "delta"],
)
def test_resume_with_other_privacy_parameters_is_refused(tmp_path, first, second, named) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "a", OpacusDP(**first), max_steps=12, enable_checkpointing=True, callbacks=[ckpt, _Crash(3)])
    with pytest.raises(ValueError, match=named):
        fit(tmp_path / "b", OpacusDP(**second), max_steps=12, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    cb = OpacusDP(**{k: v for k, v in first.items() if k != "delta"})  # the same (or unset) parameters resume
    fit(tmp_path / "c", cb, max_steps=12, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert cb.steps_taken == 12


def test_several_training_loaders_are_refused(tmp_path) -> None:
    trainer = trainer_for(tmp_path, [OpacusDP(target_epsilon=TARGET)], max_steps=2)
    with pytest.raises(ValueError, match=r"exactly one training `DataLoader`.*list"):
        trainer.fit(TinyMLP(), train_dataloaders=[plain_loader(), plain_loader()])


class _Resumable(pl.LightningDataModule):
    """A datamodule built like privtune's: a seeded, resumable shuffling loader."""

    def train_dataloader(self) -> DataLoader:
        from privtune.datamodules.resumable import resumable_train_loader

        return resumable_train_loader(synthetic(), B, seed=11, trainer=self.trainer)


def test_datamodule_loader_becomes_poisson_and_resumes_bit_exactly(tmp_path) -> None:
    def run(root: Path, cb: OpacusDP, callbacks: list, ckpt_path: str | None = None) -> TinyMLP:
        pl.seed_everything(0)
        module = TinyMLP()
        trainer = trainer_for(root, [cb, *callbacks], max_steps=12, enable_checkpointing=bool(callbacks))
        trainer.fit(module, datamodule=_Resumable(), ckpt_path=ckpt_path)
        return module

    reference_cb = OpacusDP(target_epsilon=TARGET)
    reference = run(tmp_path / "a", reference_cb, [])
    assert reference_cb.seed == 11  # the datamodule sampler's seed drives the draws
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", OpacusDP(target_epsilon=TARGET), [ckpt, _Crash(8)])
    cb = OpacusDP(target_epsilon=TARGET)
    resumed = run(tmp_path / "b", cb, [], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.seen[1:] == reference.seen[1 + 8 :] and cb.steps_taken == 12
    assert {len(s) for s in reference.seen[1:]} != {B}  # Poisson: variable sizes
    assert_spent_within(cb)


def test_gradient_accumulation_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"`accumulate_grad_batches=4` is not supported.*multiply .*`batch_size` by 4"):
        fit(tmp_path, OpacusDP(target_epsilon=TARGET), max_steps=4, accumulate_grad_batches=4)


@pytest.mark.parametrize(
    "limits",
    [{"max_epochs": -1, "max_steps": -1}, {"max_epochs": None, "max_time": {"seconds": 3}}],
    ids=["no_limit", "max_time_only"],
)
def test_unbounded_run_is_refused_unless_steps_given(tmp_path, limits) -> None:
    with pytest.raises(ValueError, match=r"no finite number of steps.*give OpacusDP `steps=`"):
        fit(tmp_path, OpacusDP(target_epsilon=TARGET), **limits)


# ---------------------------------------------------------------------- sigma, target and the accountants
def test_noise_multiplier_is_used_as_given() -> None:
    cb = OpacusDP(noise_multiplier=5.0)
    assert cb.target_epsilon is None


def test_noise_multiplier_run_reports_its_epsilon_without_a_cap(tmp_path) -> None:
    cb = OpacusDP(noise_multiplier=5.0)
    fit(tmp_path, cb, max_steps=6)
    report = cb.report()
    assert report["noise_multiplier"] == 5.0 and report["budget_steps"] is None and report["steps"] == 6
    assert report["epsilon"] == pytest.approx(epsilon_spent([(5.0, 0.2, 6)], report["delta"], "rdp"))


def test_target_and_noise_multiplier_together_or_neither_are_refused() -> None:
    with pytest.raises(ValueError, match=r"`target_epsilon=3`.*`noise_multiplier=5`.*not both"):
        OpacusDP(target_epsilon=3, noise_multiplier=5)
    with pytest.raises(ValueError, match="Give `target_epsilon`.*or `noise_multiplier`"):
        OpacusDP()


def test_prv_gives_the_final_figure_and_rdp_the_training_log(tmp_path, monkeypatch) -> None:
    """PRV plans and gives the final figure; during training only the cached RDP bound is computed."""
    from opacus.accountants import PRVAccountant

    calls: list[str] = []
    phase = ["before"]
    original = PRVAccountant.get_epsilon

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(phase[0])
        return original(self, *args, **kwargs)

    class Phase(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            phase[0] = "training"

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001 - after OpacusDP's (list order)
            if trainer.current_epoch == trainer.max_epochs - 1:
                phase[0] = "end"

    monkeypatch.setattr(PRVAccountant, "get_epsilon", counted)
    cb = OpacusDP(target_epsilon=TARGET, accountant="prv")
    _, trainer = fit(tmp_path, cb, max_epochs=3, callbacks=[Phase()])
    assert "training" not in calls  # 3 epoch ends, 15 steps: RDP only
    assert calls.count("end") == 1 and calls[0] == "before"  # planning and the cap, then the final figure
    report = cb.report()
    assert report["accountant"] == "prv" and report["steps"] == 15
    assert report["epsilon"] == pytest.approx(epsilon_spent(cb.history, cb.delta, "prv"))
    assert 0.9 * TARGET <= report["epsilon"] <= TARGET
    logged = float(trainer.callback_metrics["dp/epsilon_rdp"])  # the cheap bound logged each epoch
    assert logged == pytest.approx(epsilon_spent([(cb.noise_multiplier, cb.sample_rate, 15)], cb.delta, "rdp"))
    assert logged >= report["epsilon"]


# ---------------------------------------------------------------------- sampling
def test_plain_dataloader_becomes_poisson(tmp_path) -> None:
    cb = OpacusDP(target_epsilon=TARGET)
    module, trainer = fit(tmp_path, cb, max_steps=15)
    loader = trainer.train_dataloader
    from privtune.data.poisson import PoissonBatchSampler

    assert isinstance(loader.batch_sampler, PoissonBatchSampler) and loader.batch_sampler.sample_rate == 0.2
    sizes = {len(s) for s in module.seen[1:]}
    assert len(sizes) > 1  # variable batch sizes
    assert all(len(set(s)) == len(s) for s in module.seen[1:])
    assert cb.report()["sampling"].startswith("Poisson") and not cb.report()["epsilon_is_approximate"]


def test_shuffle_sampling_is_labelled_approximate(tmp_path) -> None:
    cb = OpacusDP(target_epsilon=TARGET, sampling="shuffle")
    module, trainer = fit(tmp_path, cb, max_epochs=2)
    report = cb.report()
    assert report["epsilon_is_approximate"] and "approximate" in report["sampling"]
    assert "dp/epsilon_approx" in trainer.callback_metrics and "dp/epsilon" not in trainer.callback_metrics
    assert [len(s) for s in module.seen[1:6]] == [8] * 5  # after the probe: fixed-size batches


def test_empty_poisson_draw_is_a_noise_only_step(tmp_path) -> None:
    """With q = 1/20 most draws are empty; such a step must apply no example's gradient (here: no noise either)."""
    from privtune.data.poisson import PoissonBatchSampler

    changed: list[tuple[bool, bool]] = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self.before = [p.detach().clone() for p in pl_module.parameters()]
            sampler = trainer.train_dataloader.batch_sampler
            assert isinstance(sampler, PoissonBatchSampler)
            self.empty = sampler.is_placeholder(trainer.current_epoch, batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            moved = any(not torch.equal(a, p) for a, p in zip(self.before, pl_module.parameters()))
            changed.append((self.empty, moved))

    pl.seed_everything(0)
    trainer = trainer_for(tmp_path, [OpacusDP(noise_multiplier=0.0), Watch()], max_steps=20)
    trainer.fit(TinyMLP(lr=1.0), train_dataloaders=plain_loader(20, 1))
    assert set(changed) == {(True, False), (False, True)}


def test_functorch_grad_sampler_gives_the_same_clipped_update(tmp_path) -> None:
    updates = []
    for sampler in ("hooks", "functorch"):
        pl.seed_everything(0)
        module = TinyMLP()
        before = [p.detach().clone() for p in module.parameters()]
        cb = OpacusDP(noise_multiplier=0.0, max_grad_norm=0.05, grad_sampler=sampler)
        trainer_for(tmp_path / sampler, [cb], max_steps=3).fit(module, train_dataloaders=plain_loader())
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(module.parameters(), before)]))
    assert updates[0].abs().max() > 0
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-4, atol=1e-6)


def test_iterable_dataset_is_refused_with_how_to_wrap(tmp_path) -> None:
    class Stream(IterableDataset):
        def __iter__(self):  # noqa: ANN204
            yield from synthetic()

    trainer = trainer_for(tmp_path, [OpacusDP(target_epsilon=TARGET)], max_steps=2)
    with pytest.raises(ValueError, match=r"without `__len__`.*batch_sampler=privtune.data.poisson.PoissonBatchSampler"):
        trainer.fit(TinyMLP(), train_dataloaders=DataLoader(Stream(), batch_size=4))


# ---------------------------------------------------------------------- layers Opacus cannot handle
def test_trainable_position_embedding_is_named_with_the_fix(tiny_trainer) -> None:
    from privtune.models import load_model

    class GPT2Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = load_model("tiny-gpt2")

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ids = torch.randint(0, 100, (16, 8))
    trainer = tiny_trainer(max_steps=2, callbacks=[OpacusDP(target_epsilon=TARGET)])
    with pytest.raises(ValueError, match=r"`model\.transformer\.wpe\.weight`.*Freeze them"):
        trainer.fit(GPT2Module(), train_dataloaders=DataLoader(TensorDataset(ids), batch_size=4))


def test_training_step_without_a_loss_is_refused_before_the_first_step(tmp_path) -> None:
    class NoLoss(TinyMLP):
        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            return None

    trainer = trainer_for(tmp_path, [OpacusDP(target_epsilon=TARGET)], max_steps=2)
    with pytest.raises(ValueError, match=r"returned NoneType: return the loss"):
        trainer.fit(NoLoss(), train_dataloaders=plain_loader())


def test_trainable_batchnorm_is_refused_at_setup(tmp_path) -> None:
    module = TinyMLP()
    module.net.insert(1, nn.BatchNorm1d(8))
    trainer = trainer_for(tmp_path, [OpacusDP(target_epsilon=TARGET)], max_steps=2)
    with pytest.raises(ValueError, match=r"`net\.1` \(BatchNorm1d\).*BatchNorm by GroupNorm"):
        trainer.fit(module, train_dataloaders=plain_loader())


def test_layers_opacus_says_to_replace_are_named_at_setup(tmp_path) -> None:
    module = TinyMLP()
    module.attn = nn.MultiheadAttention(8, 2)
    module.rnn = nn.LSTM(4, 4)
    module.frozen = nn.LSTM(4, 4).requires_grad_(False)  # frozen: no per-sample gradient needed
    trainer = trainer_for(tmp_path, [OpacusDP(target_epsilon=TARGET)], max_steps=2)
    with pytest.raises(ValueError, match=r"`attn` \(MultiheadAttention\), `rnn` \(LSTM\); freeze") as err:
        trainer.fit(module, train_dataloaders=plain_loader())
    assert "frozen" not in str(err.value) and "DPLSTM" in str(err.value)


# ---------------------------------------------------------------------- with a privtune datamodule
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
def test_datamodule_run_matches_opacus_and_reaches_the_target(tiny_trainer, data) -> None:
    from opacus.accountants import RDPAccountant

    cb = OpacusDP(target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    module = TextClassifier(model="tiny-llama", tuning="lora", lr=1e-2)
    trainer = tiny_trainer(max_steps=8, max_epochs=10, limit_train_batches=1.0, limit_val_batches=0, callbacks=[cb])
    trainer.fit(module, datamodule=data)
    reference = RDPAccountant()
    for _ in range(8):
        reference.step(noise_multiplier=cb.noise_multiplier, sample_rate=8 / 32)
    assert cb.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert 0.9 * 3.0 <= cb.epsilon() <= 3.0
    report = cb.report()
    assert report["steps"] == 8 and report["sample_rate"] == 0.25 and report["accountant"] == "rdp"
    assert cb.seed == data.seed  # the datamodule's sampler seed drives the Poisson draws


def test_per_sample_gradients_are_clipped(tiny_trainer, data) -> None:
    norms = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
            for p in pl_module.parameters():
                if p.requires_grad and getattr(p, "grad_sample", None) is not None:
                    gs = p.grad_sample
                    norms.append(gs.reshape(gs.shape[0], -1).norm(dim=1))

    cb = OpacusDP(noise_multiplier=0.0, max_grad_norm=1e-3)
    module = TextClassifier(model="tiny-llama", tuning="lora", lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[cb, Spy()]).fit(module, datamodule=data)
    assert norms and max(float(n.max()) for n in norms) > 1e-3  # raw per-sample norms exceed C...
    # ...but the applied update, with no noise, is the sum of n clipped gradients over the expected batch size 8
    n = max(len(x) for x in norms)
    grads = [p.grad.reshape(-1) for p in module.parameters() if p.requires_grad and p.grad is not None]
    assert torch.cat(grads).norm() <= 1e-3 * n / 8 * (1 + 1e-5)
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters() if n in before)


def test_bad_configuration_is_refused(tiny_trainer, data) -> None:
    with pytest.raises(ValueError, match="target_epsilon=0"):
        OpacusDP(target_epsilon=0)
    with pytest.raises(ValueError, match="max_grad_norm=-1"):
        OpacusDP(target_epsilon=1, max_grad_norm=-1)
    with pytest.raises(ValueError, match="accountant='gdp2'"):
        OpacusDP(target_epsilon=1, accountant="gdp2")
    with pytest.raises(ValueError, match="sampling='random'"):
        OpacusDP(target_epsilon=1, sampling="random")
    with pytest.raises(ValueError, match="grad_sampler='ghost'"):
        OpacusDP(target_epsilon=1, grad_sampler="ghost")
    with pytest.raises(ValueError, match="`steps=0`"):
        OpacusDP(target_epsilon=1, steps=0)
    with pytest.raises(ValueError, match=r"`delta=1\.5`"):
        OpacusDP(target_epsilon=1, delta=1.5)
    module = TextClassifier(model="tiny-llama", tuning="lora")
    with pytest.raises(ValueError, match="gradient_clip_val"):
        tiny_trainer(max_steps=1, gradient_clip_val=1.0, callbacks=[OpacusDP(target_epsilon=1)]).fit(
            module, datamodule=data
        )


def test_resume_with_another_batch_size_is_refused(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(
            tmp_path / "a",
            OpacusDP(target_epsilon=TARGET),
            max_steps=12,
            enable_checkpointing=True,
            callbacks=[ckpt, _Crash(3)],
        )
    pl.seed_everything(0)
    trainer = trainer_for(tmp_path / "b", [OpacusDP(target_epsilon=TARGET)], max_steps=12)
    with pytest.raises(ValueError, match=r"batch size 8 \(q=0\.2\).*batch size 4 \(q=0\.1\)"):
        trainer.fit(TinyMLP(), train_dataloaders=plain_loader(N, 4), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


def test_nothing_is_left_behind_after_fit(tmp_path) -> None:
    cb = OpacusDP(target_epsilon=TARGET)
    module, trainer = fit(tmp_path, cb, max_steps=3)
    assert all(getattr(p, "grad_sample", None) is None for p in module.parameters())
    assert not math.isnan(cb.report()["epsilon"])
    from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource

    assert type(trainer.fit_loop._data_source) is _DataLoaderSource
