"""Peak memory and time of a federated simulation with many clients in one process (2 CPU threads).

Every client keeps only its prefix tensor, its optimizer moments and (SCAFFOLD) a control variate
(:class:`privtune.federated.ClientStore`), so the memory beyond the one shared frozen model grows by a few hundred KB
per client. Two modes:

* default: ``--rounds`` rounds of ``train.py``'s Lightning path with every client sampled; peak RSS and the bytes
  held by client states;
* ``--config``: a privtune federated config (e.g. ``configs/fed_prompt/fedpeptao_code.yaml``) scaled to
  ``--clients`` clients with a cohort of ``--sample-fraction`` per round, run by the core loop
  (:class:`privtune.federated.loop.FederatedLoop`, what the Lightning Strategy drives) so that each phase is timed
  apart: building the model and the partition, set-up (FedPepTAO's layer scoring runs one forward pass per client
  over all ``N`` clients, spec §5), each round, and the final evaluation over every client; peak RSS after each.

Usage::

    python benchmarks/federated_memory.py --model smollm2-135m-instruct --clients 100 \
        --out benchmarks/results/federated_memory
    nice -n 5 python benchmarks/federated_memory.py --config configs/fed_prompt/fedpeptao_code.yaml \
        --clients 1000 --sample-fraction 0.01 --rounds 3 --train-size 1800 --out benchmarks/results/federated_memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--server", default="FedPepTAOServer", help="a server class of privtune.federated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/federated_memory")
    parser.add_argument("--config", default=None, help="a privtune federated config: the phase-timed scale mode")
    parser.add_argument("--sample-fraction", type=float, default=0.01, help="with --config: the cohort per round")
    parser.add_argument("--train-size", type=int, default=1800, help="with --config: training examples in all")
    parser.add_argument("--test-size", type=int, default=100, help="with --config: evaluation examples in all")
    parser.add_argument("--name", default=None, help="with --config: result file stem (default model_N_cohortM)")
    args = parser.parse_args()
    if args.config is not None:
        scale(args)
        return

    import lightning.pytorch as pl
    import torch

    import privtune.federated
    from privtune.datamodules import BBCNews, TweetsSentiment
    from privtune.datamodules.federated import FederatedDataModule
    from privtune.modules.prompt_tuning import PromptTuning
    from privtune.strategies import FederatedConfig, FederatedSimulation

    torch.set_num_threads(args.threads)
    decoder = "smollm2" in args.model or "llama" in args.model
    inner_cls = TweetsSentiment if decoder else BBCNews
    inner = inner_cls(
        train_size=4 * args.clients, val_size=20, test_size=100, max_length=32, batch_size=4, eval_batch_size=32
    )
    data = FederatedDataModule(inner, num_clients=args.clients, alpha=0.5, seed=42)
    module = PromptTuning(model=args.model, num_virtual_tokens=5, **({} if decoder else {"num_labels": 5}))
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = FederatedConfig(
        num_rounds=args.rounds,
        sample_fraction=1.0,
        server=getattr(privtune.federated, args.server)(),
        layers="fedpeptao",
        local_max_steps=1,
        eval_every=args.rounds,
    )
    strategy = FederatedSimulation(federated=config)
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    runner = strategy.runner
    result = {
        "model": args.model,
        "clients": args.clients,
        "clients_with_state": len(runner.store.clients),
        "rounds": args.rounds,
        "server": args.server,
        "torch_threads": args.threads,
        "prefix_elements_per_client": runner.store.initial_prompt.numel(),
        "client_state_bytes_total": runner.store.nbytes(),
        "client_state_bytes_per_client": runner.store.nbytes() // max(1, len(runner.store.clients)),
        "server_state_bytes": sum(
            t.numel() * t.element_size() for s in runner.server.c_clients.values() for t in s.values()
        )
        if hasattr(runner.server, "c_clients")
        else 0,
        "peak_rss_bytes_after_model_load": rss_model,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "fit_seconds": seconds,
        "final_personalized_acc": runner.history[-1].get("fed/personalized_acc"),
        "command": " ".join(["python", *sys.argv]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}_{args.clients}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _peak_rss() -> int:
    """The process's peak resident set size so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def scale(args: argparse.Namespace) -> None:
    """The ``--config`` mode: the config at ``N = --clients`` with a cohort per round, each phase timed."""
    import torch
    import yaml

    from privtune.eval.provenance import run_provenance
    from privtune.federated.loop import FederatedLoop
    from privtune.flower.run import build_client_side, federated_config

    if args.clients < 1 or args.rounds < 1 or not 0 < args.sample_fraction <= 1:
        raise ValueError(
            f"`--clients` and `--rounds` must be >= 1 and `--sample-fraction` in (0, 1]; got {args.clients}, "
            f"{args.rounds}, {args.sample_fraction}."
        )
    if args.train_size < args.clients:
        raise ValueError(f"`--train-size={args.train_size}` gives some of the {args.clients} clients no example.")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    raw: dict[str, Any] = yaml.safe_load(Path(args.config).read_text())
    raw["trainer"].pop("default_root_dir", None)
    fed = raw["trainer"]["strategy"]["init_args"]["federated"]
    fed.update(num_rounds=args.rounds, sample_fraction=args.sample_fraction, eval_every=args.rounds)
    fed.pop("report_dir", None)
    data_args = raw["data"]["init_args"]
    data_args["num_clients"] = args.clients
    data_args.pop("partition_dir", None)
    data_args["datamodule"]["init_args"].update(train_size=args.train_size, val_size=16, test_size=args.test_size)
    model = raw["model"]["init_args"]["model"]

    start = time.perf_counter()
    cfg = federated_config(raw)
    side = build_client_side(raw, partial=cfg.layers != "all")
    build_seconds = time.perf_counter() - start
    rss_build = _peak_rss()
    loop = FederatedLoop(cfg)
    start = time.perf_counter()
    loop.setup(side.client, side.data)
    setup_seconds = time.perf_counter() - start
    rss_setup = _peak_rss()
    rounds: list[dict[str, float]] = []
    while True:
        start = time.perf_counter()
        metrics = loop.run_round()
        if not metrics:
            break
        seconds = time.perf_counter() - start
        rounds.append(
            {
                "round": int(metrics["round"]),
                "seconds": seconds,
                "clients": int(metrics["clients/reported"]),
                "evaluated": "fed/personalized_acc" in metrics,
                "peak_rss_bytes": _peak_rss(),
            }
        )
    store = loop.store
    assert store is not None
    train_rounds = [r["seconds"] for r in rounds if not r["evaluated"]] or [rounds[0]["seconds"]]
    result = {
        "mode": "config",
        "config": args.config,
        "model": model,
        "server": type(loop.server).__name__,
        "layers": cfg.layers,
        "selected_layers": loop.selected,
        "clients": args.clients,
        "sample_fraction": args.sample_fraction,
        "cohort": rounds[0]["clients"] if rounds else 0,
        "rounds": args.rounds,
        "train_size": args.train_size,
        "test_size": args.test_size,
        "local_epochs": cfg.local_epochs,
        "torch_threads": args.threads,
        "build_seconds": build_seconds,
        "setup_seconds": setup_seconds,
        "round_seconds": [r["seconds"] for r in rounds],
        "mean_train_round_seconds": sum(train_rounds) / len(train_rounds),
        "last_round_includes_evaluation_of_all_clients": True,
        "per_round": rounds,
        "clients_with_state": len(store.clients),
        "client_state_bytes_total": store.nbytes(),
        "prefix_elements_per_client": store.initial_prompt.numel() if store.initial_prompt is not None else 0,
        "peak_rss_bytes_after_build": rss_build,
        "peak_rss_bytes_after_setup": rss_setup,
        "peak_rss_bytes": _peak_rss(),
        "rss_goal_bytes": 8 * 1024**3,
        "rss_goal_met": _peak_rss() <= 8 * 1024**3,
        "final_personalized_acc": loop.history[-1].get("fed/personalized_acc") if loop.history else None,
        "final_global_acc": loop.history[-1].get("fed/global_acc") if loop.history else None,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "provenance": run_provenance(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{model}_{args.clients}_cohort{result['cohort']}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(_scale_markdown(result))
    print(_scale_markdown(result))


def _scale_markdown(r: dict[str, Any]) -> str:
    """The scale result as a short Markdown summary."""
    gib = 1024**3
    rows = "\n".join(
        f"| {x['round']} | {x['clients']} | {x['seconds']:.2f} | {x['peak_rss_bytes'] / gib:.2f} |"
        + (" with evaluation of every client |" if x["evaluated"] else " |")
        for x in r["per_round"]
    )
    prov = r["provenance"]
    return (
        f"# {r['clients']} simulated clients, cohort {r['cohort']} per round: {r['model']}, {r['server']}\n\n"
        f"Config `{r['config']}` scaled: {r['train_size']} training examples over {r['clients']} clients, "
        f"{r['rounds']} rounds, {r['torch_threads']} torch threads, layers `{r['layers']}` "
        f"(selected {r['selected_layers']}).\n\n"
        f"| phase | seconds | peak RSS (GiB) |\n| --- | --- | --- |\n"
        f"| build model + data partition | {r['build_seconds']:.2f} | {r['peak_rss_bytes_after_build'] / gib:.2f} |\n"
        f"| set-up (layer scoring over all clients) | {r['setup_seconds']:.2f} | "
        f"{r['peak_rss_bytes_after_setup'] / gib:.2f} |\n\n"
        f"| round | clients | seconds | peak RSS (GiB) | |\n| --- | --- | --- | --- | --- |\n{rows}\n\n"
        f"- peak RSS {r['peak_rss_bytes'] / gib:.2f} GiB (goal <= 8 GiB: {'met' if r['rss_goal_met'] else 'missed'}); "
        f"client states {r['client_state_bytes_total'] / 1024**2:.2f} MiB for {r['clients_with_state']} clients.\n"
        f"- mean training round {r['mean_train_round_seconds']:.2f} s; final personalised accuracy "
        f"{r['final_personalized_acc']}, global {r['final_global_acc']}.\n"
        f"- load average before / after: {r['loadavg_before']} / {r['loadavg_after']} on {r['cpu_count']} CPUs.\n\n"
        f"`{prov['command']}` at commit `{prov['commit']}`, {prov['date_utc']}.\n"
    )


if __name__ == "__main__":
    main()
