"""Offsite-tuning LightningModules and callbacks on tiny models: each step, the artifacts, resume, the pipeline."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from privtune.callbacks.layer_replace import LayerReplace
from privtune.callbacks.offsite_pipeline import OffsitePipeline
from privtune.callbacks.offsite_tuning import AdapterExport, EmulatorExport, PlugAdapters
from privtune.callbacks.rank_compression import RankCompression
from privtune.datamodules import TextFile
from privtune.datamodules.resumable import resumable_train_loader
from privtune.emulator import (
    EmulatorPlan,
    LowRankLinear,
    find_original_tensors,
    load_adapter_artifact,
    load_emulator_artifact,
    read_plan,
    save_adapter_artifact,
)
from privtune.models import get_blocks, load_model
from privtune.modules import TextClassifier
from privtune.modules.offsite_distill import EmulatorDistillation
from privtune.modules.offsite_finetune import OffsiteFinetune
from privtune.modules.offsite_importance import HarmonizerImportance
from privtune.recipes import offsite as offsite_recipe
from privtune.recipes.offsite import (
    EmulatorKnobs,
    NestedTrainers,
    OffsiteRecipe,
    PipelineSettings,
    ScaleOTStage1,
    generate_scaleot_emulator,
    kept_closeness_record,
    plugged_classifier,
)

WORDS = {"good": ["great", "fine", "love", "happy", "good"], "bad": ["awful", "hate", "sad", "bad", "price"]}


@pytest.fixture
def synthetic_csv(tmp_path):
    """Hand-made two-class text whose class is decided by its words."""
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(60):
        label = "good" if i % 2 else "bad"
        lines.append(" ".join(rng.choice(WORDS[label]) for _ in range(6)) + f",{label}")
    path = tmp_path / "synthetic.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


class FixedLM(pl.LightningDataModule):
    """Fixed (unshuffled) random LM batches, so that a resumed run sees exactly the same data."""

    def __init__(self, n: int = 4, length: int = 12) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.ids = torch.randint(3, 500, (n * 2, length), generator=gen)

    def _loader(self, part: torch.Tensor) -> DataLoader:
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in part]
        return DataLoader(rows, batch_size=2, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.ids[: len(self.ids) // 2])

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.ids[len(self.ids) // 2 :])


def _task(path, **kw) -> TextFile:
    args = {"template": "Text: {text}\nSentiment:", "label_words": [" negative", " positive"]}
    args |= {"label_names": ["bad", "good"], "train_size": 24, "val_size": 8, "test_size": 16, "max_length": 24}
    args |= {"batch_size": 8, "seed": 0, "tokenizer": "tiny-llama", **kw}
    return TextFile(str(path), **args)


def _replace(**kw) -> LayerReplace:
    args = {"adapter_bottom": 1, "adapter_top": 1, "harmonizer_rank": 8, "group_size": 2, "num_candidates": 2}
    return LayerReplace(**args, seed=0, **kw)


def test_stage1_kill_and_resume_reaches_the_same_scores_and_harmonizers(tmp_path, tiny_trainer) -> None:
    straight = HarmonizerImportance("tiny-llama", lr=1e-2)
    cb = _replace(warm_start_batches=2)
    tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[cb]).fit(straight, datamodule=FixedLM())

    first = HarmonizerImportance("tiny-llama", lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callbacks = [_replace(warm_start_batches=2), ckpt]
    tiny_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True).fit(
        first, datamodule=FixedLM()
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert all(k.startswith(("harmonizers.", "layer_importance")) for k in saved["state_dict"])  # small checkpoint
    resumed = HarmonizerImportance("tiny-llama", lr=1e-2)
    cb2 = _replace(warm_start_batches=2)
    tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[cb2], enable_checkpointing=False).fit(
        resumed, datamodule=FixedLM(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert cb2.rl_batches == cb.rl_batches == 4
    # the warm start ran once, before the first step, and not again on resume
    assert cb.warm_start_error is not None and cb.warm_start_error[1] < cb.warm_start_error[0]
    assert cb2.warm_start_error is None
    assert torch.equal(cb2.importance.scores, cb.importance.scores)
    assert not torch.equal(cb.importance.scores, torch.zeros(2, dtype=torch.float64))
    for key, value in straight.harmonizers.state_dict().items():
        assert torch.equal(resumed.harmonizers.state_dict()[key], value), key


def test_identity_stand_ins_learn_only_the_scores(tiny_trainer) -> None:
    """``stand_ins='identity'``: harmonizers frozen at the identity, the DL forward skipped, the RL scores learned;
    the same scores as the ablation's first form of arm c (harmonizers trained at lr 1e-12)."""
    identity = HarmonizerImportance("tiny-llama", lr=1e-2)
    cb = _replace(stand_ins="identity")
    trainer = tiny_trainer(max_steps=4, max_epochs=-1, limit_train_batches=None, limit_val_batches=0, callbacks=[cb])
    trainer.fit(identity, datamodule=FixedLM())
    assert trainer.global_step == 4 and cb.rl_batches == 4  # every step ran its RL step
    assert identity.layer_importance.abs().sum() > 0  # the scores moved
    assert not identity.trains_harmonizers()
    for harmonizer in identity.harmonizers.values():  # exactly the identity: a replaced block is dropped
        assert torch.count_nonzero(harmonizer.up.weight) == 0 and torch.count_nonzero(harmonizer.up.bias) == 0
    tiny_lr = HarmonizerImportance("tiny-llama", lr=1e-12)
    cb_lr = _replace()
    tiny_trainer(max_steps=4, max_epochs=-1, limit_train_batches=None, limit_val_batches=0, callbacks=[cb_lr]).fit(
        tiny_lr, datamodule=FixedLM()
    )
    assert torch.allclose(cb.importance.scores, cb_lr.importance.scores, rtol=1e-6, atol=1e-12)


