"""MembershipAudit with EmbeddingShaking in one run (the reference in plain space); the frontier's shaking rows.

Threat model (callbacks/membership_audit.py): the attacker queries the model the data owner ends with (the tuned
model after horizontal recovery, read with the plain tokenizer) with candidate examples in plain text, so the
calibrated attack's reference is the untuned model in that same plain space, not the shaken model.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml

from privtune.attacks.membership import example_statistics
from privtune.callbacks import MembershipAudit
from privtune.callbacks.embedding_shaking import EmbeddingShaking
from privtune.contracts import ContractError
from privtune.datamodules import TextFile
from privtune.eval.frontier import ROWS, check_rows
from privtune.modules import TextClassifier
from privtune.shaking import recover_model, shake_model, shaking_state

REPO = Path(__file__).resolve().parents[1]
WORDS = ["good", "great", "happy", "love", "fine", "bad", "awful", "sad", "hate", "okay"]
SHAKING_ROWS = ("shaking_search_key", "shaking_hv")


@pytest.fixture
def csv_file(tmp_path: Path) -> str:
    rows = ["text,label"]
    for i, (a, b) in enumerate(itertools.product(WORDS, WORDS)):
        rows.append(f"the {a} and {b} show,{'positive' if i % 2 else 'negative'}")
    path = tmp_path / "synthetic.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _data(csv_file: str) -> TextFile:
    return TextFile(
        csv_file,
        template="Tweet: {text}\nSentiment:",
        label_words=[" negative", " positive"],
        train_size=16,
        val_size=8,
        test_size=16,
        max_length=24,
        batch_size=8,
        seed=0,
    )


def _module() -> TextClassifier:
    pl.seed_everything(0)
    return TextClassifier(model="tiny-llama", tuning="lora", lr=1e-2)


def _losses(model: torch.nn.Module, loader, label_ids: torch.Tensor) -> torch.Tensor:
    stats = example_statistics(model, loader, task="label_word", label_token_ids=label_ids, token_stats=False)
    return torch.tensor(stats.loss, dtype=torch.float64)


@pytest.mark.parametrize("vertical", [False, True])
def test_reference_is_the_untuned_model_in_plain_space(tiny_trainer, csv_file, tmp_path, vertical):
    module = _module()
    untouched = copy.deepcopy(module.model)
    key = {"operators": ["gaussian"], "chain_length": 1} if vertical else {"chain_length": 0}
    shaking = EmbeddingShaking(str(tmp_path / "k.json"), recovery="horizontal", **key)
    audit = MembershipAudit(max_examples=16, output_dir=str(tmp_path / "audit"))
    dm = _data(csv_file)
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[shaking, audit])
    trainer.fit(module, datamodule=dm)
    assert shaking_state(module.model) == "recovered-horizontal" and trainer.global_step == 2
    assert audit.report["attacks"].keys() == {"loss", "reference", "min_k", "zlib"}
    assert "EmbeddingShaking" in audit.report["meta"]["reference"]
    plain_ids = dm.label_token_ids
    kept = {role: torch.tensor(s.loss, dtype=torch.float64) for role, s in audit.reference_statistics.items()}
    # what the reference must be: the untuned model seen through the run's horizontal recovery
    expected = copy.deepcopy(untouched)
    shake_model(expected, shaking.key)
    recover_model(expected, shaking.key, "horizontal")
    for role, loader in zip(("member", "nonmember"), audit._loaders):
        assert torch.allclose(kept[role], _losses(expected, loader, plain_ids), atol=1e-6), role
    plain = _losses(untouched, audit._loaders[0], plain_ids)
    if not vertical:  # a permutation-only key: that model is the untouched base model itself
        assert torch.allclose(kept["member"], plain, atol=1e-6)
    else:  # the vertical step stays after horizontal recovery: not the base model
        assert not torch.allclose(kept["member"], plain, atol=1e-4)
    # the wrong reference (the shaken model read with plain ids) would differ
    shaken = copy.deepcopy(untouched)
    shake_model(shaken, shaking.key)
    assert not torch.allclose(kept["member"], _losses(shaken, audit._loaders[0], plain_ids), atol=1e-4)


def test_recovered_view_is_exact_and_undone(tmp_path):
    module = _module()
    module.label_token_ids = torch.tensor([5, 7])
    cb = EmbeddingShaking(str(tmp_path / "k.json"), operators=["gaussian"], chain_length=1, recovery="horizontal")
    cb.setup(SimpleNamespace(datamodule=None), module, "fit")
    cb.on_fit_start(None, module)
    shaken_ids = module.label_token_ids.clone()
    assert not torch.equal(shaken_ids, torch.tensor([5, 7]))
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    ids = torch.tensor([[1, 9, 30, 77, 2]])
    with torch.no_grad():
        shaken_out = module.model(input_ids=cb.key.encode_ids(ids)).logits
        with cb.recovered_view(module):
            assert shaking_state(module.model) == "recovered-horizontal"
            assert torch.equal(module.label_token_ids, torch.tensor([5, 7]))
            plain_out = module.model(input_ids=ids).logits
    assert torch.equal(cb.key.plain_logits(shaken_out), plain_out)
    assert shaking_state(module.model) == "shaken" and torch.equal(module.label_token_ids, shaken_ids)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    cb.recovery = "full"
    with pytest.raises(ValueError, match="horizontal"), cb.recovered_view(module):
        pass


def test_unservable_combinations_are_refused_before_training(tiny_trainer, csv_file, tmp_path):
    module = _module()
    full = EmbeddingShaking(str(tmp_path / "k.json"), chain_length=0, recovery="full")
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[full, MembershipAudit(max_examples=8)])
    with pytest.raises(ContractError, match="recovery='full'"):
        trainer.fit(module, datamodule=_data(csv_file))
    assert trainer.global_step == 0 and shaking_state(module.model) == "plain"  # un-shaken on the way out

    module = _module()
    none = EmbeddingShaking(str(tmp_path / "k2.json"), chain_length=0, recovery="none")
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[none, MembershipAudit(max_examples=8)])
    with pytest.raises(ValueError, match="still shaken"):
        trainer.fit(module, datamodule=_data(csv_file))
    assert trainer.global_step == 0

    module = _module()
    shaken_data = EmbeddingShaking(str(tmp_path / "k3.json"), chain_length=0, shake_batches=False)
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[shaken_data, MembershipAudit(max_examples=8)])
    with pytest.raises(ContractError, match="already shaken"):
        trainer.fit(module, datamodule=_data(csv_file))
    assert trainer.global_step == 0


# ---------------------------------------------------------------------------------------------- frontier rows


def _script():
    spec = importlib.util.spec_from_file_location("privacy_frontier", REPO / "benchmarks" / "privacy_frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _callback(cfg: dict, name: str) -> dict:
    return next(cb["init_args"] for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith(f".{name}"))


@pytest.mark.parametrize("name", SHAKING_ROWS)
def test_shaking_configs_parse_and_carry_the_regime(name):
    from privtune.datamodules import BBCNews

    central = yaml.safe_load((REPO / ROWS["lora"].config).read_text())
    cfg = yaml.safe_load((REPO / ROWS[name].config).read_text())
    assert check_rows([name]) == [ROWS[name]] and not ROWS[name].needs
    assert cfg["data"] == central["data"] and cfg["trainer"]["max_epochs"] == central["trainer"]["max_epochs"] == 3
    assert cfg["data"]["init_args"] | {"seed": 0} == {
        "train_size": 128,
        "val_size": 16,
        "test_size": 128,
        "max_length": 64,
        "batch_size": 8,
        "eval_batch_size": 16,
        "seed": 0,
    }
    callbacks = cfg["trainer"]["callbacks"]
    assert callbacks[-1] == central["trainer"]["callbacks"][-1]  # MembershipAudit last, the lora row's audit
    assert [cb["class_path"].rsplit(".", 1)[-1] for cb in callbacks] == ["EmbeddingShaking", "MembershipAudit"]
    shaking = _callback(cfg, "EmbeddingShaking")
    assert shaking["recovery"] == "horizontal"
    model = cfg["model"]["init_args"]
    assert {k: v for k, v in model.items() if k != "model"} == {
        k: v for k, v in central["model"]["init_args"].items() if k != "model"
    }  # LoRA as the lora row
    EmbeddingShaking(**shaking)  # the options validate
    MembershipAudit(**_callback(cfg, "MembershipAudit"))
    BBCNews(**cfg["data"]["init_args"], tokenizer="tiny-llama")
    # the implantation is smollm2_implant.yaml with this row's key and model folder
    implant, model_dir = _script().implant_config(REPO / ROWS[name].config)
    assert str(model_dir) == model["model"] == implant["model"]["init_args"]["save_dir"]
    implanted = _callback(implant, "EmbeddingShaking")
    assert all(implanted.get(k) == v for k, v in shaking.items() if k != "recovery")
    reference = yaml.safe_load((REPO / "configs/shaking/smollm2_implant.yaml").read_text())
    assert implant["model"] == reference["model"] | {
        "init_args": reference["model"]["init_args"] | {"save_dir": str(model_dir)}
    }
    if name == "shaking_hv":  # the implant config's own key
        assert {k: implanted[k] for k in ("operators", "chain_length", "scales")} == {
            k: _callback(reference, "EmbeddingShaking")[k] for k in ("operators", "chain_length", "scales")
        }
    else:  # the operator-setting search's choice
        chosen = yaml.safe_load((REPO / "benchmarks/results/shaking_smollm2_tweets/chosen_setting.yaml").read_text())
        chosen = _callback(chosen, "EmbeddingShaking")
        assert {k: implanted[k] for k in ("chain", "scales", "pin", "permute")} == {
            k: chosen[k] for k in ("chain", "scales", "pin", "permute")
        }


def test_shaking_row_reuses_an_implanted_model_and_runs_central(tmp_path, monkeypatch):
    script = _script()
    assert script.RUNNERS["shaking"] is script.run_shaking
    cfg = yaml.safe_load((REPO / ROWS["shaking_hv"].config).read_text())
    model_dir = tmp_path / "implanted"
    cfg["model"]["init_args"]["model"] = str(model_dir)
    row_config = tmp_path / "row.yaml"
    row_config.write_text(yaml.safe_dump(cfg))
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (tmp_path / "implanted_implant.json").write_text(json.dumps({"wall_seconds": 12.5, "steps": 40}))
    import train

    def refuse(*args, **kwargs):
        raise AssertionError("an implanted model that exists must be reused")

    monkeypatch.setattr(train, "main", refuse)
    monkeypatch.setattr(sys, "argv", ["privacy_frontier.py"])
    assert script.ensure_implanted(row_config) == {"wall_seconds": 12.5, "steps": 40, "ran_here": False}
    shaking = sys.modules[script.run_shaking.__module__]  # benchmarks/frontier_rows/shaking.py: where it looks them up
    monkeypatch.setattr(shaking, "ensure_implanted", lambda path: {"ran_here": False, "path": str(path)})
    monkeypatch.setattr(shaking, "run_central", lambda *args: {"accuracy": {"acc": 0.5}})
    fields = script.run_shaking(ROWS["shaking_hv"], 0, tmp_path, [], None)
    assert fields == {
        "accuracy": {"acc": 0.5},
        "implant": {"ran_here": False, "path": str(REPO / ROWS["shaking_hv"].config)},
    }
