"""The privacy frontier: row names checked before work, a row end to end (tiny model), reuse, and the summaries."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from privtune.eval import frontier
from privtune.eval.frontier import ROWS, attack_validity, best_valid, check_rows, row_file, summarise, write_summary

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.init_args.model=tiny-llama",
    "data.init_args.train_size=16",
    "data.init_args.test_size=16",
    "data.init_args.max_length=32",
    "trainer.max_epochs=1",
]


def _script():
    spec = importlib.util.spec_from_file_location("privacy_frontier", REPO / "benchmarks" / "privacy_frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interval(value: float, low: float, high: float) -> dict[str, float]:
    return {"value": value, "low": low, "high": high}


def _report(auc: float, negative: tuple[float, float] = (0.4, 0.6)) -> dict:
    attack = {"auc": _interval(auc, auc - 0.05, auc + 0.05), "tpr@1%": _interval(0.02, 0.0, 0.05)}
    return {
        "attacks": {"loss": attack, "zlib": {**attack, "auc": _interval(auc - 0.01, auc - 0.06, auc + 0.04)}},
        "negative_control": {name: {"auc": _interval(0.5, *negative)} for name in ("loss", "zlib")},
    }


CONTROLS = {"verdicts": {"loss": {"positive": True}, "zlib": {"positive": True}}}


def _row_file(out: Path, name: str, seed: int, acc: float, auc: float, eps: float | None = None) -> None:
    report = _report(auc)
    validity = attack_validity(report, CONTROLS)
    data = {
        "row": name,
        "label": ROWS[name].label,
        "family": ROWS[name].family,
        "seed": seed,
        "accuracy": {"acc": acc, "f1": acc, "n": 128},
        "best_attack": best_valid(report, validity),
        "membership": report,
        "dp": {"epsilon": eps} if eps else None,
        "wall_seconds": 100.0 + seed,
        "cpu_seconds": 150.0,
        "bytes": {"tuned": 1_000_000},
        "steps": 48,
        "regime": {"text": "BBCNews, 128 members, 3 epochs"},
        "provenance": {"commit": "abc", "command": "x", "date_utc": "today"},
    }
    path = row_file(out, name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _blocked(monkeypatch) -> None:
    """A row still waiting for a hook (every row of the frontier runs now)."""
    row = frontier.Row("blocked_x", "Blocked row", "shaking", needs="a hook named here")
    monkeypatch.setitem(frontier.ROWS, row.name, row)


def test_bad_rows_rejected_with_one_error_before_any_work(tmp_path, monkeypatch):
    _blocked(monkeypatch)
    with pytest.raises(ValueError, match="unknown row") as err:
        check_rows(["lora", "nope", "lorra", "blocked_x", "shaking_hv", "fedavg"])
    message = str(err.value)
    assert "nope" in message and "lorra" in message  # every bad name at once
    assert "`blocked_x` needs a hook named here" in message  # a blocked row names its hook
    assert "`shaking_hv`" not in message  # the shaking rows run
    assert "`fedavg`" not in message  # the federated rows run
    with pytest.raises(ValueError, match="at least one row"):
        check_rows([])
    assert [r.name for r in check_rows(["all"])] == [r.name for r in ROWS.values() if r.runnable]
    assert [r.name for r in check_rows(["lora", "zero_shot"])] == ["zero_shot", "lora"]  # the frontier's order
    with pytest.raises(ValueError, match="unknown row"):
        _script().main(["--rows", "zero_shot", "nope", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # refused before any run or file


def _federated(cfg: dict) -> dict | None:
    strategy = cfg["trainer"].get("strategy")
    return strategy["init_args"]["federated"] if strategy else None


def test_row_configs_share_one_regime():
    configs = sorted((REPO / "configs" / "frontier").glob("*.yaml"))
    runnable = {r.config for r in ROWS.values() if r.runnable}
    assert {str(p.relative_to(REPO)) for p in configs} == runnable
    regimes = set()
    for path in configs:
        cfg = yaml.safe_load(path.read_text())
        if _federated(cfg) is not None or path.name.startswith("offsite_"):
            continue  # test_federated_row_configs_carry_the_regime, test_offsite_row_configs_carry_the_regime
        assert cfg["trainer"]["callbacks"][-1]["class_path"].endswith("MembershipAudit"), path  # seed override
        data = cfg["data"]
        regimes.add((data["class_path"], json.dumps(data["init_args"], sort_keys=True), cfg["trainer"]["max_epochs"]))
        model = cfg["model"]["init_args"]["model"]  # shaking rows: SmolLM2 implanted under the key
        assert model == "smollm2-135m-instruct" or path.name.startswith("shaking_"), path
    assert len(regimes) == 1  # same data, split sizes, members and epochs for every row


def test_summary_table_and_plot_from_row_files(tmp_path, monkeypatch):
    _blocked(monkeypatch)
    for seed, (acc, auc) in enumerate([(0.9, 0.70), (0.92, 0.74), (0.88, 0.72)]):
        _row_file(tmp_path, "full_ft", seed, acc, auc)
    _row_file(tmp_path, "lora", 0, 0.85, 0.60)
    for name, eps, acc, auc in (("dp_sgd_eps1", 1, 0.5, 0.5), ("dp_sgd_eps3", 3, 0.6, 0.52)):
        _row_file(tmp_path, name, 0, acc, auc, eps=eps)
    paths = write_summary(tmp_path, {"command": "cmd", "commit": "abc", "date_utc": "today"}, root=REPO)
    assert [p.name for p in paths] == ["frontier.json", "frontier.md", "frontier.png"]
    assert paths[2].stat().st_size > 1000
    summary = json.loads(paths[0].read_text())
    rows = {r["row"]: r for r in summary["rows"]}
    assert list(rows) == list(ROWS)  # every row, run or not
    full = rows["full_ft"]
    assert full["status"] == "done" and full["seeds"] == [0, 1, 2]
    assert full["accuracy"]["mean"] == pytest.approx(0.9) and full["accuracy"]["std"] == pytest.approx(0.02)
    assert full["auc"]["mean"] == pytest.approx(0.72) and full["best_attack"] == ["loss"]
    assert full["leak_measurable"] == [True, True, True]
    assert rows["lora"]["status"] == "partial: 1 of 3 seeds"
    assert rows["zero_shot"]["status"] == "not yet run"
    assert rows["fedavg"]["status"] == "not yet run" and "needs" not in rows["fedavg"]
    assert rows["shaking_hv"]["status"] == "not yet run" and "needs" not in rows["shaking_hv"]
    assert rows["blocked_x"]["status"] == "not yet run: needs a hook" and rows["blocked_x"]["needs"]
    assert rows["dp_sgd_eps3"]["epsilon"]["mean"] == 3
    assert rows["shaking_hv"]["token_recovery"]["file"] == "benchmarks/results/decipher_shaking/rows/bbc_same_hv.json"
    assert summary["goal"] == {"decided": False, "why": "no privtune method without formal DP has run yet"}
    text = paths[1].read_text()
    assert "| Full fine-tuning, non-private | done | 3 | 0.900 ± 0.020 | 0.720 ± 0.020 (loss)" in text
    assert "Fewer than 3 seeds" in text and "LoRA (r=8), non-private" in text
    assert "- Blocked row (`blocked_x`): a hook named here." in text  # a row still blocked names its hook
    assert "`offsite_scaleot`" not in text  # the offsite rows run


def test_federated_row_configs_carry_the_regime():
    """Same members, same held-out split, 3 passes on average: the federated rows face the central rows' audit."""
    central = yaml.safe_load((REPO / ROWS["lora"].config).read_text())
    federated = [r for r in ROWS.values() if r.family == "federated"]
    assert [r.name for r in federated] == ["fedpeptao", "fedavg", "fedpeptao_client_dp", "fedavg_client_dp"]
    for row in federated:
        assert row.runnable and not row.needs
        cfg = yaml.safe_load((REPO / row.config).read_text())
        fed, data = _federated(cfg), cfg["data"]["init_args"]
        assert "callbacks" not in cfg["trainer"]  # MembershipAudit is refused in federated runs
        assert data["datamodule"] == central["data"]  # the same 128 members and 128 held-out test examples
        assert data["num_clients"] == 20 and data["partition"] == "dirichlet_label" and data["alpha"] == 0.5
        assert data["eval_split"] == "test"  # accuracy and non-members: the held-out test split
        cohort = math.ceil(fed["sample_fraction"] * data["num_clients"])
        passes = fed["num_rounds"] * cohort / data["num_clients"] * fed["local_epochs"]
        assert passes == central["trainer"]["max_epochs"] == 3
        assert fed["membership_audit"] is True and fed["membership_examples"] >= 128
        assert cfg["model"]["init_args"]["model"] == "smollm2-135m-instruct"
        assert fed["layers"] == ("fedpeptao" if row.name.startswith("fedpeptao") else "all")
        server = fed["server"]["class_path"]
        assert server.endswith("FedPepTAOServer" if row.name.startswith("fedpeptao") else ".FedAvg")
        if row.name.startswith("fedpeptao"):  # the code's chained momentum diverges at 1 local step (drift warning)
            assert fed["server"]["init_args"] == {"options": {"momentum_mode": "round_start"}}
        dp = fed.get("client_dp")
        assert (dp is not None) == row.name.endswith("client_dp")
        if dp:
            assert dp["target_epsilon"] == 8 and "ε=8" in row.label and dp["delta"] < 1 / data["num_clients"]