def test_identity_stand_ins_refuse_a_warm_start() -> None:
    with pytest.raises(ValueError, match="stand_ins='identity'.*warm_start_batches: 0"):
        _replace(stand_ins="identity", warm_start_batches=4)
    with pytest.raises(ValueError, match="stand_ins='none'"):
        _replace(stand_ins="none")


def test_stage1_trains_only_harmonizers_and_exports_a_clean_emulator(tmp_path, tiny_trainer) -> None:
    module = HarmonizerImportance("tiny-llama", lr=1e-2)
    original = {k: v.clone() for k, v in module.model.state_dict().items()}
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75)
    tiny_trainer(max_epochs=1, callbacks=[_replace(), export]).fit(module, datamodule=FixedLM())
    now = {k.replace(".block.", "."): v for k, v in module.model.state_dict().items() if "harmonizer" not in k}
    assert all(torch.equal(now[k], v) for k, v in original.items())
    plan = read_plan(tmp_path / "emu")
    assert plan.kinds == ["adapter", "block", "harmonizer", "adapter"] or plan.kinds == [
        "adapter", "harmonizer", "block", "adapter",
    ]  # fmt: skip
    emulator, _ = load_emulator_artifact(tmp_path / "emu")
    assert find_original_tensors(emulator.state_dict(), load_model("tiny-llama"), plan) == []


def test_export_distils_the_built_emulator_towards_the_original(tmp_path, tiny_trainer) -> None:
    module = HarmonizerImportance("tiny-llama", lr=1e-2)
    export = EmulatorExport(
        str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75, distill_steps=9, distill_lr=3e-3
    )
    tiny_trainer(max_epochs=1, callbacks=[_replace(), export]).fit(module, datamodule=FixedLM())
    # two training batches: steps 1 and 9 both see the first one
    assert export.distill_kd is not None and export.distill_kd[1] < export.distill_kd[0]
    plan = read_plan(tmp_path / "emu")
    assert plan.info["distill_steps"] == 9
    emulator, _ = load_emulator_artifact(tmp_path / "emu")
    assert find_original_tensors(emulator.state_dict(), load_model("tiny-llama"), plan) == []
    # the adapters the data owner starts from are still the original blocks
    original = get_blocks(load_model("tiny-llama"))
    for position, index in ((0, 0), (plan.depth - 1, 3)):
        for (name, a), b in zip(
            get_blocks(emulator)[position].state_dict().items(), original[index].state_dict().values()
        ):
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="distill_steps=-1"):
        EmulatorExport("unused", distill_steps=-1)
    with pytest.raises(ValueError, match="distill_norm='l2'"):
        EmulatorExport("unused", distill_norm="l2")  # type: ignore[arg-type]


def test_export_refuses_original_ffn_before_training(tiny_trainer) -> None:
    module = HarmonizerImportance("tiny-llama")
    export = EmulatorExport("unused", adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=1.0)
    with pytest.raises(ValueError, match="beta_mlp=1.0"):
        tiny_trainer(max_epochs=1, callbacks=[_replace(), export]).fit(module, datamodule=FixedLM())
    with pytest.raises(ValueError, match="undistilled uniform-drop"):
        tiny_trainer(max_steps=0, callbacks=[EmulatorExport("unused")]).fit(
            EmulatorDistillation("tiny-llama", 1, 1, emulator_layers=1), datamodule=FixedLM()
        )
    with pytest.raises(ValueError, match="alpha=1.0"):
        EmulatorExport("unused", alpha=1.0)
    with pytest.raises(ValueError, match="num_candidates=1"):
        LayerReplace(num_candidates=1)
    with pytest.raises(ValueError, match="warm_start_batches=-1"):
        LayerReplace(warm_start_batches=-1)


@pytest.mark.parametrize("method", ["uniform_drop", "gradot"])
def test_distillation_exports_an_emulator_without_original_tensors(method, tmp_path, tiny_trainer) -> None:
    module = EmulatorDistillation(
        "tiny-llama", 1, 1, emulator_layers=1 if method == "uniform_drop" else None, method=method, lr=1e-2,
        rank_budget=0.5, channel_budget=0.5, calib_batches=1,
    )  # fmt: skip
    export = EmulatorExport(str(tmp_path / "emu"))
    tiny_trainer(max_steps=3, callbacks=[export]).fit(module, datamodule=FixedLM())
    emulator, plan = load_emulator_artifact(tmp_path / "emu")
    assert plan.method == method
    assert find_original_tensors(emulator.state_dict(), load_model("tiny-llama"), plan) == []


