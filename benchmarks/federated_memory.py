"""Peak memory of a federated simulation with many clients in one process (2 CPU threads).

Every client keeps only its prefix tensor, its optimizer moments and (SCAFFOLD) a control variate
(:class:`privtune.federated.ClientStore`), so the memory beyond the one shared frozen model grows by a few hundred KB
per client. This runs ``--rounds`` rounds with every client sampled and reports the process's peak RSS and the bytes
held by client states.

Usage::

    python benchmarks/federated_memory.py --model smollm2-135m-instruct --clients 100 \
        --out benchmarks/results/federated_memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
