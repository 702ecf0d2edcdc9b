"""Ablation arms (b) uniform replaced set + harmonizers and (e) ScaleOT without SRC (docs/offsite_tuning.md).

(b) is a plan knob (``scaleot_plan(replaced="uniform")``, ``EmulatorExport(replaced=...)``); (e) is measured at
the model owner only (``OffsitePipeline(scaleot_no_src=True)``), never exported: the shipping path still refuses
uncompressed kept blocks, and nothing the pipeline writes holds an original middle matrix.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

import privtune.callbacks  # noqa: F401
import privtune.datamodules  # noqa: F401
import privtune.modules  # noqa: F401
from privtune.callbacks.layer_replace import LayerReplace
from privtune.callbacks.offsite_pipeline import OffsitePipeline
from privtune.callbacks.offsite_tuning import EmulatorExport
from privtune.emulator import (
    OriginalTensorError,
    build_scaleot_emulator,
    count_parameters,
    least_important,
    load_emulator_artifact,
    read_plan,
    save_emulator_artifact,
    scaleot_plan,
    uniform_keep_layers,
)
from privtune.emulator.artifact import find_original_tensors
from privtune.emulator.harmonizer import Harmonizer
from privtune.emulator.low_rank import rank_from_ratio
from privtune.emulator.plan import uniform_replaced
from privtune.models import get_blocks, load_model
from privtune.modules.offsite_finetune import OffsiteFinetune
from privtune.modules.offsite_importance import HarmonizerImportance
from privtune.recipes.offsite import restore_kept_blocks

REPO = Path(__file__).resolve().parents[1]


# --- (b): the uniform replaced set ---------------------------------------------------------------------------------


def test_uniform_replaced_set_is_what_ot_drops_at_smollm2_scale() -> None:
    """SmolLM2-135M, N_a = 4, α = 0.5: the kept blocks are exactly OT 2-13-2's, the 13 others are harmonizers."""
    plan = scaleot_plan(30, 4, torch.zeros(26), 0.5, replaced="uniform")
    kept = [s for s, k in plan.middle if k == "block"]
    assert kept == uniform_keep_layers(30, 13)
    assert plan.kinds.count("harmonizer") == 13 == len(least_important(torch.zeros(26), list(range(2, 28)), 0.5))
    assert plan.info["replaced"] == "uniform"
    gaps = [b - a for a, b in zip(kept, kept[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spaced
    importance = scaleot_plan(30, 4, torch.arange(26.0), 0.5)  # ScaleOT: the 13 shallowest here (lowest scores)
    assert [s for s, k in importance.middle if k == "harmonizer"] == list(range(2, 15))
    assert importance.info["replaced"] == "importance"


@pytest.mark.parametrize(("n", "alpha"), [(26, 0.5), (26, 0.6), (10, 0.3), (7, 0.9), (3, 0.5), (1, 0.5), (5, 0.0)])
def test_uniform_replaced_count_and_spacing(n: int, alpha: float) -> None:
    candidates = list(range(2, 2 + n))
    replaced = uniform_replaced(candidates, alpha)
    assert len(replaced) == math.ceil(alpha * n - 1e-9) == len(least_important(torch.zeros(n), candidates, alpha))
    assert replaced == sorted(replaced) and set(replaced) <= set(candidates)
    kept = [c for c in candidates if c not in replaced]
    if len(kept) >= 2:
        assert kept[0] == candidates[0] and kept[-1] == candidates[-1]  # OT keeps the first and the last
        gaps = [b - a for a, b in zip(kept, kept[1:])]
        assert max(gaps) - min(gaps) <= 1


def test_replaced_knob_errors_before_work() -> None:
    with pytest.raises(ValueError, match="replaced='random'"):
        scaleot_plan(30, 4, torch.zeros(26), 0.5, replaced="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replaced='random'"):
        EmulatorExport("unused", replaced="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="26 candidate"):
        scaleot_plan(30, 4, torch.zeros(3), 0.5, replaced="uniform")  # the score count is still checked


# --- equal size ------------------------------------------------------------------------------------------------------


def _stage1(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.nn.ModuleDict]:
    torch.manual_seed(seed)
    model = load_model("tiny-llama").eval()
    harmonizers = torch.nn.ModuleDict({str(i): Harmonizer(32, 8) for i in (1, 2)})
    for h in harmonizers.values():  # away from the identity, so that harmonizer outputs differ from their block's
        torch.nn.init.normal_(h.up.weight, std=0.02)
    return model, torch.tensor([0.3, -0.2]), harmonizers


def test_default_src_stores_dense_so_no_src_at_the_same_alpha_is_the_same_size() -> None:
    """configs/default.yaml's β / β_mlp on SmolLM2's shapes: factors would not be smaller, so SRC keeps them dense.

    Hence (e) keeps α (not α ≈ 0.6, which would give 10 instead of 13 kept blocks) for the same parameter count.
    """
    base = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    export = next(cb for cb in base["trainer"]["callbacks"] if cb["class_path"].endswith("EmulatorExport"))
    beta, beta_mlp = export["init_args"]["beta"], export["init_args"]["beta_mlp"]
    hidden, kv, ffn = 576, 192, 1536  # SmolLM2-135M: q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536
    shapes = {(hidden, hidden): beta, (kv, hidden): beta, (ffn, hidden): beta_mlp, (hidden, ffn): beta_mlp}
    for shape, b in shapes.items():
        assert rank_from_ratio(b, shape) * sum(shape) >= shape[0] * shape[1], (shape, b)  # factored_linear: dense


def test_uniform_and_importance_choice_give_the_same_size() -> None:
    model, scores, harmonizers = _stage1()
    sizes = {}
    for replaced in ("importance", "uniform"):
        emulator, plan = build_scaleot_emulator(model, scores, harmonizers, 2, 0.5, 0.5, 0.5, 8, replaced)
        sizes[replaced] = count_parameters(emulator)
        assert plan.kinds.count("harmonizer") == 1 and plan.info["replaced"] == replaced
    assert sizes["importance"] == sizes["uniform"]


# --- (e): owner side only, the shipping path unchanged ---------------------------------------------------------------


def test_export_still_refuses_uncompressed_kept_blocks(tmp_path, tiny_trainer) -> None:
    export = EmulatorExport(str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, beta=1.0, beta_mlp=1.0)
    replace = LayerReplace(adapter_bottom=1, adapter_top=1, harmonizer_rank=8, group_size=2, num_candidates=2, seed=0)
    with pytest.raises(ValueError, match="beta=1.0.*ships the originals"):
        tiny_trainer(max_steps=1, callbacks=[replace, export]).fit(HarmonizerImportance("tiny-llama"), _LM())
    model, scores, harmonizers = _stage1()
    emulator, plan = build_scaleot_emulator(model, scores, harmonizers, 2, 0.5, 1.0, 1.0, 8)
    with pytest.raises(OriginalTensorError):
        save_emulator_artifact(tmp_path / "raw", emulator, plan, model)
    assert not (tmp_path / "raw").exists() and not (tmp_path / "emu").exists()


def test_restore_kept_blocks_is_scaleot_with_beta_one(tmp_path) -> None:
    model, scores, harmonizers = _stage1()
    emulator, plan = build_scaleot_emulator(model, scores, harmonizers, 2, 0.5, 0.5, 0.5, 8)
    save_emulator_artifact(tmp_path / "emu", emulator, plan, model)
    module = OffsiteFinetune("tiny-llama", emulator_dir=str(tmp_path / "emu"), tuning="full")
    shipped_plan = module.plan
    restore_kept_blocks(module, model)
    reference, _ = build_scaleot_emulator(model, scores, harmonizers, 2, 0.5, 1.0, 1.0, 8)
    assert count_parameters(module.model) == count_parameters(reference) >= count_parameters(emulator)
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(module.model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits, atol=1e-5)
    trainable = {n.split(".")[2] for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {str(p) for p in module.plan.adapter_positions}  # still only the adapters train
    assert module.plan.info.items() >= {"src": False, "owner_only": True, "beta": 1.0}.items()
    assert shipped_plan.modules and not module.plan.modules  # the kept blocks' surgery is gone from the plan
    assert module.plan.middle == shipped_plan.middle
    kept = next(pos for pos, kind in enumerate(module.plan.kinds) if kind == "block")
    assert get_blocks(module.model)[kept] is not get_blocks(model)[module.plan.layer_map[kept]]  # a copy


def test_restore_kept_blocks_refuses_a_non_scaleot_emulator() -> None:
    module = OffsiteFinetune("tiny-llama", adapter_bottom=1, adapter_top=1, emulator_layers=1, tuning="none")
    with pytest.raises(ValueError, match="`uniform_drop`"):
        restore_kept_blocks(module, load_model("tiny-llama"))


class _LM(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(3, 500, (4, 12), generator=torch.Generator().manual_seed(5))
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
        return DataLoader(rows, batch_size=2)

    val_dataloader = train_dataloader


def test_pipeline_measures_b_and_e_and_writes_no_original_matrix(tmp_path, tiny_trainer) -> None:
    rng = random.Random(0)
    words = {"good": ["great", "fine", "love"], "bad": ["awful", "hate", "sad"]}
    rows = [f"{' '.join(rng.choice(words[lab]) for _ in range(5))},{lab}" for lab in ["good", "bad"] * 30]
    (tmp_path / "task.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    torch.manual_seed(0)
    export = EmulatorExport(
        str(tmp_path / "emu"), adapter_layers=2, alpha=0.5, replaced="uniform", beta=0.5, beta_mlp=0.5
    )
    pipeline = OffsitePipeline(
        str(tmp_path / "report"), task=str(tmp_path / "task.csv"), train_size=16, val_size=8, test_size=8,
        max_length=16, batch_size=8, max_steps=1, lr=1e-2, scaleot_no_src=True, template="Text: {text}\nSentiment:",
        label_words=[" negative", " positive"], label_names=["bad", "good"],
    )  # fmt: skip
    replace = LayerReplace(adapter_bottom=1, adapter_top=1, harmonizer_rank=8, group_size=2, num_candidates=2, seed=0)
    module = HarmonizerImportance("tiny-llama", lr=1e-2)
    tiny_trainer(max_steps=2, callbacks=[replace, export, pipeline]).fit(module, datamodule=_LM())
    report = json.loads((tmp_path / "report" / "offsite_report.json").read_text())
    assert set(report["arms"]) == {"scaleot_uniform_replaced", "scaleot_uniform_replaced_no_src"}
    shipped, no_src = report["arms"]["scaleot_uniform_replaced"], report["arms"]["scaleot_uniform_replaced_no_src"]
    assert no_src["params"] > shipped["params"]  # at this tiny scale SRC factors the MLP; no SRC keeps it whole
    plan = read_plan(tmp_path / "emu")
    assert plan.info["replaced"] == "uniform" and plan.info["beta"] == 0.5  # what ships is compressed
    assert read_plan(tmp_path / "report" / "adapters_scaleot_uniform_replaced_no_src").info["owner_only"] is True
    # nothing written anywhere under tmp_path holds an original middle matrix (the exported emulator, both adapter
    # artifacts): the uncompressed emulator lived only in the process
    original = module.model
    written = sorted(tmp_path.rglob("*.pt"))
    assert len(written) == 3
    for path in written:
        state = torch.load(path, weights_only=True)
        assert not find_original_tensors(state, original, plan), path
    assert len(get_blocks(load_emulator_artifact(tmp_path / "emu")[0])) == 4


# --- the benchmark rows ----------------------------------------------------------------------------------------------


class _ParseOnlyCLI(LightningCLI):
    def instantiate_classes(self) -> None:
        pass


def _ablation():
    spec = importlib.util.spec_from_file_location("offsite_ablation", REPO / "benchmarks" / "offsite_ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["offsite_ablation"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arm", ["b", "e"])
def test_b_and_e_rows_are_runnable_and_parse(tmp_path, arm: str) -> None:
    ablation = _ablation()
    assert arm in ablation.ARMS
    base = yaml.safe_load((REPO / ablation.BASE_CONFIG).read_text())
    row = ablation.row_config(base, arm, "bbc_news", 1, tmp_path)
    export = ablation._callback(row, "EmulatorExport")["init_args"]
    pipeline = ablation._callback(row, "OffsitePipeline")["init_args"]
    assert pipeline["scaleot_no_src"] is True and pipeline["uniform_drop_layers"] is None
    assert export.get("replaced", "importance") == ("uniform" if arm == "b" else "importance")
    assert (export["alpha"], export["beta"], export["beta_mlp"]) == (0.5, 0.8, 0.9)  # what ships: unchanged knobs
    assert math.ceil(export["alpha"] * 26 - 1e-9) == 26 - ablation.EMULATOR_LAYERS  # replaced count = OT 2-13-2's drop
    path = tmp_path / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(row, sort_keys=False))
    cli = _ParseOnlyCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(path)])
    assert cli.config.model.class_path.endswith("HarmonizerImportance")
    bad = tmp_path / "bad.yaml"
    export["replaced"] = "random"
    bad.write_text(yaml.safe_dump(row, sort_keys=False))
    with pytest.raises(SystemExit):  # the knob is type-checked: a typo fails at parse time
        _ParseOnlyCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(bad)])


def test_rows_checkpoint_stage_1_and_a_rerun_resumes_from_the_last_checkpoint(tmp_path) -> None:
    ablation = _ablation()
    base = yaml.safe_load((REPO / ablation.BASE_CONFIG).read_text())
    row = ablation.row_config(base, "d1000", "tweets", 1, tmp_path)
    folder = tmp_path / "tweets" / "d1000_seed1"
    ckpt = ablation._callback(row, "ModelCheckpoint")["init_args"]
    assert row["trainer"]["enable_checkpointing"] is True and row["trainer"]["max_steps"] == 1000
    assert ckpt["dirpath"] == str(folder / ablation.CHECKPOINTS) and ckpt["save_last"] is True
    assert 1000 % ckpt["every_n_train_steps"] == 0  # the last stage-1 step is checkpointed: a kill after it resumes
    assert "--ckpt_path" not in ablation.row_command(folder)  # a fresh row starts from step 0
    (folder / ablation.CHECKPOINTS).mkdir(parents=True)
    (folder / ablation.CHECKPOINTS / "last.ckpt").write_bytes(b"")
    command = ablation.row_command(folder)
    assert command[-2:] == ["--ckpt_path", str(folder / ablation.CHECKPOINTS / "last.ckpt")]
    path = tmp_path / "d1000.yaml"
    path.write_text(yaml.safe_dump(row, sort_keys=False))
    cli = _ParseOnlyCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(path)])
    assert any(cb.class_path.endswith("ModelCheckpoint") for cb in cli.config.trainer.callbacks)