def test_data_owner_tuning_plug_in_and_wrong_base(tmp_path, synthetic_csv, tiny_trainer) -> None:
    # A compressed, artifact-legal emulator from the in-process ScaleOT path.
    stage1 = HarmonizerImportance("tiny-llama", lr=1e-2)
    emu_dir, ad_dir = tmp_path / "emu", tmp_path / "adapters"
    export = EmulatorExport(str(emu_dir), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75)
    tiny_trainer(max_epochs=1, callbacks=[_replace(), export]).fit(stage1, datamodule=FixedLM())

    owner = OffsiteFinetune("tiny-llama", str(emu_dir), tuning="lora", lr=1e-2)
    trainable = {n for n, p in owner.named_parameters() if p.requires_grad}
    assert trainable
    assert all("lora_" in n and (".layers.0." in n or ".layers.3." in n) for n in trainable)
    tiny_trainer(max_steps=3, callbacks=[AdapterExport(str(ad_dir))]).fit(owner, datamodule=_task(synthetic_csv))
    adapters = torch.load(ad_dir / "adapters.pt", weights_only=True)
    assert {k.split(".")[0] for k in adapters} == {"0", "3"}
    assert not any("lora" in k for k in adapters)  # merged into the block weights

    full = TextClassifier("tiny-llama", tuning="none")
    before = {k: v.clone() for k, v in full.model.state_dict().items()}
    result = tiny_trainer().test(full, datamodule=_task(synthetic_csv), verbose=False)
    assert "test/acc" in result[0]
    plugged = TextClassifier("tiny-llama", tuning="none")
    tiny_trainer(callbacks=[PlugAdapters(str(ad_dir))]).test(plugged, datamodule=_task(synthetic_csv), verbose=False)
    changed = {k for k, v in plugged.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed
    assert all(".layers.0." in k or ".layers.3." in k for k in changed)

    other = TextClassifier("tiny-gpt2", tuning="none")
    with pytest.raises(ValueError, match="fingerprint"):
        tiny_trainer(callbacks=[PlugAdapters(str(ad_dir))]).test(
            other, datamodule=_task(synthetic_csv, tokenizer="tiny-gpt2")
        )
    with pytest.raises(ValueError, match="not an adapter artifact"):
        PlugAdapters(str(emu_dir))
    with pytest.raises(ValueError, match="emulator_dir"):
        OffsiteFinetune("tiny-llama")


def test_rank_compression_callback_runs_before_the_optimizer(synthetic_csv, tiny_trainer) -> None:
    module = TextClassifier("tiny-llama", tuning="full", lr=1e-3)
    callback = RankCompression(["model.layers.*.self_attn.[qo]_proj"], beta=0.25)
    trainer = tiny_trainer(max_steps=1, callbacks=[callback])
    trainer.fit(module, datamodule=_task(synthetic_csv))
    compressed = [m for m in module.model.modules() if isinstance(m, LowRankLinear)]
    assert len(compressed) == 8
    assert set(callback.compressed.values()) == {8}
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for m in compressed for p in m.parameters())
    with pytest.raises(ValueError, match="rank=99"):
        tiny_trainer(max_steps=1, callbacks=[RankCompression(["model.layers.*.self_attn.q_proj"], rank=99)]).fit(
            TextClassifier("tiny-llama", tuning="full"), datamodule=_task(synthetic_csv)
        )
    with pytest.raises(ValueError, match="exactly one"):
        RankCompression(["x"])
    with pytest.raises(ValueError, match="matches no linear"):
        RankCompression(["nothing.*"], beta=0.5).targets(module.model)


def test_one_process_pipeline_writes_the_five_setting_report(tmp_path, synthetic_csv, tiny_trainer) -> None:
    module = HarmonizerImportance("tiny-llama", lr=1e-2)
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75)
    pipeline = OffsitePipeline(
        str(tmp_path / "report"), task=str(synthetic_csv), train_size=24, val_size=8, test_size=16, max_length=24,
        batch_size=8, max_steps=2, lr=1e-2, alphas=[0.0], template="Text: {text}\nSentiment:",
        label_words=[" negative", " positive"], label_names=["bad", "good"],
    )  # fmt: skip
    tiny_trainer(max_epochs=1, callbacks=[_replace(), export, pipeline]).fit(module, datamodule=FixedLM())
    report = json.loads((tmp_path / "report" / "offsite_report.json").read_text())
    assert set(report["settings"]) == {"full_zs", "emulator_zs", "ft", "emulator_ft", "plug_in"}
    assert report["privacy_gap_points"] == pytest.approx(
        100 * (report["settings"]["plug_in"]["acc"] - report["settings"]["emulator_ft"]["acc"])
    )
    assert [r["alpha"] for r in report["sweep"]] == [0.0, 0.5]
    assert report["step_time_ratio_emulator_over_full"] > 0
    assert (tmp_path / "report" / "offsite_report.md").read_text().count("Privacy gap") == 1
    assert (tmp_path / "report" / "offsite_report.png").is_file()
    with pytest.raises(ValueError, match="task="):
        OffsitePipeline("x", task="imdb")
    assert isinstance(EmulatorPlan.from_dict(read_plan(tmp_path / "emu").to_dict()), EmulatorPlan)
    assert len(get_blocks(load_emulator_artifact(tmp_path / "emu")[0])) == 4