FED_TINY = [
    "model.init_args.model=tiny-llama",
    "model.init_args.num_virtual_tokens=2",
    "data.init_args.datamodule.init_args.train_size=24",
    "data.init_args.datamodule.init_args.test_size=16",
    "data.init_args.datamodule.init_args.max_length=32",
    "data.init_args.num_clients=4",
    "trainer.strategy.init_args.federated.num_rounds=2",
    "trainer.strategy.init_args.federated.sample_fraction=0.5",
    "trainer.strategy.init_args.federated.eval_every=2",
    "trainer.strategy.init_args.federated.membership_examples=16",
]
SCHEMA = {
    "row", "label", "family", "seed", "config", "overrides", "regime", "accuracy", "best_attack", "validity",
    "membership", "dp", "steps", "wall_seconds", "cpu_seconds", "fit_wall_seconds", "fit_cpu_seconds", "bytes",
    "trainable_parameters", "machine", "provenance",
}  # fmt: skip


@pytest.mark.assets
@pytest.mark.slow
def test_federated_rows_run_through_the_federated_branch(tmp_path, monkeypatch):
    script = _script()
    out, runs = tmp_path / "out", tmp_path / "runs"
    controls = {"verdicts": {"loss": {"positive": True}}}
    monkeypatch.setattr(sys, "argv", ["privacy_frontier.py"])
    for name in ("fedpeptao_client_dp", "fedavg"):
        script.run_row(ROWS[name], 1, out, runs, FED_TINY, controls)
    dp_row = json.loads(row_file(out, "fedpeptao_client_dp", 1).read_text())
    plain = json.loads(row_file(out, "fedavg", 1).read_text())
    for data in (dp_row, plain):
        assert data.keys() >= SCHEMA and data["seed"] == 1 and data["family"] == "federated"
        assert data["regime"]["members"] == 24 and data["regime"]["nonmembers"] == 16
        assert data["regime"]["clients"] == 4 and data["regime"]["epochs"] == 1.0  # 2 rounds x 2 of 4 clients
        assert 0 <= data["accuracy"]["acc"] <= 1 and data["accuracy"]["n"] == 16
        assert data["membership"]["meta"]["model"] == "global"  # the row's attack is the global model's
        assert data["best_attack"]["attack"] == "loss" and data["validity"]["loss"]["valid"] is True
        bytes_ = data["bytes"]
        assert bytes_["communicated"] == bytes_["up"] + bytes_["down"] > 0 and bytes_["tuned"] > 0
        assert data["steps"] > 0 and data["federated"]["rounds_run"] == 2 and data["wall_seconds"] > 0
        assert "--trainer.strategy.init_args.federated.seed=1" in data["overrides"]
        assert "--data.init_args.datamodule.init_args.seed=1" in data["overrides"]
    assert dp_row["dp"]["level"] == "client" and 0 < dp_row["dp"]["epsilon"] <= 8.0  # client-level ε spent
    assert dp_row["dp"]["noise_multiplier"] > 0
    personal = dp_row["personalised"]  # FedPepTAO's personal layers: their audit beside the global one
    assert personal["membership"]["meta"]["model"] == "personalised" and personal["validity"]["loss"]["valid"]
    assert 0 <= dp_row["accuracy"]["personalised"] <= 1
    assert plain["dp"] is None and plain["federated"]["layers"] == "all"
    # FedAvg federates every layer: a client's personalised model is the global model, and both audits agree
    assert plain["accuracy"]["personalised"] == plain["accuracy"]["acc"]
    assert plain["personalised"]["membership"]["attacks"] == plain["membership"]["attacks"]
    assert (runs / "fedavg" / "seed1" / "report" / "partition_train.json").exists()
    summary = {r["row"]: r for r in summarise(out)["rows"]}
    assert summary["fedavg"]["communicated_bytes"]["mean"] == plain["bytes"]["communicated"]
    assert summary["fedpeptao_client_dp"]["epsilon"]["mean"] == dp_row["dp"]["epsilon"]
    assert "personalised_accuracy" in summary["fedpeptao_client_dp"]