def test_the_1000_step_config_is_the_d1000_row_the_docs_report(tmp_path) -> None:
    """``scaleot_pipeline_smollm2_bbc_1000steps.yaml`` runs what the d1000 rows measured on BBC News (seed 0): the
    same stage 1, emulator, data owner and OT drop beside it; only folders, the title and the row's bookkeeping
    (progress bar, α sweep off, seed in the pipeline) differ. A knob changed in one and not the other fails here."""
    ablation = _ablation()
    base = yaml.safe_load((REPO / ablation.BASE_CONFIG).read_text())
    row = ablation.row_config(base, "d1000", "bbc_news", 0, tmp_path)
    config = yaml.safe_load((REPO / "configs/offsite_tuning/scaleot_pipeline_smollm2_bbc_1000steps.yaml").read_text())
    out = "runs/offsite_scaleot_bbc_1000steps"

    def knobs(c: dict, folder: str) -> dict:
        c = json.loads(json.dumps(c).replace(folder, "<out>"))
        c["trainer"].pop("enable_progress_bar", None)
        pipeline = ablation._callback(c, "OffsitePipeline")["init_args"]
        for key in ("title", "alphas", "seed"):
            pipeline.pop(key, None)
        c["trainer"]["callbacks"].sort(key=lambda cb: cb["class_path"])
        return c

    assert knobs(config, out) == knobs(row, str(tmp_path / "bbc_news" / "d1000_seed0"))
    assert config["trainer"]["max_steps"] == 1000 and config["seed_everything"] == 0
    assert ablation._callback(config, "OffsitePipeline")["init_args"]["uniform_drop_layers"] == ablation.EMULATOR_LAYERS