class _KilledAt(pl.Callback):
    """Stands in for a killed process: raises before step ``step + 1`` (after the checkpoint of ``step``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001 - Lightning's hook
        if trainer.global_step == self.step:
            raise KeyboardInterrupt("killed")


def test_pipeline_killed_in_stage_1_resumes_and_reports_the_whole_stage(tmp_path, synthetic_csv, tiny_trainer) -> None:
    """A run killed during stage 1 resumes from its last checkpoint (as the ablation's long rows do) and its report
    holds every stage-1 step's loss once, the owner's seconds of both runs and the step it resumed at."""

    def run(killed: bool) -> None:
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
        callbacks = [
            _replace(warm_start_batches=1),
            EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75),
            _pipeline(tmp_path / "report", synthetic_csv),
            ckpt,
        ]
        callbacks += [_KilledAt(2)] if killed else []
        trainer = tiny_trainer(max_steps=4, max_epochs=-1, limit_train_batches=None, limit_val_batches=0,
                               callbacks=callbacks, enable_checkpointing=True)  # fmt: skip
        last = tmp_path / "ckpt" / "last.ckpt"
        trainer.fit(HarmonizerImportance("tiny-llama", lr=1e-2), datamodule=FixedLM(),
                    ckpt_path=None if killed else str(last), weights_only=True)  # fmt: skip

    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(killed=True)
    assert not (tmp_path / "report" / "offsite_report.json").exists()  # the pipeline did not run on the kill
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("OffsitePipeline"))
    assert state["owner_curves"]["step"] == [1, 2] and state["owner_seconds"] > 0
    run(killed=False)
    report = json.loads((tmp_path / "report" / "offsite_report.json").read_text())
    assert report["stage1_curves"]["loss"]["step"] == [1, 2, 3, 4]
    assert report["meta"]["stage1_resumed_at_steps"] == [2]
    assert report["stage_seconds"]["stage-1 / distillation (fit)"] > state["owner_seconds"]
    errors = report["stage1_curves"]["harmonizer_error"]["step"]  # sampled: the first step, every k-th, the last
    assert errors[0] == 1 and errors[-1] == 4 and errors == sorted(set(errors))


# --- the recipe: nested Trainers, quiet progress, one import direction, the adapters the plug-in takes -------------

REPO = Path(__file__).resolve().parents[1]


def _pipeline(folder, csv, **kw) -> OffsitePipeline:
    args = {"train_size": 24, "val_size": 8, "test_size": 16, "max_length": 24, "batch_size": 8, "max_steps": 2}
    args |= {"lr": 1e-2, "template": "Text: {text}\nSentiment:", "label_words": [" negative", " positive"]}
    return OffsitePipeline(str(folder), task=str(csv), label_names=["bad", "good"], **args | kw)


def test_nested_trainers_follow_the_outer_precision_logger_and_device(tmp_path, synthetic_csv, tiny_trainer) -> None:
    module = HarmonizerImportance("tiny-llama", lr=1e-2)
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75)
    pipeline = _pipeline(tmp_path / "report", synthetic_csv, uniform_drop_layers=1)
    logger = CSVLogger(str(tmp_path / "logs"), name="outer")
    tiny_trainer(max_epochs=1, precision="bf16-mixed", logger=logger, callbacks=[_replace(), export, pipeline]).fit(
        module, datamodule=FixedLM()
    )
    assert pipeline.trainers == NestedTrainers("cpu", 1, "bf16-mixed", logger, str(tmp_path / "report"), 10)
    report = json.loads((tmp_path / "report" / "offsite_report.json").read_text())
    assert (report["meta"]["accelerator"], report["meta"]["precision"]) == ("cpu", "bf16-mixed")
    assert report["meta"]["date_utc"] and "command" in report["meta"]
    assert set(report["meta"]["layer_importance"]) == {"1", "2"}  # stage 1's learned scores, by block index
    # each stage's test metrics land in the outer run's logger under the stage's name
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    for stage in ("full_zero_shot", "full_fine_tuned", "scaleot_fine_tuned", "scaleot_plug_in"):
        assert f"{stage}/test/acc" in header, header
    # OT's uniform drop sits beside the exported emulator, and the verdict uses full ZS's 95% interval
    assert set(report["arms"]) == {"scaleot", "ot_uniform_drop_1-1-1"}
    low, high = report["full_zs_interval_95"]
    assert low < report["settings"]["full_zs"]["acc"] < high
    assert report["plug_in_above_full_zs_interval"]["plug_in"] == (report["settings"]["plug_in"]["acc"] > high)
    assert "| ot_uniform_drop_1-1-1 |" in (tmp_path / "report" / "offsite_report.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run with benchmarks/gpu_check.py)")
def test_the_whole_pipeline_runs_on_the_outer_trainers_cuda_device(tmp_path, synthetic_csv, tiny_trainer) -> None:
    """Stage 1 on the GPU, then every nested stage (emulators, fine-tuning, plug-in, OT's arm) on the same device."""
    module = HarmonizerImportance("tiny-llama", lr=1e-2)
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75)
    pipeline = _pipeline(tmp_path / "report", synthetic_csv, uniform_drop_layers=1)
    tiny_trainer(
        accelerator="cuda", precision="bf16-mixed", deterministic=False, callbacks=[_replace(), export, pipeline]
    ).fit(module, datamodule=FixedLM())
    assert (pipeline.trainers.accelerator, pipeline.trainers.precision) == ("cuda", "bf16-mixed")
    report = json.loads((tmp_path / "report" / "offsite_report.json").read_text())
    assert report["meta"]["accelerator"] == "cuda"
    assert set(report["arms"]) == {"scaleot", "ot_uniform_drop_1-1-1"}
    assert {"full_zs", "emulator_ft", "plug_in"} <= set(report["settings"])
    assert all(0.0 <= row["acc"] <= 1.0 for row in report["settings"].values())
    assert load_emulator_artifact(str(tmp_path / "emu"))  # the exported emulator loads where the owner saved it


def test_nested_trainers_take_the_outer_device_and_refuse_several_processes() -> None:
    def outer(device: str, world_size: int = 1) -> SimpleNamespace:
        return SimpleNamespace(
            world_size=world_size, strategy=SimpleNamespace(root_device=torch.device(device)), precision="bf16-mixed",
            logger=None,
        )  # fmt: skip

    cuda = NestedTrainers.from_trainer(outer("cuda:1"), "runs/x")  # type: ignore[arg-type]
    assert (cuda.accelerator, cuda.devices, cuda.precision) == ("cuda", [1], "bf16-mixed")
    assert NestedTrainers.from_trainer(outer("cpu"), "runs/x").accelerator == "cpu"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="runs 2 processes"):
        NestedTrainers.from_trainer(outer("cuda:0", world_size=2), "runs/x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="runs on `meta`"):
        NestedTrainers.from_trainer(outer("meta"), "runs/x")  # type: ignore[arg-type]


def test_no_trainer_is_hard_coded_to_the_cpu() -> None:
    python = [*(REPO / "privtune" / "recipes").glob("*.py"), *(REPO / "privtune" / "modules").glob("offsite_*.py")]
    python += [*(REPO / "callbacks").glob("offsite_*.py"), *(REPO / "benchmarks").glob("offsite_*.py")]
    python += [REPO / "benchmarks" / "gpu_check.py", REPO / "train.py"]
    pinned = [str(p) for p in python if re.search(r"accelerator\s*=\s*[\"']cpu[\"']", p.read_text())]
    configs = [REPO / "configs" / "default.yaml", *(REPO / "configs" / "offsite_tuning").glob("*.yaml")]
    pinned += [str(p) for p in configs if re.search(r"^\s*accelerator:\s*cpu\b", p.read_text(), re.M)]
    assert pinned == []


def test_recipe_imports_point_one_way() -> None:
    """callbacks -> recipes -> modules -> core: the recipe and the modules never import a callback."""
    sources = [*(REPO / "privtune" / "recipes").glob("*.py"), *(REPO / "privtune" / "modules").glob("*.py")]
    offenders = [str(p) for p in sources if re.search(r"^\s*(from|import) privtune\.callbacks", p.read_text(), re.M)]
    assert offenders == []
    for path in (REPO / "privtune" / "recipes" / "offsite.py", REPO / "callbacks" / "offsite_pipeline.py"):
        assert not re.search(r"^[ \t]+(from \S+ )?import ", path.read_text(), re.M), path  # no function-local imports


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_train_py_runs_the_tiny_pipeline_quietly_with_progress_lines(tmp_path, monkeypatch) -> None:
    from train import main

    seen = _Lines()  # what Lightning's own console handler prints
    logging.getLogger("lightning.pytorch").addHandler(seen)
    monkeypatch.chdir(tmp_path)
    try:
        main(["fit", "--config", str(REPO / "configs" / "offsite_tuning" / "tiny_debug_pipeline.yaml")])
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(seen)
    err = "\n".join(seen.lines)
    assert err.count("GPU available") == 1  # the outer Trainer's banner only, not one per nested run
    assert err.count("💡 Tip") <= 1
    assert "[offsite] scaleot_data_owner_tuning: step 3/3, loss" in err
    assert "[offsite] scaleot_plug_in: accuracy" in err
    report = json.loads((tmp_path / "runs" / "offsite_tiny" / "offsite_report.json").read_text())
    assert [r["alpha"] for r in report["sweep"]] == [0.0, 0.5]


def test_plug_in_takes_exactly_the_last_step_adapters_the_data_owner_trained(
    tmp_path, synthetic_csv, tiny_trainer
) -> None:
    stage1 = HarmonizerImportance("tiny-llama", lr=1e-2)
    tiny_trainer(max_epochs=1, callbacks=[_replace()]).fit(stage1, datamodule=FixedLM())
    knobs = EmulatorKnobs(adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75)
    emu_dir = generate_scaleot_emulator(ScaleOTStage1.from_module(stage1), knobs, str(tmp_path / "emu"))
    settings = PipelineSettings(str(tmp_path), task=str(synthetic_csv), label_words=[" negative", " positive"])
    recipe = OffsiteRecipe(settings, NestedTrainers.auto(str(tmp_path)))
    module = OffsiteFinetune("tiny-llama", emu_dir, tuning="full", lr=1e-2)
    initial = {k: v.clone() for k, v in module.adapter_state().items()}
    recipe.trainers.fit("tuning", module, _task(synthetic_csv), steps=3, seed=0)
    trained = module.adapter_state()
    save_adapter_artifact(tmp_path / "adapters", trained, module.plan)  # what tune_emulator_and_plug_in writes

    adapters, plan = load_adapter_artifact(tmp_path / "adapters")
    original = load_model("tiny-llama")
    expected = {f"{i}.{n}": t for i in (0, 3) for n, t in get_blocks(original)[i].state_dict().items()}
    assert plan.split.adapter_indices == [0, 3]
    assert set(adapters) == set(expected)  # names and original block indices
    assert all(adapters[k].dtype == expected[k].dtype == torch.float32 for k in adapters)
    assert all(torch.equal(adapters[k], trained[k]) for k in adapters)  # the last step's weights, no selection
    assert any(not torch.equal(adapters[k], initial[k]) for k in adapters)  # and they did train
    plugged = get_blocks(plugged_classifier("tiny-llama", tmp_path / "adapters").model)
    for key, tensor in adapters.items():
        index, _, name = key.partition(".")
        assert torch.equal(plugged[int(index)].state_dict()[name], tensor), key
    untouched = get_blocks(original)
    for index in (1, 2):  # the middle stays the original model's
        for name, tensor in plugged[index].state_dict().items():
            assert torch.equal(tensor, untouched[index].state_dict()[name]), (index, name)


def test_uniform_drop_distilled_in_process_with_ots_objective(tmp_path, synthetic_csv, tiny_trainer) -> None:
    """OT + KD beside the exported emulator: distilled at the model owner on the fit's LM batches, never written."""
    module = HarmonizerImportance("tiny-llama", lr=1e-2)
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75)
    pipeline = _pipeline(
        tmp_path / "report", synthetic_csv, uniform_drop_layers=1, uniform_drop_distill_steps=6,
        uniform_drop_distill_lr=1e-3,
    )  # fmt: skip
    tiny_trainer(max_epochs=1, callbacks=[_replace(), export, pipeline]).fit(module, datamodule=FixedLM())
    report = json.loads((tmp_path / "report" / "offsite_report.json").read_text())
    assert set(report["arms"]) == {"scaleot", "ot_uniform_drop_1-1-1_kd6"}
    record = report["uniform_drop_distillation"]["ot_uniform_drop_1-1-1_kd6"]
    assert record["steps"] == 6 and record["lr"] == 1e-3 and record["curve"]["step"] == [1, 2, 3, 4, 5, 6]
    kd = record["curve"]["kd"]
    assert kd[4] < kd[0] and kd[5] < kd[1]  # the same batches (two, cycled) a few steps later: closer
    near = record["kept_closeness"]  # the one kept block's seven matrices, moved by the distillation, not replaced
    assert near["matrices"] == 7 and near["threshold"] == 1e-2
    assert 0.0 < near["min_rel_error"] <= near["median_rel_error"] < 1.0 and near["max_cosine"] > 0.9
    assert any("model owner's distillation (6 steps)" in k for k in report["stage_seconds"])
    assert (
        "ot_uniform_drop_1-1-1_kd6: model owner's distillation"
        in (tmp_path / "report" / "offsite_report.md").read_text()
    )
    # the arm writes an adapter artifact and nothing else: the distilled middle never leaves the process
    arm_paths = [p for p in (tmp_path / "report").rglob("*") if "kd6" in p.as_posix()]
    adapters = tmp_path / "report" / "adapters_ot_uniform_drop_1-1-1_kd6"
    assert {p.parent if p.is_file() else p for p in arm_paths} == {adapters}
    assert {p.name for p in adapters.iterdir()} == {p.name for p in (tmp_path / "report" / "adapters").iterdir()}