def _pipeline_args(cfg: dict) -> dict:
    callbacks = cfg["trainer"]["callbacks"]
    assert callbacks[-1]["class_path"].endswith("OffsitePipeline")  # last: the frontier sets its seeds
    assert any(cb["class_path"].endswith("EmulatorExport") for cb in callbacks)
    return callbacks[-1]["init_args"]


def test_offsite_row_configs_carry_the_regime():
    """The data owner's members and held-out split are lora.yaml's; 48 steps = 3 epochs; audit and extraction on."""
    central = yaml.safe_load((REPO / ROWS["lora"].config).read_text())
    data, epochs = central["data"]["init_args"], central["trainer"]["max_epochs"]
    offsite = [r for r in ROWS.values() if r.family == "offsite"]
    assert [r.name for r in offsite] == ["offsite_ot_uniform", "offsite_scaleot", "offsite_gradot"]
    assert ROWS["offsite_ot_uniform"].config == ROWS["offsite_scaleot"].config  # one run, both rows
    for row in offsite:
        assert row.runnable and not row.needs
        cfg = yaml.safe_load((REPO / row.config).read_text())
        owner = _pipeline_args(cfg)
        assert owner["task"] == "bbc_news" and cfg["model"]["init_args"]["model"] == "smollm2-135m-instruct"
        for key in ("train_size", "val_size", "test_size", "max_length", "batch_size"):
            assert owner[key] == data[key], key  # make_datamodule draws the same split with the same seed
        assert owner["train_size"] == owner["test_size"] == owner["audit_examples"] == 128
        assert owner["max_steps"] == epochs * math.ceil(owner["train_size"] / owner["batch_size"]) == 48
        assert owner["membership_audit"] is True and owner["audit_reference"] is True
        assert owner["extraction"] is True
        assert cfg["data"]["init_args"]["source"] == "tweets"  # the model owner's public text holds no member
    scaleot = yaml.safe_load((REPO / ROWS["offsite_scaleot"].config).read_text())
    assert _pipeline_args(scaleot)["uniform_drop_layers"] == 13
    assert scaleot["model"]["class_path"].endswith("HarmonizerImportance")
    assert (
        yaml.safe_load((REPO / ROWS["offsite_gradot"].config).read_text())["model"]["init_args"]["method"] == "gradot"
    )