def test_g_row_is_scaleot_with_the_relative_reward_and_parses(tmp_path) -> None:
    ablation = _ablation()
    base = yaml.safe_load((REPO / ablation.BASE_CONFIG).read_text())
    row = ablation.row_config(base, "g", "tweets", 2, tmp_path)
    assert ablation._callback(row, "LayerReplace")["init_args"]["reward"] == "relative"
    default = ablation.row_config(base, "a_d", "tweets", 2, tmp_path)
    assert ablation._callback(default, "LayerReplace")["init_args"].get("reward", "exp") == "exp"
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(row, sort_keys=False))
    cli = _ParseOnlyCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(path)])
    replace = next(cb for cb in cli.config.trainer.callbacks if cb.class_path.endswith("LayerReplace"))
    assert replace.init_args.reward == "relative"


def test_h_row_is_scaleot_with_measured_importance_and_parses(tmp_path) -> None:
    ablation = _ablation()
    base = yaml.safe_load((REPO / ablation.BASE_CONFIG).read_text())
    row = ablation.row_config(base, "h", "bbc_news", 0, tmp_path)
    assert ablation._callback(row, "EmulatorExport")["init_args"]["importance"] == "measured"
    assert ablation._callback(row, "LayerReplace")["init_args"].get("reward", "exp") == "exp"
    path = tmp_path / "h.yaml"
    path.write_text(yaml.safe_dump(row, sort_keys=False))
    cli = _ParseOnlyCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(path)])
    export = next(cb for cb in cli.config.trainer.callbacks if cb.class_path.endswith("EmulatorExport"))
    assert export.init_args.importance == "measured"


