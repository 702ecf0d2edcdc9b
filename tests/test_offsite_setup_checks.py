"""Offsite-tuning callbacks check their settings and contracts at setup, before any training step.

Each case runs a Trainer whose ``max_steps`` would take long and asserts the error comes before the module's first
``training_step`` (and, for the export, before any artifact is written).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from privtune.callbacks.layer_replace import LayerReplace
from privtune.callbacks.offsite_tuning import AdapterExport, EmulatorExport, PlugAdapters
from privtune.callbacks.rank_compression import RankCompression
from privtune.callbacks.tuning_report import TuningReport
from privtune.contracts import ContractError, missing_members, protocol_members
from privtune.contracts import HarmonizerStage1Module as Stage1Protocol
from privtune.emulator import build_emulator, compress_kept_blocks, extract_adapters, uniform_drop_plan
from privtune.emulator.artifact import save_adapter_artifact
from privtune.emulator.build import compression_problems
from privtune.emulator.low_rank import full_rank_message
from privtune.models import load_model
from privtune.modules.offsite_importance import HarmonizerImportance

LONG = 100_000  # steps a run would take if a check did not stop it first


class CountingStage1(HarmonizerImportance):
    """ScaleOT stage 1 that counts its training steps."""

    def __init__(self) -> None:
        super().__init__("tiny-llama", lr=1e-2)
        self.steps = 0

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.steps += 1
        return super().training_step(batch, batch_idx)


def _rows(n: int = 8, length: int = 12) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(3, 500, (n, length), generator=torch.Generator().manual_seed(5))
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


class LM(pl.LightningDataModule):
    """Random LM batches (dict rows) for train and held-out."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_rows(), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_rows(), batch_size=2)


def _replace(bottom: int = 1, top: int = 1) -> LayerReplace:
    return LayerReplace(bottom, top, harmonizer_rank=8, group_size=2, num_candidates=2)


def _fit_refused(tiny_trainer, module, callbacks, error, match, tmp_path=None, **fit) -> None:
    trainer = tiny_trainer(max_steps=LONG, max_epochs=None, limit_train_batches=None, callbacks=callbacks)
    with pytest.raises(error, match=match):
        trainer.fit(module, **(fit or {"datamodule": LM()}))
    assert getattr(module, "steps", 0) == 0, "a check ran after training started"
    if tmp_path is not None:
        assert not (tmp_path / "emu").exists()


# ------------------------------------------------------------------------------------ EmulatorExport settings
def test_adapter_layers_larger_than_the_model_allows(tiny_trainer, tmp_path) -> None:
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=10, beta=0.5, beta_mlp=0.75)
    _fit_refused(tiny_trainer, CountingStage1(), [_replace(), export], ValueError,
                 r"`adapter_layers=10` leaves no middle block to emulate in this 4-block model; allowed: "
                 r"adapter_layers <= 3", tmp_path)  # fmt: skip


@pytest.mark.parametrize("export_first", [False, True])
def test_split_that_disagrees_with_layer_replace(tiny_trainer, tmp_path, export_first: bool) -> None:
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=0, alpha=0.5, beta=0.5, beta_mlp=0.75)
    callbacks = [export, _replace()] if export_first else [_replace(), export]
    _fit_refused(tiny_trainer, CountingStage1(), callbacks, ValueError,
                 r"makes blocks \[0, 1, 2, 3\] the middle .* LayerReplace trains harmonizers and scores for blocks "
                 r"\[1, 2\]; the two splits must agree", tmp_path)  # fmt: skip


