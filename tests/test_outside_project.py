"""Every public callback in someone else's Lightning project: it works, with its effect measured, or it refuses
before the first training batch.

The project here is written as an outside user would write it: a random-init Hugging Face Llama built from a
``transformers`` config (not one of privtune's models), its own ``LightningModule`` that knows nothing of
privtune, plain ``DataLoader``s and no datamodule, with batches either as dicts or as tuples
``(input_ids, attention_mask, labels)``. Each public callback of :mod:`privtune.callbacks` is attached in turn.
A callback that cannot protect this project must say so at setup (``setup``/``on_fit_start``/``on_train_start``)
with an error, not a raw ``AttributeError``/``KeyError``/``IndexError``, and before any batch trains; one that
runs must show its effect in numbers. A callback added to ``privtune.callbacks`` without a case here fails
:func:`test_every_public_callback_has_a_case`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import privtune.callbacks as callbacks

LR = 0.1
N, LENGTH, BATCH = 16, 12, 4
CONFIG = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


# ---------------------------------------------------------------------- the outside project


class OutsideLM(pl.LightningModule):
    """A user's module: a Llama from a config, plain SGD, dict or tuple batches; no privtune import."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = LlamaForCausalLM(LlamaConfig(**CONFIG))
        self.seen_ids: list[torch.Tensor] = []

    @staticmethod
    def unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            return batch["input_ids"], batch["attention_mask"], batch["labels"]
        ids, mask, labels = batch
        return ids, mask, labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, mask, labels = self.unpack(batch)
        self.seen_ids.append(ids.detach().clone())
        return self.model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


class _DictRows(Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def token_ids(seed: int = 7) -> torch.Tensor:
    return torch.randint(3, CONFIG["vocab_size"], (N, LENGTH), generator=torch.Generator().manual_seed(seed))


def loader(kind: str, seed: int = 7) -> DataLoader:
    ids = token_ids(seed)
    if kind == "dict":
        return DataLoader(_DictRows(ids), batch_size=BATCH)
    return DataLoader(TensorDataset(ids, torch.ones_like(ids), ids.clone()), batch_size=BATCH)


class Probe(pl.Callback):
    """First in the list: counts the batches the loop starts and keeps the weights as training begins."""

    def __init__(self) -> None:
        self.batches = 0
        self.at_train_start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_train_start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


@dataclasses.dataclass
class Run:
    module: OutsideLM
    probe: Probe
    callback: pl.Callback | None
    before: dict[str, torch.Tensor]
    error: BaseException | None = None


def fit(kind: str, callback: pl.Callback | None, steps: int = 2, tmp_path: Path | None = None) -> Run:
    """Fit the outside module for ``steps`` SGD steps with ``callback``; an error must come before any batch."""
    module = OutsideLM()
    probe = Probe()
    run = Run(module, probe, callback, {k: v.detach().clone() for k, v in module.state_dict().items()})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=str(tmp_path) if tmp_path else None,
        callbacks=[probe, *([callback] if callback is not None else [])],
    )
    try:
        trainer.fit(module, train_dataloaders=loader(kind))
    except Exception as err:  # noqa: BLE001 - any refusal is inspected below
        run.error = err
    return run


RAW = (AttributeError, KeyError, IndexError)


def outcome(run: Run) -> str:
    """``refused`` (checked: before any batch, a real error) or ``works`` (the caller then checks the effect)."""
    if run.error is None:
        return "works"
    name = type(run.callback).__name__
    assert run.probe.batches == 0, f"{name} raised after {run.probe.batches} training batches: {run.error!r}"
    assert not isinstance(run.error, RAW), f"{name} refused with a raw {type(run.error).__name__}: {run.error}"
    assert len(str(run.error)) > 20, f"{name} refused without saying why: {run.error!r}"
    print(f"{name} refused: {type(run.error).__name__}: {run.error}")
    return "refused"


def flat(state: dict[str, torch.Tensor], prefix: str = "model.") -> torch.Tensor:
    return torch.cat([v.flatten().float() for k, v in state.items() if k.startswith(prefix)])


# ---------------------------------------------------------------------- one case per callback


def case_rank_compression(kind: str, tmp_path: Path) -> str:
    cb = callbacks.RankCompression(modules=["model.layers.*.mlp.up_proj"], rank=3)
    run = fit(kind, cb, tmp_path=tmp_path)
    if outcome(run) == "refused":
        return "refused"
    for i, block in enumerate(run.module.model.model.layers):
        linear = block.mlp.up_proj
        dense = linear(torch.eye(CONFIG["hidden_size"])).detach()  # the map as a matrix, factored or not
        assert torch.linalg.matrix_rank(dense) <= 3, f"layer {i}"
        assert torch.linalg.matrix_rank(run.before[f"model.model.layers.{i}.mlp.up_proj.weight"]) == 32
    return "works"