# --- owner-budget scaling: the summary's table and plot -----------------------------------------------------------


def _row(
    arms: dict[str, float],
    stage1: float,
    cpu: float | None = None,
    distill: float | None = None,
    kept: str | None = None,
    kept_distilled: float | None = None,
) -> dict:
    report = {
        "settings": {"full_zs": {"acc": 0.5}, "ft": {"acc": 0.9}},
        "arms": {
            name: {"emulator_zs": 0.3, "emulator_ft": 0.6, "plug_in": plug, "gap": 1.0, "params_ratio": 0.66}
            for name, plug in arms.items()
        },
        "stage_seconds": {"stage-1 / distillation (fit)": stage1},
        "emulator": {"kept matrices: relative error to the original (min–max)": kept} if kept else {},
    }
    if cpu is not None:
        report["row"] = {"cpu_seconds": cpu}
    if distill is not None:  # the in-process OT + KD arm's record
        near = {} if kept_distilled is None else {"kept_closeness": {"min_rel_error": kept_distilled}}
        report["uniform_drop_distillation"] = {n: {"seconds": distill} | near for n in arms if "_kd" in n}
    return report


def test_owner_budget_table_pairs_each_point_with_its_row_and_arm(tmp_path) -> None:
    ablation = _ablation()
    ot = f"ot_uniform_drop_2-{ablation.EMULATOR_LAYERS}-2"
    rows = {
        "a_d_seed0": _row({"scaleot": 0.70, ot: 0.80}, 100.0),
        "a_d_seed1": _row({"scaleot": 0.60, ot: 0.90}, 120.0),
        "d300_seed0": _row({"scaleot": 0.75, ot: 0.80}, 300.0, cpu=900.0, kept="0.019–0.300"),
        "akd100_seed0": _row(
            {"scaleot": 0.71, f"{ot}_kd100": 0.85}, 90.0, cpu=500.0, distill=40.0, kept_distilled=0.004
        ),
    }
    (tmp_path / "bbc_news").mkdir()
    for name, report in rows.items():
        (tmp_path / "bbc_news" / f"{name}.json").write_text(json.dumps(report))
    series = ablation.owner_budget(tmp_path, "bbc_news")
    scaleot, kd = series["(d) ScaleOT"], series["(a) OT 2-13-2 + KD"]
    assert sorted(scaleot) == [100, 300] and sorted(kd) == [0, 100]  # only the points that landed
    assert [v["plug_in"] for v in scaleot[100]] == pytest.approx([70.0, 60.0])
    assert [v["plug_in"] for v in kd[0]] == pytest.approx([80.0, 90.0])  # OT undistilled = (a) at 0 steps
    assert kd[0][0]["stage1_seconds"] == 0.0  # no owner steps spent on OT's plain drop
    assert kd[100][0]["plug_in"] == pytest.approx(85.0) and kd[100][0]["cpu_seconds"] == 500.0
    assert kd[100][0]["stage1_seconds"] == 40.0  # the owner's distillation, not the row's ScaleOT stage 1
    lines = ablation.budget_lines(tmp_path)
    assert "| bbc_news | (d) ScaleOT | 100 | 2 | 65.0 ± 7.1 | 110 | – | – |" in lines  # rows before the record
    assert "| bbc_news | (d) ScaleOT | 300 | 1 | 75.0 | 300 | 900 | 0.019 (n=1) |" in lines  # the export's own
    assert "| bbc_news | (a) OT 2-13-2 + KD | 0 | 2 | 85.0 ± 7.1 | 0 | – | 0.000 (n=2) |" in lines  # the originals
    assert "| bbc_news | (a) OT 2-13-2 + KD | 100 | 1 | 85.0 | 40 | 500 | 0.004 (n=1) |" in lines  # distilled
    written = ablation.write_summary(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    d300 = next(line for line in summary.splitlines() if line.startswith("| bbc_news | d300: scaleot |"))
    assert d300.endswith("| -5.0 | 5.0 | — | 4.0 |")  # seed 0: OT's (80), (d)'s a_d (70), no e row, akd100's (71)
    scaleot = next(line for line in summary.splitlines() if line.startswith("| bbc_news | a_d: scaleot |"))
    assert scaleot.endswith("| -20.0 ± 14.1 | — | — | -1.0 |")  # against OT on the same seeds, not against itself
    assert (tmp_path / "summary.md").read_text().count("| bbc_news |") == 6 + 4  # (row, arm) pairs + budget points
    if importlib.util.find_spec("matplotlib") is not None:
        assert str(tmp_path / "owner_budget.png") in written and (tmp_path / "owner_budget.png").stat().st_size > 0


def test_update_docs_rewrites_the_guides_generated_block(tmp_path) -> None:
    """What each landing row calls: the guide's block is rewritten from the new summary, never left stale."""
    ablation = _ablation()
    ot = f"ot_uniform_drop_2-{ablation.EMULATOR_LAYERS}-2"
    (tmp_path / "bbc_news").mkdir()
    (tmp_path / "bbc_news" / "a_d_seed0.json").write_text(json.dumps(_row({"scaleot": 0.70, ot: 0.80}, 100.0)))
    doc = tmp_path / "guide.md"
    doc.write_text("# Guide\n\n<!-- offsite-ablation -->\nold table\n<!-- /offsite-ablation -->\n\nprose\n")
    ablation.write_summary(tmp_path)
    assert ablation.update_docs(tmp_path, [str(doc)]) == [str(doc)]
    text = doc.read_text()
    assert "old table" not in text and text.endswith("<!-- /offsite-ablation -->\n\nprose\n")
    assert "| bbc_news | a_d: scaleot | 1 |" in text and f"<!-- result: {tmp_path.as_posix()}/summary.md" in text


def test_a_guide_without_the_block_is_refused_before_any_row_runs(tmp_path, monkeypatch) -> None:
    ablation = _ablation()
    doc = tmp_path / "guide.md"
    doc.write_text("# Guide without the generated block\n")
    argv = ["offsite_ablation.py", "--arms", "a_d", "--seeds", "0", "--tasks", "bbc_news", "--docs", str(doc)]
    monkeypatch.setattr(sys, "argv", argv + ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exited:
        ablation.main()
    assert exited.value.code == 2 and not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_ablation_rows_start_from_scaleot_as_published_not_from_the_main_jobs_defaults() -> None:
    """The rows that ran stay reproducible when the main job's defaults change: their base is the published recipe."""
    ablation = _ablation()
    base = yaml.safe_load((REPO / ablation.BASE_CONFIG).read_text())
    replace = ablation._callback(base, "LayerReplace")["init_args"]
    assert replace.get("stand_ins", "trained") == "trained" and replace["warm_start_batches"] == 16
    assert replace.get("reward", "exp") == "exp" and base["trainer"]["max_steps"] == 100
    assert base["model"]["init_args"]["lr"] == 1.0e-3  # the harmonizers are trained
    export = ablation._callback(base, "EmulatorExport")["init_args"]
    assert (export["adapter_layers"], export["alpha"], export["beta"], export["beta_mlp"]) == (4, 0.5, 0.8, 0.9)


@pytest.mark.parametrize(("arm", "steps"), [("dfresh", 100), ("d300fresh", 300)])
def test_fresh_owner_text_rows_see_each_block_once(tmp_path, arm: str, steps: int) -> None:
    ablation = _ablation()
    base = yaml.safe_load((REPO / ablation.BASE_CONFIG).read_text())
    row = ablation.row_config(base, arm, "bbc_news", 1, tmp_path)
    data = row["data"]["init_args"]
    assert row["trainer"]["max_steps"] == steps and data["max_train_blocks"] == steps * data["batch_size"]
    assert base["data"]["init_args"]["max_train_blocks"] < data["max_train_blocks"]  # the config cycles fewer blocks
    assert row["model"] == base["model"] and ablation._callback(row, "LayerReplace") == ablation._callback(
        base, "LayerReplace"
    )


def test_dlr_row_is_scaleot_with_a_tenth_of_the_harmonizer_learning_rate(tmp_path) -> None:
    ablation = _ablation()
    base = yaml.safe_load((REPO / ablation.BASE_CONFIG).read_text())
    row = ablation.row_config(base, "dlr", "bbc_news", 0, tmp_path)
    assert row["model"]["init_args"]["lr"] == pytest.approx(base["model"]["init_args"]["lr"] / 10)
    assert ablation._callback(row, "LayerReplace") == ablation._callback(base, "LayerReplace")  # warm start kept


def test_dim_row_is_scaleot_with_the_imitation_term(tmp_path) -> None:
    ablation = _ablation()
    base = yaml.safe_load((REPO / ablation.BASE_CONFIG).read_text())
    row = ablation.row_config(base, "dim", "tweets", 2, tmp_path)
    assert base["model"]["init_args"].get("imitation_weight", 0.0) == 0.0  # the published stage 1: LM loss only
    assert row["model"]["init_args"] == base["model"]["init_args"] | {"imitation_weight": ablation.IMITATION_WEIGHT}
    assert ablation.IMITATION_WEIGHT > 0
    assert ablation._callback(row, "LayerReplace") == ablation._callback(base, "LayerReplace")


def test_scaleot_d_is_paired_with_each_of_its_runs(tmp_path) -> None:
    ablation = _ablation()
    ot = f"ot_uniform_drop_2-{ablation.EMULATOR_LAYERS}-2"
    rows = {
        "a_d_seed0": _row({"scaleot": 0.70, ot: 0.80}, 100.0),
        "e_seed0": _row({"scaleot": 0.60, "scaleot_no_src": 0.66}, 250.0),  # (d) again, and (e) beside it
        "f_seed0": _row({"scaleot": 0.65}, 250.0),
        "akd100_seed0": _row({"scaleot": 0.62, f"{ot}_kd100": 0.75}, 250.0),  # (d) a third time, OT + KD beside it
    }
    (tmp_path / "tweets").mkdir()
    for name, report in rows.items():
        (tmp_path / "tweets" / f"{name}.json").write_text(json.dumps(report))
    lines = ablation.summarise(tmp_path).splitlines()
    f = next(line for line in lines if line.startswith("| tweets | f: scaleot |"))
    assert f.endswith("| -15.0 | -5.0 | 5.0 | 3.0 |")  # against OT (80), (d) in a_d (70), in e (60), in akd100 (62)
    e = next(line for line in lines if line.startswith("| tweets | e: scaleot |"))
    assert e.endswith("| -20.0 | -10.0 | — | -2.0 |")  # the runs of (d) differ; not against itself
    akd = next(line for line in lines if line.startswith("| tweets | akd100: scaleot |"))
    assert akd.endswith("| -18.0 | -8.0 | 2.0 | — |")
