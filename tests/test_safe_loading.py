"""Every path that reads a file a user supplies or resumes from refuses a pickle payload.

A checkpoint can carry any pickled object; ``torch.load(..., weights_only=False)`` runs the code its
``__reduce__`` names. Each test below writes a file that holds such an object (it would write a marker file
when unpickled), hands it to one way privtune reads files (the CLI's ``--ckpt_path``, ``trainer.fit(ckpt_path=)``
for each kind of module and strategy, ``load_from_checkpoint``, the emulator and adapter artifacts, shaking
keys) and checks that the load is refused and the marker never written. ``test_payload_is_live`` proves the
payload does run under an unsafe load, so none of these tests can pass by accident.

Threat model: the person who hands over a checkpoint or an artifact (another party of an offsite-tuning or
federated run, a download) may be hostile; loading it must not run their code.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from privtune.datamodules import TextFile
from privtune.modules import TextClassifier

UNSAFE = (pickle.UnpicklingError, RuntimeError)  # torch raises UnpicklingError("Weights only load failed ...")
KEY_REFUSED = r"not a shaking key file|can't decode"  # a key is JSON; a binary file fails to decode or parse


class Payload:
    """Unpickling this object writes ``marker``: a stand-in for any code a hostile file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a Lightning checkpoint, with a payload among its entries."""
    torch.save(
        {
            "epoch": 0,
            "global_step": 1,
            "pytorch-lightning_version": pl.__version__,
            "state_dict": {"model.weight": torch.zeros(2, 2)},
            "loops": {},
            "callbacks": {},
            "optimizer_states": [],
            "lr_schedulers": [],
            "hyper_parameters": {},
            "payload": Payload(marker),
        },
        path,
    )
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "payload_ran.txt"


@pytest.fixture
def hostile(tmp_path: Path, marker: Path) -> Path:
    return hostile_checkpoint(tmp_path / "hostile.ckpt", marker)


@pytest.fixture
def synthetic_csv(tmp_path: Path) -> Path:
    rng = random.Random(0)
    words = {"good": ["great", "fine", "love"], "bad": ["awful", "hate", "sad"]}
    lines = ["text,label"]
    for i in range(40):
        label = "good" if i % 2 else "bad"
        lines.append(" ".join(rng.choice(words[label]) for _ in range(6)) + f",{label}")
    path = tmp_path / "synthetic.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _data(path: Path) -> TextFile:
    return TextFile(
        str(path),
        label_words=[" negative", " positive"],
        train_size=16,
        val_size=4,
        test_size=4,
        max_length=24,
        batch_size=4,
    )


def test_payload_is_live(hostile: Path, marker: Path) -> None:
    """The control: an unsafe load of the hostile file does run the payload."""
    torch.load(hostile, weights_only=False)
    assert marker.read_text() == "payload ran"


# ---------------------------------------------------------------------- the command line


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_cli_refuses_a_hostile_ckpt_path(
    subcommand, force_unsafe_env, hostile, marker, synthetic_csv, tmp_path, monkeypatch
) -> None:
    from train import main

    if force_unsafe_env:  # torch's switch to make unset `weights_only` mean False: the CLI sets it explicitly
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    config = Path(__file__).resolve().parents[1] / "configs" / "baseline" / "tiny_debug.yaml"
    args = [
        subcommand,
        "--config",
        str(config),
        "--data=privtune.datamodules.TextFile",
        f"--data.init_args.path={synthetic_csv}",
        "--data.init_args.label_words=[' negative', ' positive']",
        "--data.init_args.train_size=16",
        "--data.init_args.val_size=4",
        "--data.init_args.test_size=4",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        f"--ckpt_path={hostile}",
    ]
    with pytest.raises(UNSAFE, match="Weights only load failed"):
        main(args)
    assert not marker.exists()


# ---------------------------------------------------------------------- the Python API, each module and strategy


def _no_step_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:  # noqa: ANN003
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_steps=2,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


def test_fit_ckpt_path_refused_for_the_plain_classifier(hostile, marker, synthetic_csv, tmp_path) -> None:
    trainer = _no_step_trainer(tmp_path)
    with pytest.raises(UNSAFE, match="Weights only load failed"):
        trainer.fit(TextClassifier("tiny-llama", tuning="full"), datamodule=_data(synthetic_csv), ckpt_path=hostile)
    assert not marker.exists() and trainer.global_step == 0


def test_explicit_weights_only_holds_even_when_torch_is_told_to_load_unsafely(
    hostile, marker, synthetic_csv, tmp_path, monkeypatch
) -> None:
    """With Lightning's default strategy the Python API passes `weights_only=None` to torch; a user who sets
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` must pass ``weights_only=True`` to ``fit`` (docs/reliability/data.md)."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    trainer = _no_step_trainer(tmp_path)
    module = TextClassifier("tiny-llama", tuning="full")
    with pytest.raises(UNSAFE, match="Weights only load failed"):
        trainer.fit(module, datamodule=_data(synthetic_csv), ckpt_path=hostile, weights_only=True)
    assert not marker.exists()


def test_load_from_checkpoint_refused(hostile, marker) -> None:
    with pytest.raises(UNSAFE, match="Weights only load failed"):
        TextClassifier.load_from_checkpoint(hostile)
    assert not marker.exists()


class _FixedLM(pl.LightningDataModule):
    def _loader(self) -> DataLoader:
        ids = torch.randint(3, 500, (4, 12), generator=torch.Generator().manual_seed(5))
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
        return DataLoader(rows, batch_size=2)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


def test_fit_ckpt_path_refused_for_offsite_stage_one(hostile, marker, tmp_path) -> None:
    from privtune.callbacks import LayerReplace
    from privtune.modules.offsite_importance import HarmonizerImportance

    replace = LayerReplace(adapter_bottom=1, adapter_top=1, harmonizer_rank=8, group_size=2, num_candidates=2, seed=0)
    trainer = _no_step_trainer(tmp_path, callbacks=[replace], limit_val_batches=0)
    with pytest.raises(UNSAFE, match="Weights only load failed"):
        trainer.fit(HarmonizerImportance("tiny-llama", lr=1e-2), datamodule=_FixedLM(), ckpt_path=hostile)
    assert not marker.exists() and trainer.global_step == 0


@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_fit_ckpt_path_refused_for_the_federated_strategy(
    force_unsafe_env, hostile, marker, tmp_path, monkeypatch
) -> None:
    """FederatedSimulation reads its checkpoints itself; it must pass `weights_only=True` whatever the caller asks."""
    from privtune.modules.prompt_tuning import PromptTuning
    from privtune.strategies import FederatedConfig, FederatedSimulation
    from tests.ddp_scripts.fed_common import make_data, make_trainer, write_csv

    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    strategy = FederatedSimulation(federated=FederatedConfig(num_rounds=2, sample_fraction=0.5, local_max_steps=1))
    trainer = make_trainer(strategy, tmp_path)
    data = make_data(write_csv(tmp_path / "fed.csv"), num_clients=4)
    with pytest.raises(UNSAFE, match="Weights only load failed"):
        trainer.fit(PromptTuning(model="tiny-llama", num_virtual_tokens=2, seed=0), datamodule=data, ckpt_path=hostile)
    assert not marker.exists()


# ---------------------------------------------------------------------- privtune's own loaders


def _adapter_folder(tmp_path: Path, marker: Path) -> Path:
    from privtune.emulator import save_adapter_artifact
    from privtune.emulator.plan import uniform_drop_plan

    plan = uniform_drop_plan(num_layers=4, adapter_bottom=1, adapter_top=1, emulator_layers=1)
    folder = save_adapter_artifact(tmp_path / "adapters", {"0.mlp.up_proj.weight": torch.zeros(2, 2)}, plan)
    torch.save({"0.mlp.up_proj.weight": torch.zeros(2, 2), "payload": Payload(marker)}, folder / "adapters.pt")
    return folder


def test_adapter_artifact_loader_refuses_a_payload(tmp_path, marker) -> None:
    from privtune.emulator import load_adapter_artifact

    folder = _adapter_folder(tmp_path, marker)
    with pytest.raises(UNSAFE, match="Weights only load failed"):
        load_adapter_artifact(folder)
    assert not marker.exists()


def test_plug_adapters_refuses_a_payload(tmp_path, marker, synthetic_csv) -> None:
    from privtune.callbacks import PlugAdapters

    folder = _adapter_folder(tmp_path, marker)
    trainer = _no_step_trainer(tmp_path, callbacks=[PlugAdapters(str(folder))])
    with pytest.raises(UNSAFE, match="Weights only load failed"):
        trainer.test(TextClassifier("tiny-llama", tuning="none"), datamodule=_data(synthetic_csv), verbose=False)
    assert not marker.exists()


def _emulator_folder(tmp_path: Path, marker: Path) -> Path:
    """An emulator artifact folder whose state file carries a payload (plan, config and meta are genuine)."""
    from privtune.emulator.plan import uniform_drop_plan
    from privtune.models import load_model

    plan = uniform_drop_plan(num_layers=4, adapter_bottom=1, adapter_top=1, emulator_layers=1)
    folder = tmp_path / "emulator"
    folder.mkdir()
    model = load_model("tiny-llama")
    model.config.num_hidden_layers = plan.depth
    model.config.save_pretrained(folder)
    (folder / "emulator_plan.json").write_text(json.dumps(plan.to_dict()))
    (folder / "meta.json").write_text(json.dumps({"architecture": type(model).__name__, "kind": "emulator"}))
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": Payload(marker)}, folder / "emulator.pt")
    return folder


def test_emulator_artifact_loader_refuses_a_payload(tmp_path, marker) -> None:
    from privtune.emulator import load_emulator_artifact

    folder = _emulator_folder(tmp_path, marker)
    with pytest.raises(UNSAFE, match="Weights only load failed"):
        load_emulator_artifact(folder)
    assert not marker.exists()


def test_data_owner_module_refuses_a_hostile_emulator(tmp_path, marker) -> None:
    from privtune.modules.offsite_finetune import OffsiteFinetune

    folder = _emulator_folder(tmp_path, marker)
    with pytest.raises(UNSAFE, match="Weights only load failed"):
        OffsiteFinetune("tiny-llama", str(folder), tuning="full")
    assert not marker.exists()


def test_shaking_key_loader_refuses_a_pickle(tmp_path, marker) -> None:
    """Keys are JSON; a pickle (or any non-JSON file) given as a key is refused, never unpickled."""
    from privtune.shaking import ShakeKey

    path = tmp_path / "client.key"
    with path.open("wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(ValueError, match=KEY_REFUSED):  # never unpickled
        ShakeKey.load(path)
    assert not marker.exists()


def test_embedding_shaking_refuses_a_pickle_as_its_key(tmp_path, marker, synthetic_csv) -> None:
    from privtune.callbacks import EmbeddingShaking

    path = tmp_path / "client.key"
    with path.open("wb") as f:
        pickle.dump(Payload(marker), f)
    trainer = _no_step_trainer(tmp_path, callbacks=[EmbeddingShaking(str(path))])
    with pytest.raises(ValueError, match=KEY_REFUSED):
        trainer.fit(TextClassifier("tiny-llama", tuning="full"), datamodule=_data(synthetic_csv))
    assert not marker.exists() and trainer.global_step == 0