def case_fedprox(kind: str, tmp_path: Path) -> str:
    mu = 0.5
    run = fit(kind, callbacks.FedProx(mu=mu, param_prefix="model."), steps=2, tmp_path=tmp_path)
    if outcome(run) == "refused":
        return "refused"
    one = fit(kind, None, steps=1)  # w1 (the proximal term is zero at the anchor: step 1 is plain SGD)
    two = fit(kind, None, steps=2)  # w2 without the term
    w0, w1 = flat(run.before), flat(one.module.state_dict())
    w2_plain, w2_prox = flat(two.module.state_dict()), flat(run.module.state_dict())
    # step 2 adds mu (w1 - w0) to the gradient: w2_prox - w2_plain = -lr mu (w1 - w0)
    torch.testing.assert_close(w2_prox - w2_plain, -LR * mu * (w1 - w0), rtol=1e-3, atol=1e-6)
    assert (w1 - w0).abs().max() > 1e-3
    return "works"


def case_scaffold(kind: str, tmp_path: Path) -> str:
    cb = callbacks.ScaffoldCorrection(eta_l=LR, param_prefix="model.")
    names = [n for n, p in OutsideLM().named_parameters() if n.startswith("model.")]
    c = {n: torch.full_like(p, 0.01) for n, p in OutsideLM().named_parameters() if n in names}
    c_i = {n: torch.zeros_like(v) for n, v in c.items()}
    cb.set_control_variates(c, c_i)
    run = fit(kind, cb, steps=1, tmp_path=tmp_path)
    if outcome(run) == "refused":
        return "refused"
    plain = fit(kind, None, steps=1)
    # the gradient gains c - c_i = 0.01 everywhere: one SGD step moves every weight by -lr * 0.01 more
    diff = flat(run.module.state_dict()) - flat(plain.module.state_dict())
    torch.testing.assert_close(diff, torch.full_like(diff, -LR * 0.01), rtol=1e-3, atol=1e-6)
    return "works"


def case_embedding_shaking(kind: str, tmp_path: Path) -> str:
    from privtune.shaking import ShakeKey

    extra: dict[str, Any] = {"batch_key": 0, "labels_key": 2} if kind == "tuple" else {}
    key_path = tmp_path / "client.key"
    cb = callbacks.EmbeddingShaking(str(key_path), operators=["gaussian"], recovery="none", **extra)
    run = fit(kind, cb, tmp_path=tmp_path)
    if outcome(run) == "refused":
        return "refused"
    key = ShakeKey.load(key_path)
    plain = token_ids()[:BATCH]
    # the model was fed the shaken ids of the plain batch, pi(ids), not the plain ones
    assert torch.equal(run.module.seen_ids[0], key.encode_ids(plain))
    assert (run.module.seen_ids[0] != plain).float().mean() > 0.5
    # and its embedding was shaken at setup: row pi(i) holds row i with the key's noise (not the plain row i)
    table = run.probe.at_train_start["model.model.embed_tokens.weight"]
    original = run.before["model.model.embed_tokens.weight"]
    ids = plain.flatten().unique()
    moved = key.encode_ids(ids)
    assert not torch.allclose(table[ids], original[ids])
    cos = torch.nn.functional.cosine_similarity(table[moved], original[ids])
    assert cos.mean() > 0.5
    return "works"


def case_opacus_dp(kind: str, tmp_path: Path) -> str:
    clip = 1e-4
    cb = callbacks.OpacusDP(noise_multiplier=1e-3, max_grad_norm=clip)
    run = fit(kind, cb, steps=1, tmp_path=tmp_path)
    if outcome(run) == "refused":
        return "refused"
    plain = fit(kind, None, steps=1)
    moved = (flat(run.module.state_dict()) - flat(run.before)).norm()
    moved_plain = (flat(plain.module.state_dict()) - flat(plain.before)).norm()
    # per-sample gradients clipped to C: the averaged update is at most lr * C (x the Poisson batch-size ratio)
    assert moved <= 3 * LR * clip
    assert moved_plain > 100 * LR * clip
    return "works"


def case_layer_replace(kind: str, tmp_path: Path) -> str:
    cb = callbacks.LayerReplace(adapter_bottom=1, adapter_top=1, harmonizer_rank=4, group_size=2, num_candidates=2)
    run = fit(kind, cb, tmp_path=tmp_path)
    if outcome(run) == "refused":
        return "refused"
    assert not torch.equal(cb.importance.scores, torch.zeros_like(cb.importance.scores))
    return "works"


def case_emulator_export(kind: str, tmp_path: Path) -> str:
    out = tmp_path / "emulator"
    cb = callbacks.EmulatorExport(str(out), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.5)
    run = fit(kind, cb, tmp_path=tmp_path)
    if outcome(run) == "refused":
        assert not out.exists()
        return "refused"
    from privtune.emulator import find_original_tensors, load_emulator_artifact

    emulator, plan = load_emulator_artifact(out)
    assert plan.depth < CONFIG["num_hidden_layers"]
    assert find_original_tensors(emulator.state_dict(), run.module.model, plan) == []
    return "works"