class OwnOptimizerStage1(CountingStage1):
    """A stage-1 module whose optimizer does not itself insist on harmonizers."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(2, 2)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.extra.parameters(), lr=1e-3)


def test_export_without_layer_replace_is_refused_at_fit_start(tiny_trainer, tmp_path) -> None:
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, beta=0.5, beta_mlp=0.75)
    _fit_refused(tiny_trainer, OwnOptimizerStage1(), [export], ContractError, r"harmonizers is empty at fit start: "
                 "nothing trains the harmonizers .* add the LayerReplace callback", tmp_path)  # fmt: skip


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"beta": 1.0}, r"`beta=1.0` leaves the kept blocks' self_attn.q_proj, .* uncompressed"),
        ({"beta_mlp": 1.0}, r"`beta_mlp=1.0` leaves the kept blocks' mlp.gate_proj"),
        ({"beta": 0.99}, r"`beta=0.99` keeps full rank 32 of `self_attn.q_proj` 32x32.*allowed: beta < 0.9688"),
        ({"beta_mlp": 0.99}, r"`beta_mlp=0.99` keeps full rank 32 of `mlp.gate_proj` 64x32"),
        ({"beta": 0.99, "beta_mlp": 0.99}, r"`beta=0.99`.*; `beta_mlp=0.99`"),
    ],
    ids=["beta_1", "beta_mlp_1", "beta_0.99", "beta_mlp_0.99", "both_0.99"],
)
def test_compression_that_keeps_full_rank_is_refused_at_setup(tiny_trainer, tmp_path, knobs, match) -> None:
    args = {"adapter_layers": 2, "alpha": 0.5, "beta": 0.5, "beta_mlp": 0.75} | knobs
    export = EmulatorExport(str(tmp_path / "emu"), **args)
    _fit_refused(tiny_trainer, CountingStage1(), [_replace(), export], ValueError, match, tmp_path)


def test_full_rank_is_not_refused_when_every_middle_block_is_replaced(tiny_trainer, tmp_path) -> None:
    # alpha 0.9 of 2 candidates replaces both: no block is kept, so beta does not matter.
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.9, beta=1.0, beta_mlp=1.0)
    module = CountingStage1()
    tiny_trainer(max_steps=1, callbacks=[_replace(), export]).fit(module, datamodule=LM())
    assert module.steps == 1 and (tmp_path / "emu" / "emulator.pt").is_file()


def test_smollm2_rank_bounds_from_shapes() -> None:
    attention = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
    mlp = {"gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    assert full_rank_message("beta", 0.997, attention) is None
    assert "keeps full rank 192 of `k_proj` 192x576" in full_rank_message("beta", 0.9975, attention)
    assert full_rank_message("beta_mlp", 0.999, mlp) is None
    assert "allowed: beta_mlp < 0.9991" in full_rank_message("beta_mlp", 0.9992, mlp)


def test_core_compression_refuses_a_no_op_truncation() -> None:
    model = load_model("tiny-llama")
    plan = uniform_drop_plan(4, 1, 1, 2)
    emulator = build_emulator(model, plan)
    with pytest.raises(ValueError, match=r"compress_kept_blocks: `beta=0.99` keeps full rank 32"):
        compress_kept_blocks(emulator, plan, beta=0.99, beta_mlp=0.75)
    assert plan.modules == {}  # nothing changed
    assert compression_problems(model, 0.5, 0.75) == []


def test_distillation_without_a_datamodule_is_refused(tiny_trainer, tmp_path) -> None:
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, beta=0.5, beta_mlp=0.75, distill_steps=3)
    loader = DataLoader(_rows(), batch_size=2)
    _fit_refused(tiny_trainer, CountingStage1(), [_replace(), export], ContractError,
                 r"`distill_steps=3` distils on `trainer.datamodule.train_dataloader\(\)`, but the fit has no "
                 "datamodule",
                 tmp_path, train_dataloaders=loader)  # fmt: skip


# ------------------------------------------------------------------------------------ contracts
class Plain(pl.LightningModule):
    """An outside project's module: its model under another name, no harmonizers, no evaluate()."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = load_model("tiny-llama")
        self.steps = 0

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.steps += 1
        return self.backbone(**batch).loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_wrong_model_attr_names_model_attr(tiny_trainer, tmp_path) -> None:
    match = r"`model_attr='model'` names no model on Plain \(no such attribute\).*one of \['backbone'\]"
    _fit_refused(tiny_trainer, Plain(), [RankCompression(["model.layers.*.self_attn.q_proj"], beta=0.5)],
                 ContractError, "RankCompression: " + match)  # fmt: skip
    _fit_refused(tiny_trainer, Plain(), [_replace()], ContractError, "LayerReplace: " + match)
    stage1 = CountingStage1()
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, beta=0.5, beta_mlp=0.75, model_attr="net")
    _fit_refused(tiny_trainer, stage1, [_replace(), export], ContractError, "EmulatorExport: `model_attr='net'`")