@pytest.mark.assets
@pytest.mark.parametrize("seed", [0, 2])
def test_offsite_members_and_nonmembers_are_the_central_rows(seed):
    from privtune.datamodules import BBCNews
    from privtune.recipes.offsite import PipelineSettings, make_datamodule

    central = yaml.safe_load((REPO / ROWS["lora"].config).read_text())["data"]["init_args"] | {"seed": seed}
    owner = _pipeline_args(yaml.safe_load((REPO / ROWS["offsite_gradot"].config).read_text())) | {"seed": seed}
    pipeline, lora = (
        make_datamodule(PipelineSettings(**owner), "tiny-llama"),
        BBCNews(**central, tokenizer="tiny-llama"),
    )
    for dm in (pipeline, lora):
        dm.setup("fit")
    for split in ("train", "val", "test"):
        assert pipeline.splits[split].texts == lora.splits[split].texts, split
        assert list(pipeline.splits[split].labels) == list(lora.splits[split].labels), split


def _tiny_offsite(path: Path) -> str:
    """configs/frontier/offsite_scaleot.yaml shrunk to a tiny random Llama and a handful of BBC News examples."""
    cfg = yaml.safe_load((REPO / ROWS["offsite_scaleot"].config).read_text())
    cfg["trainer"]["max_steps"] = 1
    cfg["model"]["init_args"] |= {"model": "tiny-llama", "lr": 1e-2}
    cfg["data"]["init_args"] |= {"block_size": 32, "max_train_blocks": 8, "max_val_blocks": 4}
    replace, export, pipeline = (cb["init_args"] for cb in cfg["trainer"]["callbacks"])
    replace |= {"adapter_bottom": 1, "adapter_top": 1, "harmonizer_rank": 8, "group_size": 2, "num_candidates": 2}
    replace["warm_start_batches"] = 0
    export |= {"adapter_layers": 2, "alpha": 0.5, "beta": 0.5, "beta_mlp": 0.75}
    pipeline |= {"train_size": 16, "val_size": 4, "test_size": 12, "max_length": 32, "max_steps": 2, "lr": 1e-2}
    pipeline |= {"uniform_drop_layers": 1, "audit_examples": 16, "audit_reference": False}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.assets