class ShuffledLM(FixedLM):
    """FixedLM's rows drawn by the framework's resumable shuffling loader, as the owner's LM corpus draws them."""

    def train_dataloader(self) -> DataLoader:
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in self.ids[:6]]
        return resumable_train_loader(rows, batch_size=2, seed=3, trainer=self.trainer)


def test_a_run_killed_in_the_in_process_distillation_resumes_it(tmp_path, synthetic_csv, tiny_trainer, monkeypatch):
    """The OT + KD arm's distillation (the ablation's longest stage) saves its state every few steps; killed there
    and rerun with ``--ckpt_path``, the run continues it after the last saved step, reports every step once and
    the step it resumed at, and removes the state once the report is written; a fresh run starts it over."""
    monkeypatch.setattr(offsite_recipe, "DISTILL_CHECKPOINT_EVERY", 2)
    real_progress = offsite_recipe.progress

    def killed_in_step_5(message: str) -> None:
        if "distillation step 5/6" in message:
            raise KeyboardInterrupt("killed")
        real_progress(message)

    def run(ckpt_path: str | None) -> None:
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
        callbacks = [
            _replace(),
            EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75),
            _pipeline(tmp_path / "report", synthetic_csv, uniform_drop_layers=1, uniform_drop_distill_steps=6,
                      uniform_drop_distill_lr=1e-3),
            ckpt,
        ]  # fmt: skip
        trainer = tiny_trainer(max_steps=4, max_epochs=-1, limit_train_batches=None, limit_val_batches=0,
                               callbacks=callbacks, enable_checkpointing=True)  # fmt: skip
        trainer.fit(HarmonizerImportance("tiny-llama", lr=1e-2), datamodule=ShuffledLM(), ckpt_path=ckpt_path,
                    weights_only=True)  # fmt: skip

    state = tmp_path / "report" / "distillation_state" / "ot_uniform_drop_1-1-1_kd6.pt"
    monkeypatch.setattr(offsite_recipe, "progress", killed_in_step_5)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(None)
    assert torch.load(state, weights_only=True)["step"] == 4  # saved after steps 2 and 4, killed in step 5
    monkeypatch.setattr(offsite_recipe, "progress", real_progress)
    run(str(tmp_path / "ckpt" / "last.ckpt"))
    record = json.loads((tmp_path / "report" / "offsite_report.json").read_text())["uniform_drop_distillation"]
    record = record["ot_uniform_drop_1-1-1_kd6"]
    assert record["curve"]["step"] == [1, 2, 3, 4, 5, 6] and len(record["curve"]["kd"]) == 6
    assert record["resumed_at_step"] == 4 and record["seconds"] > 0
    assert not state.exists()
    # a fresh run (no --ckpt_path) finding an earlier run's state starts the distillation over
    state.parent.mkdir(exist_ok=True)
    state.write_bytes(b"an earlier run's state")
    run(None)
    record = json.loads((tmp_path / "report" / "offsite_report.json").read_text())["uniform_drop_distillation"]
    assert "resumed_at_step" not in record["ot_uniform_drop_1-1-1_kd6"] and not state.exists()


