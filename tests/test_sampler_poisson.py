"""Resumable samplers: Poisson draws (bit-exact mid-epoch resume, q, empty draws) and batch-size checks on resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from privtune.data.poisson import PoissonBatchSampler
from privtune.data.sampler import ResumableSampler
from privtune.datamodules.resumable import PoissonDataLoader, poisson_train_loader, resumable_train_loader


def test_poisson_batches_are_independent_draws_at_rate_q() -> None:
    sampler = PoissonBatchSampler(1000, 0.05, seed=3)
    assert len(sampler) == 20
    batches = [b for _ in range(5) for b in sampler]  # five epochs
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float)
    assert sizes.mean().item() == pytest.approx(50, rel=0.1)  # E|batch| = qN
    assert sizes.std().item() == pytest.approx((1000 * 0.05 * 0.95) ** 0.5, rel=0.35)  # binomial spread
    assert len(set(sizes.tolist())) > 5
    assert all(len(set(b)) == len(b) for b in batches)  # without replacement inside a batch
    counts = torch.bincount(torch.tensor([i for b in batches for i in b]), minlength=1000).float()
    assert counts.mean().item() == pytest.approx(100 * 0.05, rel=0.05)  # every example at rate q per step


def test_poisson_resume_mid_epoch_is_bit_exact() -> None:
    uninterrupted = PoissonBatchSampler(50, 0.1, seed=7)
    epoch0, epoch1 = list(uninterrupted), list(uninterrupted)
    assert epoch0 != epoch1
    resumed = PoissonBatchSampler(50, 0.1, seed=7)  # a new process
    resumed.set_position(1, 4)
    assert list(resumed) == epoch1[4:]
    assert list(resumed) == list(uninterrupted)  # and then epoch 2 in full, like the uninterrupted sampler
    finished = PoissonBatchSampler(50, 0.1, seed=7)
    finished.set_position(0, 10)  # saved after the epoch's last batch: continue with epoch 1
    assert list(finished) == epoch1
    other_seed = PoissonBatchSampler(50, 0.1, seed=8)
    assert list(other_seed) != epoch0


def test_set_epoch_selects_the_epoch_draws() -> None:
    sampler = PoissonBatchSampler(30, 0.2, seed=1)
    epochs = [list(sampler) for _ in range(3)]
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1]
    assert epochs[2][3] == (sampler.draw(2, 3) or [0])


def test_empty_draw_yields_a_marked_placeholder() -> None:
    sampler = PoissonBatchSampler(5, 0.01, seed=0)  # P(empty) = 0.99^5 ~ 0.95
    batches = list(sampler)
    empty = [i for i in range(len(batches)) if sampler.is_placeholder(0, i)]
    assert empty and all(batches[i] == [0] for i in empty)
    assert all(sampler.draw(0, i) == batches[i] for i in range(len(batches)) if i not in empty)


def test_poisson_sampler_refuses_bad_arguments_and_other_checkpoints() -> None:
    with pytest.raises(ValueError, match=r"`sample_rate=1\.5` must be in \(0, 1\]"):
        PoissonBatchSampler(10, 1.5)
    with pytest.raises(ValueError, match="`num_examples=0`"):
        PoissonBatchSampler(0, 0.5)
    sampler = PoissonBatchSampler(40, 0.1, seed=0)
    with pytest.raises(ValueError, match=r"expected batch size 8 \(q=0\.2\).*this run has .*batch size 4 \(q=0\.1\)"):
        sampler.load_state_dict({"seed": 0, "num_examples": 40, "sample_rate": 0.2, "batches_per_epoch": 5})
    sampler.load_state_dict(sampler.state_dict())


def test_plain_loader_is_converted_keeping_collate_and_length() -> None:
    data = TensorDataset(torch.arange(20).float())
    collate_calls = []

    def collate(items):  # noqa: ANN001, ANN202
        collate_calls.append(len(items))
        return torch.stack([x for (x,) in items])

    loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate)
    poisson = poisson_train_loader(loader, seed=0, trainer=None)
    assert isinstance(poisson, PoissonDataLoader) and len(poisson) == len(loader) == 5
    assert poisson.batch_sampler.sample_rate == pytest.approx(0.2)
    assert sum(len(b) for b in poisson) == sum(collate_calls) and collate_calls
    assert poisson_train_loader(poisson, seed=0, trainer=None) is poisson  # already Poisson: kept
    with pytest.raises(ValueError, match=r"batch size 32 exceeds the 20 training examples"):
        poisson_train_loader(DataLoader(data, batch_size=32), seed=0, trainer=None)


# ---------------------------------------------------------------------- shuffled loader: another batch size
def test_shuffled_sampler_refuses_another_batch_size_mid_epoch() -> None:
    sampler = ResumableSampler(40, seed=1, batch_size=4)
    sampler.resume_at(epoch=2, batches_done=3, batch_size=4)
    with pytest.raises(ValueError, match=r"3 batches into epoch 2 with `batch_size=8`.*this run has `batch_size=4`"):
        sampler.load_state_dict({"seed": 1, "num_examples": 40, "batch_size": 8})


def test_shuffled_sampler_allows_another_batch_size_at_an_epoch_end() -> None:
    reference = ResumableSampler(40, seed=1)
    epochs = [list(reference) for _ in range(3)]
    sampler = ResumableSampler(40, seed=1)
    sampler.resume_at(epoch=1, batches_done=5, batch_size=4)  # the new size: 5 x 4 = 20, mid-epoch by mistake
    sampler.load_state_dict({"seed": 1, "num_examples": 40, "batch_size": 8})  # 5 x 8 = 40: epoch 1 was done
    assert list(sampler) == epochs[2]
    fresh = ResumableSampler(40, seed=1)
    fresh.resume_at(epoch=0, batches_done=0, batch_size=4)
    fresh.load_state_dict({"seed": 1, "num_examples": 40, "batch_size": 8})
    assert list(fresh) == epochs[0]


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Data(pl.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        gen = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(32, 2, generator=gen), torch.randint(0, 2, (32,), generator=gen))

    def train_dataloader(self) -> DataLoader:
        return resumable_train_loader(self.data, self.batch_size, seed=0, trainer=self.trainer)


class _Crash(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == 3:
            raise RuntimeError("simulated crash")


def _trainer(root: Path, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(root), callbacks=callbacks, enable_checkpointing=bool(callbacks),
    )  # fmt: skip


def test_trainer_resume_with_another_batch_size_names_both(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path, [ckpt, _Crash()]).fit(_Tiny(), datamodule=_Data(batch_size=8))
    with pytest.raises(ValueError, match=r"`batch_size=8`.*this run has `batch_size=4`.*Resume with `batch_size=8`"):
        _trainer(tmp_path, []).fit(_Tiny(), datamodule=_Data(batch_size=4), ckpt_path=str(tmp_path / "ckpt/last.ckpt"))
    trainer = _trainer(tmp_path, [])
    trainer.fit(_Tiny(), datamodule=_Data(batch_size=8), ckpt_path=str(tmp_path / "ckpt/last.ckpt"))
    assert trainer.global_step == 8  # the same batch size resumes