def test_one_offsite_run_writes_both_rows(tmp_path, monkeypatch):
    script = _script()
    tiny = _tiny_offsite(tmp_path / "tiny.yaml")
    for name in ("offsite_scaleot", "offsite_ot_uniform"):
        monkeypatch.setitem(ROWS, name, frontier.Row(name, ROWS[name].label, "offsite", tiny))
    out, runs = tmp_path / "out", tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", ["privacy_frontier.py"])
    controls = {"verdicts": {"loss": {"positive": True}}}
    script.run_row(ROWS["offsite_scaleot"], 1, out, runs, [], controls)
    scaleot = json.loads(row_file(out, "offsite_scaleot", 1).read_text())
    uniform = json.loads(row_file(out, "offsite_ot_uniform", 1).read_text())  # from the same run
    report = json.loads((runs / "offsite_scaleot" / "seed1" / "pipeline" / "offsite_report.json").read_text())
    assert report["meta"]["seed"] == report["meta"]["audit_seed"] == 1
    for data, arm in ((scaleot, "scaleot"), (uniform, "ot_uniform_drop_1-1-1")):
        assert data.keys() >= SCHEMA and data["seed"] == 1 and data["family"] == "offsite"
        assert data["accuracy"]["arm"] == arm and data["accuracy"]["acc"] == report["arms"][arm]["plug_in"]
        assert data["membership"] == report["membership"][arm] and data["membership"]["meta"]["model"] == arm
        assert data["best_attack"]["attack"] == "loss" and data["validity"]["loss"]["valid"] is True
        assert data["full_ft"]["membership"]["meta"]["model"] == "full_ft" and data["full_ft"]["best_attack"]
        assert data["regime"]["members"] == 16 and data["regime"]["nonmembers"] == 12
        assert data["regime"]["epochs"] == 1.0 and data["steps"] == 2  # 2 steps over 16 members at batch 8
        assert data["bytes"]["communicated"] == data["bytes"]["up"] + data["bytes"]["down"]
        assert data["bytes"]["tuned"] > 0 and data["trainable_parameters"] > 0
        assert data["wall_seconds"] == scaleot["wall_seconds"] > 0 and data["dp"] is None
        assert "OffsitePipeline.audit_seed=1" in data["overrides"]
    assert scaleot["extraction"]["gap_points"] == report["extraction_gap_points"] is not None
    assert uniform["extraction"] == {"accuracy": None, "gap_points": None}  # no shipped emulator to extract
    assert uniform["bytes"]["up"] > 0 and not uniform["offsite"]["emulator_shipped"]
    summary = {r["row"]: r for r in summarise(out)["rows"]}
    assert summary["offsite_scaleot"]["extraction_gap_points"]["mean"] == report["extraction_gap_points"]
    assert "extraction_gap_points" not in summary["offsite_ot_uniform"]

    import train

    def refuse(*args, **kwargs):
        raise AssertionError("a finished row must be reused, not rerun")

    monkeypatch.setattr(train, "main", refuse)
    script.run_row(ROWS["offsite_ot_uniform"], 1, out, runs, [], controls)  # written by the ScaleOT run: reused