def test_kept_closeness_record_counts_the_matrices_the_leak_check_would_refuse() -> None:
    closeness = {
        f"1.m{i}": {"original": f"layers.{i}.m", "rel_error": err, "cosine": cos}
        for i, (err, cos) in enumerate([(0.004, 0.99999), (0.02, 0.9998), (0.3, 0.95)])
    }
    record = kept_closeness_record(closeness)
    assert record == {
        "matrices": 3, "threshold": 1e-2, "below_threshold": 1, "min_rel_error": 0.004, "median_rel_error": 0.02,
        "max_cosine": 0.99999,
    }  # fmt: skip
    assert kept_closeness_record(closeness, threshold=0.5)["below_threshold"] == 3
    assert kept_closeness_record({}) == {"matrices": 0, "threshold": 1e-2, "below_threshold": 0}


def test_pipeline_refusals(tmp_path, synthetic_csv, tiny_trainer) -> None:
    with pytest.raises(ValueError, match="needs an EmulatorExport callback before it"):
        tiny_trainer(max_epochs=1, callbacks=[_replace(), _pipeline(tmp_path, synthetic_csv)]).fit(
            HarmonizerImportance("tiny-llama"), datamodule=FixedLM()
        )
    distill = EmulatorDistillation("tiny-llama", 1, 1, emulator_layers=1)
    callbacks = [EmulatorExport(str(tmp_path / "emu")), _pipeline(tmp_path, synthetic_csv, alphas=[0.25])]
    with pytest.raises(ValueError, match="has no `layer_importance` / `harmonizers`"):
        tiny_trainer(max_steps=1, callbacks=callbacks).fit(distill, datamodule=FixedLM())
    with pytest.raises(ValueError, match="uniform_drop_layers=0"):
        _pipeline(tmp_path, synthetic_csv, uniform_drop_layers=0)
    with pytest.raises(ValueError, match="distils the uniform-drop arm: set `uniform_drop_layers` too"):
        _pipeline(tmp_path, synthetic_csv, uniform_drop_distill_steps=10)
    with pytest.raises(ValueError, match="uniform_drop_distill_steps=-1"):
        _pipeline(tmp_path, synthetic_csv, uniform_drop_layers=1, uniform_drop_distill_steps=-1)
    with pytest.raises(ValueError, match="progress_every=0"):
        _pipeline(tmp_path, synthetic_csv, progress_every=0)
    with pytest.raises(TypeError, match="not a trained ScaleOT stage-1 module"):
        ScaleOTStage1.from_module(distill)
    with pytest.raises(TypeError, match="missing \\['harmonizers'\\]"):
        ScaleOTStage1.from_module(HarmonizerImportance("tiny-llama"))  # stage 1 never ran
    stage1 = HarmonizerImportance("tiny-llama", lr=1e-2)
    tiny_trainer(max_steps=1, callbacks=[_replace()]).fit(stage1, datamodule=FixedLM())
    with pytest.raises(ValueError, match="distill_steps=2"):
        generate_scaleot_emulator(ScaleOTStage1.from_module(stage1), EmulatorKnobs(2, distill_steps=2), "unused")


