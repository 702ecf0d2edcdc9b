"""What a Flower deployment round costs against the in-process round loop on the same clients.

One config (a shrunk copy of ``configs/fed_prompt/fedpeptao_code.yaml``: FedPepTAO prompt tuning of
all-MiniLM-L6-v2 on BBC News, by default 4 clients all sampled every round, 3 rounds, 32 training examples per client)
runs twice with the same seed:

* in-process: :class:`privtune.federated.loop.FederatedLoop` over one client model (what ``train.py`` runs);
* deployment: one ``flower-superlink`` and one ``flower-supernode`` per client (insecure mode, localhost, free
  ports: :func:`privtune.flower.local.local_federation`), the run submitted with ``flwr run``; per-round wall time as
  the ServerApp measures it (``flower/round_wall_seconds`` in its ``report.json``: messages, ClientApp processes,
  server step).

Process start-up (SuperLink launch to the ServerApp's first line) and set-up (the ``query`` round: every node builds
the model and scores its layers; in-process: building the model and the loop's layer scoring) are reported apart
from the rounds. The last round includes the final evaluation in both drivers. The final global prompts are compared
(max abs difference). Every process started here is stopped (its whole process group) at the end, also on errors.

Threat model: none (a timing benchmark on localhost; insecure mode is for local testing only).

Usage (the committed result; about 3-5 minutes on 2 shared cores)::

    nice -n 5 python benchmarks/flower_round_overhead.py --out benchmarks/results/flower_round_overhead
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def derived_config(base: Path, folder: Path, clients: int, rounds: int, per_client: int) -> Path:
    """``base`` with ``clients`` clients all sampled, ``rounds`` rounds and ``per_client`` training examples each
    (no report or partition files), written to ``folder/config.yaml``."""
    raw = yaml.safe_load(base.read_text())
    raw["trainer"].pop("default_root_dir", None)
    fed = raw["trainer"]["strategy"]["init_args"]["federated"]
    fed.update(num_rounds=rounds, sample_fraction=1.0, eval_every=rounds)
    fed.pop("report_dir", None)
    data = raw["data"]["init_args"]
    data["num_clients"] = clients
    data.pop("partition_dir", None)
    data["datamodule"]["init_args"].update(train_size=per_client * clients, val_size=16, test_size=16 * clients)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def in_process(config: Path) -> dict[str, Any]:
    """The in-process loop on ``config``: model build, set-up (layer scoring) and per-round wall seconds."""
    from privtune.federated.loop import FederatedLoop
    from privtune.flower.run import build_client_side, federated_config, read_config

    start = time.perf_counter()
    raw = read_config(config)
    cfg = federated_config(raw)
    side = build_client_side(raw, partial=cfg.layers != "all")
    build = time.perf_counter() - start
    loop = FederatedLoop(cfg)
    start = time.perf_counter()
    loop.setup(side.client, side.data)
    setup = time.perf_counter() - start
    rounds = []
    while True:
        start = time.perf_counter()
        if not loop.run_round():
            break
        rounds.append(time.perf_counter() - start)
    return {
        "build_seconds": build,
        "setup_seconds": setup,
        "round_seconds": rounds,
        "selected_layers": loop.selected,
        "global_state": {k: v.detach().clone() for k, v in loop.global_state.items()},
        "personalized_acc": loop.history[-1].get("fed/personalized_acc"),
    }


def deployment(config: Path, folder: Path, clients: int, timeout: float) -> dict[str, Any]:
    """One SuperLink and ``clients`` SuperNodes on localhost running ``config``; the ServerApp's report and times."""
    import torch

    from privtune.flower.local import local_federation, write_app

    out = folder / "flower_out"
    app = write_app(folder / "app", config, out, node_wait_seconds=300)
    with local_federation(folder / "federation", clients) as federation:
        launched = federation.launched
        run = federation.run(app, timeout)
        deadline = time.monotonic() + 60
        while not (out / "report.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        finished = time.time()
        logs = federation.logs(2000)
    if not (out / "report.json").exists():
        raise RuntimeError(f"the Flower run wrote no report (rc={run.returncode}):\n{run.stdout[-2000:]}\n{logs}")
    report = json.loads((out / "report.json").read_text())
    timing = report["flower_timing"]
    return {
        "superlink_up_seconds": federation.superlink_up_seconds,
        "startup_seconds": timing["started_unix"] - launched,
        "setup_seconds": timing["setup_seconds"],
        "round_seconds": [h["flower/round_wall_seconds"] for h in report["history"]],
        # the slowest node's ClientApp process age at its train reply, and its model build (every message is a
        # new process in Flower 1.42)
        "client_process_seconds": [h.get("flower/client_process_seconds_max") for h in report["history"]],
        "client_build_seconds": [h.get("flower/client_build_seconds_max") for h in report["history"]],
        "total_seconds": finished - launched,
        "selected_layers": report["selected_layers"],
        "personalized_acc": report["history"][-1].get("fed/personalized_acc"),
        "global_state": torch.load(out / "global_prompt.pt", weights_only=True),
        "up_record_bytes": sum(h["flower/up_record_bytes"] for h in report["history"]),
        "ledger_up_bytes": report["ledger"]["up_bytes"],
    }


def _startup_lines(dep: dict[str, Any], inp: dict[str, Any]) -> list[str]:
    """Where a deployment round goes: the train message's ClientApp process (start-up, build) against the round."""
    ages = [a for a in dep.get("client_process_seconds", []) if a is not None]
    builds = [b for b in dep.get("client_build_seconds", []) if b is not None]
    if not ages:
        return []
    n = len(ages)
    extra = sum(dep["round_seconds"][:n]) / n - sum(inp["round_seconds"][:n]) / n
    return [
        f"- per round, the slowest node's train-message ClientApp process lived {sum(ages) / n:.2f} s on average "
        f"(start-up, imports, model build {sum(builds) / max(len(builds), 1):.2f} s, local training, reply) against "
        f"{extra:.2f} s of extra round time over in-process: Flower 1.42 starts a new ClientApp process for every "
        "message."
    ]


def markdown(result: dict[str, Any]) -> str:
    """The result as a short Markdown table."""
    dep, inp = result["deployment"], result["in_process"]
    rows = [
        "| round | in-process (s) | deployment (s) | deployment / in-process |",
        "| --- | --- | --- | --- |",
    ]
    for i, (a, b) in enumerate(zip(inp["round_seconds"], dep["round_seconds"], strict=True), start=1):
        rows.append(f"| {i} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    mean_in, mean_dep = result["mean_round_seconds"]["in_process"], result["mean_round_seconds"]["deployment"]
    rows.append(f"| mean | {mean_in:.2f} | {mean_dep:.2f} | {result['ratio_mean']:.2f}x |")
    prov = result["provenance"]
    return "\n".join(
        [
            f"# Flower deployment round vs in-process round: {result['name']}",
            "",
            f"{result['setting']}",
            "",
            *rows,
            "",
            f"- goal: deployment/in-process <= {result['goal_ratio']}x per round; "
            f"{'met' if result['goal_met'] else 'missed'} (mean ratio {result['ratio_mean']:.2f}x).",
            f"- set-up (query round / model build + layer scoring): deployment {dep['setup_seconds']:.2f} s, "
            f"in-process {inp['build_seconds'] + inp['setup_seconds']:.2f} s "
            f"(build {inp['build_seconds']:.2f} + scoring {inp['setup_seconds']:.2f}).",
            f"- process start-up (SuperLink launch to the ServerApp's first line): {dep['startup_seconds']:.2f} s "
            f"(SuperLink listening after {dep['superlink_up_seconds']:.2f} s); whole deployment "
            f"{dep['total_seconds']:.1f} s.",
            *_startup_lines(dep, inp),
            f"- final global prompts: max abs difference {result['max_abs_diff']:.3g}; selected layers equal: "
            f"{result['selected_layers_equal']}.",
            f"- load average before / after: {result['loadavg_before']} / {result['loadavg_after']} "
            f"on {result['cpu_count']} CPUs.",
            "",
            f"`{prov['command']}` at commit `{prov['commit']}`, {prov['date_utc']}.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(ROOT / "configs/fed_prompt/fedpeptao_code.yaml"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-client", type=int, default=32, help="training examples per client")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole Flower run")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads of every process (OMP_NUM_THREADS; 0: torch's default)"
    )
    parser.add_argument("--name", default="minilm_bbc_4clients")
    parser.add_argument("--out", default="benchmarks/results/flower_round_overhead")
    args = parser.parse_args()
    if args.clients < 1 or args.rounds < 1 or args.per_client < 1:
        parser.error("`--clients`, `--rounds` and `--per-client` must be >= 1.")

    if args.threads > 0:  # inherited by the SuperNodes' ClientApp processes and the ServerApp
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    from privtune.eval.provenance import run_provenance

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="privtune_flower_overhead_") as tmp:
        folder = Path(tmp)
        config = derived_config(Path(args.base), folder, args.clients, args.rounds, args.per_client)
        setting = yaml.safe_load(config.read_text())
        inp = in_process(config)
        dep = deployment(config, folder, args.clients, args.timeout)
    load_after = os.getloadavg()
    diff = max(float((dep["global_state"][k] - v).abs().max()) for k, v in inp["global_state"].items())
    mean_in = sum(inp["round_seconds"]) / len(inp["round_seconds"])
    mean_dep = sum(dep["round_seconds"]) / len(dep["round_seconds"])
    ratios = [b / a for a, b in zip(inp["round_seconds"], dep["round_seconds"], strict=True)]
    goal = 1.2
    result = {
        "name": args.name,
        "setting": (
            f"{Path(args.base).name} shrunk: {args.clients} clients (all sampled), {args.rounds} rounds, "
            f"{args.per_client} training examples per client; evaluation in the last round of both drivers; "
            "deployment: insecure localhost, one SuperNode per client, Flower's default subprocess isolation."
        ),
        "config": setting,
        "in_process": {k: v for k, v in inp.items() if k != "global_state"},
        "deployment": {k: v for k, v in dep.items() if k != "global_state"},
        "mean_round_seconds": {"in_process": mean_in, "deployment": mean_dep},
        "ratio_per_round": ratios,
        "ratio_mean": mean_dep / mean_in,
        "goal_ratio": goal,
        "goal_met": mean_dep / mean_in <= goal,
        "max_abs_diff": diff,
        "selected_layers_equal": inp["selected_layers"] == dep["selected_layers"],
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads or "default",
        "provenance": run_provenance(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
