"""FedPepTAO against its baselines on one setup: the same clients, rounds and local work, one row per method.

Runs ``train.py fit`` once per method on a base config (configs/fed_prompt/), overriding only the server optimizer
and which layers' prefixes are federated, then writes ``comparison.md`` / ``comparison.json`` and
``accuracy_per_round.png`` under ``--out``.

Usage::

    python benchmarks/federated_compare.py --config configs/fed_prompt/fedpeptao_code.yaml \
        --out benchmarks/results/federated_minilm_bbc --target 0.6
    python benchmarks/federated_compare.py --config configs/fed_prompt/smollm2_tweets_fedpeptao.yaml \
        --out benchmarks/results/federated_smollm2_tweets --target 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# label -> (output folder, overrides of trainer.strategy.init_args.federated)
METHODS: dict[str, tuple[str, list[str]]] = {
    "FedPepTAO (50% layers)": ("fedpeptao", ["server=privtune.federated.FedPepTAOServer", "layers=fedpeptao"]),
    "FedAvg (all layers)": ("fedavg", ["server=privtune.federated.FedAvg", "layers=all"]),
    "FedProx mu=0.01 (all layers)": (
        "fedprox_mu_0_01",
        ["server=privtune.federated.FedAvg", "layers=all", "proximal_mu=0.01"],
    ),
    "SCAFFOLD (all layers)": ("scaffold", ["server=privtune.federated.Scaffold", "layers=all"]),
    "FedAdam (all layers)": ("fedadam", ["server=privtune.federated.FedAdam", "layers=all"]),
    # spec §12 setting (b): FedPepTAO's layer selection with the FedAvg server isolates the selection gain
    "FedAvg (FedPepTAO's 50% layers)": ("fedavg_selected", ["server=privtune.federated.FedAvg", "layers=fedpeptao"]),
    "FedPepTAO clean preset (50% layers)": (
        "fedpeptao_clean",
        ["server=privtune.federated.FedPepTAOServer", "server.init_args.preset=clean", "layers=fedpeptao"],
    ),
}
# The same-bytes control (FedAvg on FedPepTAO's layers) is part of every default comparison.
DEFAULT_METHODS = list(METHODS)[:6]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", type=float, default=None, help="accuracy for 'rounds to target'")
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, help="method labels (see METHODS)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs' report.json")
    # any other argument (``--trainer.x=1``, ``--data.init_args.y=2``) is passed on to every train.py run
    args, extra = parser.parse_known_args()
    bad = [a for a in extra if not a.startswith(("--trainer.", "--model.", "--data.", "--seed_everything"))]
    if bad:
        hint = "train.py overrides start with --trainer., --model. or --data."
        parser.error(f"unrecognized arguments: {' '.join(bad)} ({hint})")

    from privtune.federated.report import write_comparison
    from train import main as train_main

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for label in args.methods:
        slug = METHODS[label][0]
        if args.resume and (out / slug / "report.json").exists():
            report = json.loads((out / slug / "report.json").read_text())
            if report.get("label") == label:
                runs.append(report)
                continue
        slug, method_overrides = METHODS[label]
        run_dir = out / slug
        fed = "--trainer.strategy.init_args.federated."
        overrides = [f"{fed}{o}" for o in method_overrides]
        overrides += [
            f"{fed}report_dir={run_dir}",
            f"--trainer.default_root_dir={run_dir}",
            f"--data.init_args.partition_dir={run_dir}",
            *extra,
        ]
        start = time.perf_counter()
        train_main(["fit", "--config", args.config, *overrides])
        report = json.loads((run_dir / "report.json").read_text())
        report["label"] = label
        report["wall_seconds"] = time.perf_counter() - start
        (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
        runs.append(report)
        print(f"{label}: {report['history'][-1]} ({report['wall_seconds']:.0f} s)", flush=True)
    table = write_comparison(out, runs, args.target, title=Path(args.config).stem)
    print(table)


if __name__ == "__main__":
    main()