def test_ablation_rows_are_the_base_config_with_only_the_arm_changed(tmp_path) -> None:
    import importlib.util
    import sys

    import yaml

    spec = importlib.util.spec_from_file_location("offsite_ablation", REPO / "benchmarks" / "offsite_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    sys.modules["offsite_ablation"] = ablation
    spec.loader.exec_module(ablation)
    base = yaml.safe_load((REPO / ablation.BASE_CONFIG).read_text())

    def pipeline(config: dict) -> dict:
        return ablation._callback(config, "OffsitePipeline")["init_args"]

    row = ablation.row_config(base, "a_d", "tweets", 2, tmp_path)
    assert (row["seed_everything"], pipeline(row)["seed"], row["data"]["init_args"]["seed"]) == (2, 2, 2)
    assert (pipeline(row)["task"], row["data"]["init_args"]["source"]) == ("tweets", "bbc_news")
    assert pipeline(row)["uniform_drop_layers"] == 13 and row["model"] == base["model"]
    assert pipeline(row)["output_dir"] == str(tmp_path / "tweets" / "a_d_seed2")
    identity = ablation.row_config(base, "c", "bbc_news", 0, tmp_path)
    assert identity["model"]["init_args"]["lr"] == 1e-12
    assert ablation._callback(identity, "LayerReplace")["init_args"]["warm_start_batches"] == 0
    kd = ablation.row_config(base, "akd300", "bbc_news", 0, tmp_path)  # OT + KD in process beside ScaleOT (d)
    assert (pipeline(kd)["uniform_drop_layers"], pipeline(kd)["uniform_drop_distill_steps"]) == (13, 300)
    assert kd["trainer"]["max_steps"] == 100 and kd["model"] == base["model"]
    assert base == yaml.safe_load((REPO / ablation.BASE_CONFIG).read_text())  # the base is not mutated
    with pytest.raises(ValueError, match="unknown arm 'x'"):
        ablation.row_config(base, "x", "tweets", 0, tmp_path)


class _NeverTrains(HarmonizerImportance):
    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201 - Lightning's hook
        raise AssertionError("stage 1 ran before the data owner's task was checked")


@pytest.mark.parametrize("problem", ["missing_file", "oversized_train_size"])
def test_a_bad_data_owner_task_fails_before_stage_1(tmp_path, synthetic_csv, tiny_trainer, problem) -> None:
    if problem == "missing_file":
        with pytest.raises(ValueError, match="no such file"):
            _pipeline(tmp_path / "report", tmp_path / "absent.csv")
        return
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75)
    pipeline = _pipeline(tmp_path / "report", synthetic_csv, train_size=100_000)
    with pytest.raises(ValueError, match="the data owner's task cannot be used.*train_size"):
        tiny_trainer(max_steps=1, callbacks=[_replace(), export, pipeline]).fit(
            _NeverTrains("tiny-llama"), datamodule=FixedLM()
        )