def test_model_attr_reaches_another_attribute(tiny_trainer) -> None:
    module = Plain()
    callback = RankCompression(["model.layers.*.self_attn.q_proj"], beta=0.5, model_attr="backbone")
    tiny_trainer(max_steps=1, callbacks=[callback]).fit(module, train_dataloaders=DataLoader(_rows(), batch_size=2))
    assert module.steps == 1 and set(callback.compressed.values()) == {16}


def test_plug_adapters_wrong_model_attr(tiny_trainer, tmp_path) -> None:
    model = load_model("tiny-llama")
    plan = uniform_drop_plan(4, 1, 1, 2)
    emulator = build_emulator(model, plan)
    folder = save_adapter_artifact(tmp_path / "ad", extract_adapters(emulator, plan), plan)
    _fit_refused(tiny_trainer, Plain(), [PlugAdapters(str(folder))], ContractError,
                 "PlugAdapters: `model_attr='model'` names no model")  # fmt: skip


@pytest.mark.parametrize(
    ("pattern", "kind"),
    [("model.embed_tokens", "Embedding"), ("model.layers.1", "LlamaDecoderLayer"), ("model.norm", "LlamaRMSNorm")],
    ids=["embedding", "block", "norm"],
)
def test_rank_compression_refuses_non_linear_matches(tiny_trainer, pattern: str, kind: str) -> None:
    module = Plain()
    callback = RankCompression([pattern, "model.layers.*.self_attn.q_proj"], rank=4, model_attr="backbone")
    _fit_refused(tiny_trainer, module, [callback], ValueError, rf"matches `{pattern}` \({kind}\), which is not a "
                 "linear layer", train_dataloaders=DataLoader(_rows(), batch_size=2))  # fmt: skip
    assert isinstance(module.backbone.model.embed_tokens, nn.Embedding) and not callback.compressed


@pytest.mark.parametrize(("kw", "match"), [({"beta": 0.99}, r"`beta=0.99` keeps full rank 32"),
                                           ({"rank": 16}, r"`rank=16` is not below the rank bound 16")],
                         ids=["beta_0.99", "rank_16"])  # fmt: skip
def test_rank_compression_refuses_full_rank(tiny_trainer, kw, match) -> None:
    callback = RankCompression(["model.layers.*.self_attn.[qk]_proj"], model_attr="backbone", **kw)
    _fit_refused(tiny_trainer, Plain(), [callback], ValueError, match,
                 train_dataloaders=DataLoader(_rows(), batch_size=2))  # fmt: skip


def test_export_refuses_a_module_it_cannot_read(tiny_trainer, tmp_path) -> None:
    export = EmulatorExport(str(tmp_path / "emu"), model_attr="backbone")
    _fit_refused(tiny_trainer, Plain(), [export], ContractError,
                 r"Plain is neither a ScaleOT stage-1 module \(missing \['model_name', 'harmonizers', "
                 r"'layer_importance'\]", train_dataloaders=DataLoader(_rows(), batch_size=2))  # fmt: skip
    assert missing_members(CountingStage1(), Stage1Protocol) == []
    assert protocol_members(Stage1Protocol) == ["model_name", "harmonizers", "layer_importance"]