@pytest.mark.assets
def test_gradot_row_runs_training_free(tmp_path, monkeypatch):
    cfg = yaml.safe_load((REPO / ROWS["offsite_gradot"].config).read_text())
    assert cfg["trainer"]["max_steps"] == 0  # GradOT's emulator is built from calibration batches, not trained
    cfg["model"]["init_args"] |= {"model": "tiny-llama", "adapter_bottom": 1, "adapter_top": 1, "calib_batches": 1}
    cfg["model"]["init_args"] |= {"rank_budget": 0.5, "channel_budget": 0.5}
    cfg["data"]["init_args"] |= {"block_size": 32, "max_train_blocks": 8, "max_val_blocks": 4}
    pipeline = _pipeline_args(cfg)
    pipeline |= {"train_size": 16, "val_size": 4, "test_size": 12, "max_length": 32, "max_steps": 2, "lr": 1e-2}
    pipeline |= {"audit_examples": 16, "audit_reference": False}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setitem(
        ROWS, "offsite_gradot", frontier.Row("offsite_gradot", "GradOT", "offsite", str(tmp_path / "tiny.yaml"))
    )
    monkeypatch.setattr(sys, "argv", ["privacy_frontier.py"])
    path = _script().run_row(ROWS["offsite_gradot"], 2, tmp_path / "out", tmp_path / "runs", [], CONTROLS)
    data = json.loads(path.read_text())
    assert data.keys() >= SCHEMA and data["accuracy"]["arm"] == "gradot" and data["shared_run"] == ["offsite_gradot"]
    assert data["membership"]["meta"]["model"] == "gradot" and data["offsite"]["emulator_shipped"]
    assert data["extraction"]["gap_points"] is not None and 0 <= data["extraction"]["accuracy"] <= 1
    assert data["bytes"]["down"] > data["bytes"]["up"] > 0
    assert [p.name for p in (tmp_path / "out" / "rows").iterdir()] == ["offsite_gradot_seed2.json"]


def test_a_family_without_a_runner_is_refused_before_any_work(tmp_path):
    script = _script()
    row = frontier.Row("other_x", "Other", "other", "configs/frontier/lora.yaml")
    assert "other" not in script.RUNNERS and script.RUNNERS["federated"] is script.run_federated
    assert script.RUNNERS["offsite"] is script.run_offsite
    with pytest.raises(ValueError, match="no runner for the 'other' family"):
        script.run_row(row, 0, tmp_path / "out", tmp_path / "runs", [], None)
    assert not (tmp_path / "runs").exists()


def test_invalid_attacks_are_not_used():
    report = _report(0.8, negative=(0.6, 0.7))  # both negative controls exclude 0.5
    assert best_valid(report, attack_validity(report, CONTROLS)) is None
    report = _report(0.8)
    validity = attack_validity(report, {"verdicts": {"loss": {"positive": False}, "zlib": {"positive": True}}})
    assert not validity["loss"]["valid"] and "positive control failed" in validity["loss"]["reason"]
    assert best_valid(report, validity)["attack"] == "zlib"
    assert not any(v["valid"] for v in attack_validity(report, None).values())  # no controls: nothing is valid


def test_token_recovery_reads_the_decipher_file():
    tok = frontier.token_recovery(REPO / ROWS["shaking_hv"].decipher)
    data = json.loads((REPO / ROWS["shaking_hv"].decipher).read_text())
    assert tok["stream_tokens"] == max(data["a3"]["stream_tokens"], data["bigram"]["stream_tokens"]) > 0