def test_extraction_tunes_every_emulator_parameter_and_reports_its_gap(tmp_path, synthetic_csv, tiny_trainer) -> None:
    module = HarmonizerImportance("tiny-llama", lr=1e-2)
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=0.5, beta_mlp=0.75)
    pipeline = _pipeline(tmp_path / "report", synthetic_csv, extraction=True, extraction_lr=1e-2)
    tiny_trainer(max_epochs=1, callbacks=[_replace(), export, pipeline]).fit(module, datamodule=FixedLM())
    report = json.loads((tmp_path / "report" / "offsite_report.json").read_text())
    s = report["settings"]
    assert "extraction" in s
    assert report["extraction_gap_points"] == pytest.approx(100 * (s["plug_in"]["acc"] - s["extraction"]["acc"]))
    assert "Extraction gap" in (tmp_path / "report" / "offsite_report.md").read_text()
    # the owner's leak-check record, summarised: how close the kept matrices are to their originals
    lo, hi = (float(v) for v in report["emulator"]["kept matrices: cosine to the original (min–max)"].split("–"))
    assert -1.0 <= lo <= hi <= 1.0
    # the attacker's model: every parameter of the shipped emulator is trainable, not only the adapters
    attacker = OffsiteFinetune("tiny-llama", emulator_dir=str(tmp_path / "emu"), tuning="emulator")
    owner = OffsiteFinetune("tiny-llama", emulator_dir=str(tmp_path / "emu"), tuning="full")
    everything = sum(p.numel() for p in attacker.model.parameters())
    assert sum(p.numel() for p in attacker.model.parameters() if p.requires_grad) == everything
    assert 0 < sum(p.numel() for p in owner.model.parameters() if p.requires_grad) < everything
    with pytest.raises(ValueError, match="extraction_lr"):
        _pipeline(tmp_path / "r2", synthetic_csv, extraction=True, extraction_lr=0.0)