def test_layer_replace_refuses_a_batch_it_cannot_score(tiny_trainer) -> None:
    tuples = DataLoader([(r["input_ids"], r["labels"]) for r in _rows()], batch_size=2)
    _fit_refused(tiny_trainer, CountingStage1(), [_replace()], ContractError,
                 r"a training batch \(list\) lacks \['input_ids', 'attention_mask', 'labels'\]",
                 train_dataloaders=tuples)  # fmt: skip
    no_labels = DataLoader([{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in _rows()])
    _fit_refused(tiny_trainer, CountingStage1(), [_replace()], ContractError, r"lacks \['labels'\]",
                 train_dataloaders=no_labels)  # fmt: skip


def test_layer_replace_warm_start_needs_a_datamodule(tiny_trainer) -> None:
    callback = LayerReplace(1, 1, harmonizer_rank=8, group_size=2, num_candidates=2, warm_start_batches=2)
    _fit_refused(tiny_trainer, CountingStage1(), [callback], ContractError, "`warm_start_batches=2` reads training",
                 train_dataloaders=DataLoader(_rows(), batch_size=2))  # fmt: skip


def test_adapter_export_refuses_a_module_without_adapters(tiny_trainer, tmp_path) -> None:
    _fit_refused(tiny_trainer, Plain(), [AdapterExport(str(tmp_path / "ad"))], ContractError,
                 r"AdapterExport: Plain has no \['plan', 'adapter_state'\]",
                 train_dataloaders=DataLoader(_rows(), batch_size=2))  # fmt: skip


# ------------------------------------------------------------------------------------ TuningReport
class Evaluating(Plain):
    def __init__(self, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.keys = keys

    def evaluate(self, dataloader, desc: str = ""):  # type: ignore[no-untyped-def]
        return dict.fromkeys(self.keys, 1.0)


class WithTest(LM):
    def test_dataloader(self) -> DataLoader:
        return DataLoader(_rows(), batch_size=2)


def test_tuning_report_checks_evaluate_loader_and_keys_before_training(tiny_trainer) -> None:
    _fit_refused(tiny_trainer, Plain(), [TuningReport()], ContractError, r"Plain has no `evaluate\(dataloader, desc\)`",
                 datamodule=WithTest())  # fmt: skip
    _fit_refused(tiny_trainer, Evaluating(("acc", "f1", "n")), [TuningReport()], ContractError,
                 r"`split='test'` .* but its datamodule has none", datamodule=LM())  # fmt: skip
    _fit_refused(tiny_trainer, Evaluating(("acc", "f1", "n")), [TuningReport(split="val")], ContractError,
                 "the fit has no datamodule", train_dataloaders=DataLoader(_rows(), batch_size=2))  # fmt: skip
    _fit_refused(tiny_trainer, Evaluating(("accuracy",)), [TuningReport()], ContractError,
                 r"evaluate\(\) returned dict without \['acc', 'f1', 'n'\]", datamodule=WithTest())  # fmt: skip


def test_layer_replace_relative_reward_moves_the_scores_at_a_language_model_loss(tiny_trainer) -> None:
    """At tiny-llama's loss on random tokens (about 6 nats) ScaleOT's exp reward barely moves the scores; the
    relative reward, set on the callback, moves them by orders of magnitude more from the same draws."""
    spread = {}
    for reward in ("exp", "relative"):
        torch.manual_seed(0)
        module = CountingStage1()
        callback = LayerReplace(1, 1, harmonizer_rank=8, group_size=2, num_candidates=2, reward=reward)
        tiny_trainer(max_steps=4, callbacks=[callback]).fit(module, datamodule=LM())
        assert callback.importance.reward == reward
        spread[reward] = float(callback.importance.scores.abs().max())
    assert spread["relative"] > 20 * spread["exp"] > 0
    with pytest.raises(ValueError, match="reward='log'"):
        LayerReplace(1, 1, reward="log")  # type: ignore[arg-type]
