"""Run the tiny federated job across 2 gloo DDP ranks (or in one process) and save the final prompt.

Usage: python tests/ddp_scripts/fed_ddp.py OUT_DIR {ddp,single} [server class name in privtune.federated] [dp]

With ``dp``, the run adds client-level DP (every rank must draw the same noise).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import privtune.federated  # noqa: E402
from privtune.strategies import final_prompt  # noqa: E402
from tests.ddp_scripts.fed_common import run  # noqa: E402


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    server = getattr(privtune.federated, sys.argv[3] if len(sys.argv) > 3 else "FedPepTAOServer")()
    out.mkdir(parents=True, exist_ok=True)
    fed = {"layers": "fedpeptao", "num_selected_layers": 2, "num_rounds": 3, "server": server}
    if len(sys.argv) > 4 and sys.argv[4] == "dp":
        fed["client_dp"] = privtune.federated.ClientLevelDP(clipping_norm=0.05, noise_multiplier=0.5, delta=1e-3)
    if mode == "ddp":
        trainer, strategy = run(out, ddp=True, devices=2, **fed)
    else:
        trainer, strategy = run(out, **fed)
    if trainer.global_rank == 0:
        torch.save(
            {
                "prompt": final_prompt(strategy),
                "clients": {k: v.prompt for k, v in strategy.loop.store.clients.items()},
                "history": strategy.loop.history,
                "world_size": trainer.world_size,
            },
            out / f"result_{mode}.pt",
        )


if __name__ == "__main__":
    main()