def case_adapter_export(kind: str, tmp_path: Path) -> str:
    out = tmp_path / "adapters"
    run = fit(kind, callbacks.AdapterExport(str(out)), tmp_path=tmp_path)
    if outcome(run) == "refused":
        assert not out.exists()
        return "refused"
    from privtune.emulator import load_adapter_artifact

    adapters, _ = load_adapter_artifact(out)
    assert adapters
    return "works"


def case_plug_adapters(kind: str, tmp_path: Path) -> str:
    from privtune.emulator import save_adapter_artifact
    from privtune.emulator.build import model_fingerprint
    from privtune.emulator.plan import uniform_drop_plan

    plan = uniform_drop_plan(num_layers=4, adapter_bottom=1, adapter_top=1, emulator_layers=1)
    plan = dataclasses.replace(plan, base_fingerprint=model_fingerprint(OutsideLM().model))
    tuned = OutsideLM(seed=1).model.model.layers  # the data owner's tuned adapter blocks 0 and 3
    adapters = {f"{i}.{k}": v for i in (0, 3) for k, v in tuned[i].state_dict().items()}
    folder = save_adapter_artifact(tmp_path / "adapters", adapters, plan)
    run = fit(kind, callbacks.PlugAdapters(str(folder)), tmp_path=tmp_path)
    if outcome(run) == "refused":
        return "refused"
    start = run.probe.at_train_start
    for key, value in adapters.items():
        index, param = key.split(".", 1)
        torch.testing.assert_close(start[f"model.model.layers.{index}.{param}"], value)
    for key, value in run.before.items():  # the middle blocks are the owner's, untouched
        if ".layers.1." in key or ".layers.2." in key:
            assert torch.equal(start[key], value), key
    return "works"


def case_tuning_report(kind: str, tmp_path: Path) -> str:
    run = fit(kind, callbacks.TuningReport(output_dir=str(tmp_path / "report")), tmp_path=tmp_path)
    if outcome(run) == "refused":
        return "refused"
    assert (tmp_path / "report" / "tuning_report.json").is_file()
    return "works"


def case_offsite_pipeline(kind: str, tmp_path: Path) -> str:
    cls = callbacks.OffsitePipeline
    try:
        cb = cls(output_dir=str(tmp_path / "pipeline"))
    except TypeError:
        cb = cls()
    run = fit(kind, cb, tmp_path=tmp_path)
    if outcome(run) == "refused":
        return "refused"
    return "works"


def _numbers_under(tree: Any, word: str, inside: bool = False) -> list[float]:
    """Every number in a nested report whose key path contains ``word``."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in _numbers_under(v, word, inside or word in str(k).lower())]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers_under(v, word, inside)]
    return [float(tree)] if inside and isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def case_membership_audit(kind: str, tmp_path: Path) -> str:
    out = tmp_path / "audit"
    cb = callbacks.MembershipAudit(
        max_examples=8, member_dataloader=loader(kind), nonmember_dataloader=loader(kind, seed=8), output_dir=str(out)
    )
    run = fit(kind, cb, tmp_path=tmp_path)
    if outcome(run) == "refused":
        return "refused"
    report = json.loads((out / "membership_report.json").read_text())
    aucs = _numbers_under(report, "auc")
    assert aucs and all(0.0 <= a <= 1.0 for a in aucs), aucs
    return "works"


CASES: dict[str, Callable[[str, Path], str]] = {
    "AdapterExport": case_adapter_export,
    "EmbeddingShaking": case_embedding_shaking,
    "EmulatorExport": case_emulator_export,
    "FedProx": case_fedprox,
    "LayerReplace": case_layer_replace,
    "MembershipAudit": case_membership_audit,
    "OffsitePipeline": case_offsite_pipeline,
    "OpacusDP": case_opacus_dp,
    "PlugAdapters": case_plug_adapters,
    "RankCompression": case_rank_compression,
    "ScaffoldCorrection": case_scaffold,
    "TuningReport": case_tuning_report,
}

PUBLIC = sorted(n for n in callbacks.__all__ if isinstance(getattr(callbacks, n), type))


def test_every_public_callback_has_a_case() -> None:
    assert sorted(set(PUBLIC) - set(CASES)) == [], "add a case for each new public callback"


@pytest.mark.parametrize("kind", ["dict", "tuple"])
@pytest.mark.parametrize("name", [n for n in sorted(CASES) if n in PUBLIC])
def test_callback_works_with_its_effect_or_refuses_before_training(name, kind, tmp_path, record_property) -> None:
    result = CASES[name](kind, tmp_path)
    record_property("outcome", result)
    print(f"OUTCOME {name} {kind}: {result}")