@pytest.mark.assets
@pytest.mark.slow
def test_row_runs_end_to_end_then_is_reused(tmp_path, monkeypatch):
    script = _script()
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--rows", "lora", "--seeds", "1", "--out", str(out), "--run-root", str(runs)]
    argv += [a for s in TINY for a in ("--set", s)]
    monkeypatch.setattr(sys, "argv", ["privacy_frontier.py"])
    script.main(argv)
    data = json.loads(row_file(out, "lora", 1).read_text())
    assert data["seed"] == 1 and data["steps"] == 2 and data["regime"]["members"] == 16
    assert data["membership"]["attacks"].keys() == {"loss", "reference", "min_k", "zlib"}
    assert 0 <= data["accuracy"]["acc"] <= 1 and data["accuracy"]["n"] == 16
    assert data["bytes"]["tuned"] > 0 and data["wall_seconds"] > 0 and data["provenance"]["date_utc"]
    assert data["validity"]["reference"]["valid"] is False  # failed its positive control on the real model
    assert (runs / "lora" / "seed1" / "membership_report.json").exists()
    assert "--trainer.callbacks.init_args.seed=1" in data["overrides"]
    before = row_file(out, "lora", 1).read_text()

    import train

    def refuse(*args, **kwargs):
        raise AssertionError("a finished row must be reused, not rerun")

    monkeypatch.setattr(train, "main", refuse)
    script.main(argv)  # reused: no training
    assert row_file(out, "lora", 1).read_text() == before
    rows = {r["row"]: r for r in summarise(out)["rows"]}
    assert rows["lora"]["status"] == "partial: 1 of 3 seeds"
    assert (out / "frontier.md").exists() and (out / "frontier.png").exists()


def test_docs_block_is_generated_from_the_frontier_file(tmp_path):
    _row_file(tmp_path, "lora", 0, 0.85, 0.60)
    write_summary(tmp_path, {"command": "cmd", "commit": "abc", "date_utc": "today"}, root=REPO)
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- privacy-frontier -->\nstale | 1 |\n<!-- /privacy-frontier -->\nafter\n")
    assert frontier.update_docs(doc, tmp_path)
    text = doc.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "| LoRA (r=8), non-private | partial: 1 of 3 seeds | 1 | 0.850 |" in text
    assert "![frontier](frontier.png)" in text  # the plot's path from the document's own folder
    nested = tmp_path / "docs" / "guide.md"
    nested.parent.mkdir()
    nested.write_text("<!-- privacy-frontier -->\n<!-- /privacy-frontier -->\n")
    assert frontier.update_docs(nested, tmp_path) and "![frontier](../frontier.png)" in nested.read_text()
    assert not frontier.update_docs(doc, tmp_path)  # regenerating an up-to-date block changes nothing
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        frontier.update_docs(doc, tmp_path)


def test_published_frontier_table_is_copied_from_its_result_file():
    doc = (REPO / "docs" / "privacy_audit.md").read_text()
    section = doc.split("<!-- privacy-frontier -->")[1].split("<!-- /privacy-frontier -->")[0]
    source = (REPO / "benchmarks" / "results" / "privacy_frontier" / "frontier.md").read_text()
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows and all(row in source for row in rows)
    assert "benchmarks/results/privacy_frontier/frontier.md" in section


def test_total_cost_counts_each_run_and_implant_once():
    """Two offsite rows written by one run count it once; one implanted model shared by three seeds counts once."""
    shared = ["offsite_ot_uniform", "offsite_scaleot"]
    implant = {"model": "runs/shaking/implanted", "cpu_seconds": 100.0}
    files = {
        "lora": [{"seed": s, "cpu_seconds": 10.0, "wall_seconds": 20.0} for s in (0, 1)],
        "offsite_scaleot": [{"seed": 0, "cpu_seconds": 500.0, "wall_seconds": 600.0, "shared_run": shared}],
        "offsite_ot_uniform": [{"seed": 0, "cpu_seconds": 500.0, "wall_seconds": 600.0, "shared_run": shared}],
        "shaking_hv": [{"seed": s, "cpu_seconds": 30.0, "wall_seconds": 40.0, "implant": implant} for s in (0, 1, 2)],
    }
    cost = frontier.total_cost(files)
    assert cost == {
        "runs": 2 + 1 + 3,
        "cpu_seconds": 20.0 + 500.0 + 90.0,
        "wall_seconds": 40.0 + 600.0 + 120.0,
        "implants": 1,
        "implant_cpu_seconds": 100.0,
    }
    text = frontier.markdown(
        {"rows": [], "seeds_expected": 3, "controls": "c", "goal": {"decided": False, "why": "x"}, "cost": cost}
    )
    assert "Total cost of the row files so far: 6 runs, 0.17 CPU hours" in text
