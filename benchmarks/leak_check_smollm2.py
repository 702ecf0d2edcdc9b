"""The emulator leak check on SmolLM2-135M: how close SRC leaves each middle matrix, what it refuses, what it costs.

For every middle matrix of SmolLM2-135M-Instruct (blocks 2..27, ``N_a = 4``) and each rank fraction ``β``: the
relative Frobenius error and cosine of its truncated SVD to the original (what a kept block ships), the
``β`` above which the rounded rank is full, and whether the leak check (threshold ``1e-2``) passes it. Then
the check itself on ScaleOT's default emulator (``α = 0.5``, ``β = 0.8``, ``β_mlp = 0.9``) with its wall
time, and with each injected variant of one original matrix (refused or not).

    python benchmarks/leak_check_smollm2.py            # writes benchmarks/results/leak_check/smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from privtune.emulator import build_scaleot_emulator, make_harmonizers
from privtune.emulator.leak_check import (
    DEFAULT_MIN_REL_ERROR,
    check_no_original,
    emulator_matrices,
    nearest_originals,
    original_middle_matrices,
)
from privtune.eval.provenance import run_provenance
from privtune.models import get_blocks, load_model

VARIANTS = {
    "exact copy": lambda w, g: w.clone(),
    "row permutation": lambda w, g: w[torch.randperm(w.shape[0], generator=g)],
    "column permutation": lambda w, g: w[:, torch.randperm(w.shape[1], generator=g)],
    "x(1+1e-6)": lambda w, g: w * (1 + 1e-6),
    "bf16 round trip": lambda w, g: w.to(torch.bfloat16).float(),
    "1e-9 noise": lambda w, g: w + 1e-9 * torch.randn(w.shape, generator=g),
    "negation": lambda w, g: -w,
    "2W": lambda w, g: 2 * w,
    "transpose": lambda w, g: w.T.contiguous(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/leak_check/smollm2.json")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.99])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("smollm2-135m-instruct").eval()
    blocks = get_blocks(model)
    middle = list(range(2, len(blocks) - 2))
    spectra: dict[str, dict[str, list[float]]] = {}
    for idx in middle:
        for name, module in blocks[idx].named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            weight = module.weight.detach().float()
            s = torch.linalg.svdvals(weight)
            kind = name.rpartition(".")[2]
            for beta in args.betas:
                rank = max(1, round(beta * min(weight.shape)))
                err = float((s[rank:].square().sum() / s.square().sum()).sqrt())
                spectra.setdefault(kind, {}).setdefault(f"{beta:g}", []).append(err)
    per_matrix = {
        kind: {
            beta: {
                "min_rel_error": min(v),
                "max_rel_error": max(v),
                "min_cosine": (1 - max(v) ** 2) ** 0.5,
                "passes_leak_check": min(v) >= DEFAULT_MIN_REL_ERROR,
            }  # fmt: skip
            for beta, v in by_beta.items()
        }
        for kind, by_beta in spectra.items()
    }
    harmonizers = make_harmonizers(model.config.hidden_size, middle, 64, seed=0)
    scores = torch.linspace(-1.0, 1.0, len(middle), dtype=torch.float64)
    emulator, plan = build_scaleot_emulator(model, scores, harmonizers, 4, 0.5, 0.8, 0.9, 64)
    state = {k: v.detach() for k, v in emulator.state_dict().items()}
    start = time.perf_counter()
    near = check_no_original(state, model, plan)
    check_seconds = time.perf_counter() - start
    nearest = min(near.values(), key=lambda c: c.rel_error)
    originals = original_middle_matrices(model, plan)
    source = blocks[middle[len(middle) // 2]].mlp.gate_proj.weight.detach().float()
    injected = {}
    for label, make in VARIANTS.items():
        smuggled = make(source, torch.Generator().manual_seed(1))
        found = nearest_originals(emulator_matrices({"smuggled": smuggled}), originals)["smuggled"]
        injected[label] = {**found.to_dict(), "refused": found.rel_error < DEFAULT_MIN_REL_ERROR}
    result = {
        **run_provenance(),
        "model": "smollm2-135m-instruct",
        "threshold": DEFAULT_MIN_REL_ERROR,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "svd_truncation_per_matrix_kind": per_matrix,
        "default_scaleot_emulator": {
            "knobs": {"adapter_layers": 4, "alpha": 0.5, "beta": 0.8, "beta_mlp": 0.9},
            "checked_matrices": len(near),
            "passes": nearest.rel_error >= DEFAULT_MIN_REL_ERROR,
            "nearest": nearest.to_dict(),
            "check_seconds": round(check_seconds, 2),
        },
        "injected_variants_of_gate_proj": injected,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["default_scaleot_emulator"], indent=2))
    print({k: v["refused"] for k, v in injected.items()})


if __name__ == "__main__":
    main()
