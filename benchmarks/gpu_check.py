"""GPU check: the data owner's step on a ScaleOT emulator against the full model, in bf16, on random-init Llamas.

Offsite-Tuning (arXiv 2302.04870) and ScaleOT (arXiv 2412.09812) sell the emulator as cheaper to tune through
than the full model. This measures that claim where it matters, on a CUDA device, with nothing but this repository
(no download, no internet): it builds random-init Llama models of SmolLM2-135M's shape and of a ~1B shape
(TinyLlama-1.1B's: 22 blocks, hidden 2048), builds the ScaleOT emulator of each (N_a = 4, α = 0.5, β = 0.8,
β_mlp = 0.9, rank-64 harmonizers; the layer scores are random, which does not change the cost) with privtune's
own builder, and times the data owner's step on both: the same four adapter blocks (0, 1, L-2, L-1) trainable in
fp32, everything else frozen in bf16, bf16 autocast, AdamW, causal-LM loss on random tokens. It prints, per shape,
step time, tokens/s, MFU (FLOPs counted by ``torch.utils.flop_counter`` over the device's dense bf16 peak) and peak
memory, each as a ratio emulator / full, and writes them to a JSON file with the command, commit and date.

Both shapes took 20.5 s on one H200 (``benchmarks/results/gpu_check/``). CI does not run it; ``--smoke`` runs tiny
shapes on the CPU (tests/test_gpu_check.py).

Run::

    HF_HUB_OFFLINE=1 python benchmarks/gpu_check.py --out benchmarks/results/gpu_check/gpu_check.json
    # on a machine that holds a copy of the tree, name the commit it was copied from
    python benchmarks/gpu_check.py --out gpu_check.json --tree-commit "$(git rev-parse HEAD)"
    python benchmarks/gpu_check.py --smoke
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

from privtune.emulator import build_scaleot_emulator, make_harmonizers
from privtune.eval.provenance import run_provenance
from privtune.models import get_blocks

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, without sparsity.
PEAK_BF16 = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "A100": 312e12}

SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct's config (the packaged model privtune tunes on the CPU)
    "smollm2-135m": {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
    },
    # TinyLlama-1.1B's config, a ~1B Llama
    "llama-1.1b": {
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False,
    },
    # --smoke: a tiny Llama for the CPU
    "tiny": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True,
    },
}  # fmt: skip


@dataclass
class StepCost:
    """One mode's cost: seconds per step, tokens/s, FLOPs per step, MFU, peak memory (bytes; None on the CPU)."""

    params: int
    trainable: int
    step_seconds: float
    tokens_per_second: float
    flops_per_step: float
    mfu: float | None
    peak_memory_bytes: int | None


def device_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The dense bf16 peak of ``device`` in FLOP/s (``--peak-tflops`` wins); ``None`` where unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if all(part in name for part in key.split()):
            return peak
    return None


def random_llama(shape: str, device: torch.device, seed: int = 0) -> nn.Module:
    """A random-init ``LlamaForCausalLM`` of the named shape, fp32, on ``device``."""
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    with device:
        return LlamaForCausalLM(config).eval()


def scaleot_emulator(model: nn.Module, adapter_layers: int = 4) -> nn.Module:
    """privtune's ScaleOT emulator of ``model`` (α = 0.5, β = 0.8, β_mlp = 0.9, rank 64), random layer scores."""
    depth = len(get_blocks(model))
    middle = list(range(adapter_layers // 2, depth - adapter_layers // 2))
    hidden = model.config.hidden_size
    rank = min(64, hidden // 2)
    harmonizers = make_harmonizers(hidden, middle, rank=rank).to(next(model.parameters()).device)
    scores = torch.randn(len(middle), generator=torch.Generator().manual_seed(0))
    emulator, _ = build_scaleot_emulator(model, scores, harmonizers, adapter_layers, 0.5, 0.8, 0.9, rank)
    return emulator


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention while FLOPs are counted, then restore its own implementation.

    torch's FLOP counter cannot size grouped-query SDPA (fewer key/value heads than query heads) on some versions
    (seen on torch 2.11 + CUDA); eager attention runs the same two matrix products on repeated key/value heads, so
    the count is the one SDPA's formula gives. The timed steps run SDPA.
    """
    configs = {id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)}
    before = {key: c._attn_implementation for key, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = "eager"
    try:
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]


def prepare_for_data_owner(model: nn.Module, adapter_blocks: list[int], half: torch.dtype) -> list[nn.Parameter]:
    """Adapter blocks trainable in fp32; every other weight frozen and cast to ``half`` (OT's precision recipe)."""
    model.requires_grad_(False)
    blocks = get_blocks(model)
    trainable = [p for i in adapter_blocks for p in blocks[i].parameters()]
    for p in trainable:
        p.requires_grad_(True)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(half)
    model.train()
    return trainable


def time_data_owner_step(
    model: nn.Module, batch: int, length: int, steps: int, warmup: int, peak: float | None, autocast: bool
) -> StepCost:
    """Warm up, count one step's FLOPs, then time ``steps`` AdamW steps of the adapter blocks."""
    device = next(model.parameters()).device
    depth = len(get_blocks(model))
    trainable = prepare_for_data_owner(model, [0, 1, depth - 2, depth - 1], torch.bfloat16)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), device=device, generator=torch.Generator(device).manual_seed(0))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    counter = FlopCounterMode(display=False)
    with eager_attention(model), counter:
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    flops = float(counter.get_total_flops())
    return StepCost(
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in trainable),
        step_seconds=seconds,
        tokens_per_second=batch * length / seconds,
        flops_per_step=flops,
        mfu=flops / seconds / peak if peak else None,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )


def ratio(emulator: float | None, full: float | None) -> float | None:
    """``emulator / full``, or ``None`` where either is unknown."""
    return emulator / full if emulator is not None and full else None


def check_shape(shape: str, device: torch.device, args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    """Both modes for one shape, each on a freshly built model (the emulator is built from the full model)."""
    autocast = device.type == "cuda" or args.smoke
    full = random_llama(shape, device)
    emulator = scaleot_emulator(full)
    del full  # the emulator holds copies; build the full model afresh so both start from the same state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    emu = time_data_owner_step(emulator, args.batch, args.length, args.steps, args.warmup, peak, autocast)
    del emulator
    if device.type == "cuda":
        torch.cuda.empty_cache()
    full_cost = time_data_owner_step(
        random_llama(shape, device), args.batch, args.length, args.steps, args.warmup, peak, autocast
    )
    row = {"emulator": emu.__dict__, "full": full_cost.__dict__}
    row["emulator_over_full"] = {
        "params": emu.params / full_cost.params,
        "step_seconds": emu.step_seconds / full_cost.step_seconds,
        "tokens_per_second": emu.tokens_per_second / full_cost.tokens_per_second,
        "mfu": ratio(emu.mfu, full_cost.mfu),
        "peak_memory": ratio(emu.peak_memory_bytes, full_cost.peak_memory_bytes),
    }
    return row


def markdown(results: dict[str, dict[str, Any]], device_name: str) -> str:
    """One table: per shape and mode, the costs; and the emulator / full ratios."""

    def pct(x: float | None) -> str:
        return f"{100 * x:.1f}%" if x is not None else "n/a"

    def mib(x: int | None) -> str:
        return f"{x / 2**20:,.0f}" if x is not None else "n/a"

    def num(x: float | None, fmt: str = ".2f") -> str:
        return format(x, fmt) if x is not None else "n/a"

    lines = [
        f"Data owner's step, bf16 autocast, 4 adapter blocks trainable (fp32), rest frozen (bf16); {device_name}.",
        "",
        "| shape | mode | params | s/step | tokens/s | MFU | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, row in results.items():
        for mode in ("emulator", "full"):
            c = row[mode]
            lines.append(
                f"| {shape} | {mode} | {c['params'] / 1e6:.1f} M | {c['step_seconds']:.4f} | "
                f"{c['tokens_per_second']:,.0f} | {pct(c['mfu'])} | {mib(c['peak_memory_bytes'])} |"
            )
        r = row["emulator_over_full"]
        lines.append(
            f"| {shape} | **emulator / full** | {r['params']:.3f} | {r['step_seconds']:.2f} | "
            f"{r['tokens_per_second']:.2f} | {num(r['mfu'])} | {num(r['peak_memory'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (what the tests run)")
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; smoke 2)")
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence (default 512; smoke 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if unlisted")
    parser.add_argument("--out", default=None, help="JSON result file (a .md table is written beside it)")
    parser.add_argument(
        "--tree-commit", default=None, help="the commit a copied working tree came from (recorded as the commit)"
    )
    args = parser.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        args.shapes = args.shapes or ["tiny"]
        args.batch, args.length, args.steps = args.batch or 2, args.length or 16, args.steps or 2
        args.warmup = min(args.warmup, 1)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: this check is for a GPU machine (use --smoke for the CPU mechanics check)")
        device = torch.device("cuda", torch.cuda.current_device())
        args.shapes = args.shapes or ["smollm2-135m", "llama-1.1b"]
        args.batch, args.length, args.steps = args.batch or 8, args.length or 512, args.steps or 10
    peak = device_peak_flops(device, args.peak_tflops)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    start = time.perf_counter()
    results = {shape: check_shape(shape, device, args, peak) for shape in args.shapes}
    table = markdown(results, device_name)
    print(table, flush=True)
    provenance = run_provenance()
    if args.tree_commit:  # a copied tree: the machine's own git view (if any) may be another commit plus edits
        provenance |= {"commit": args.tree_commit, "machine_git_commit": provenance["commit"]}
    report = provenance | {
        "device": device_name,
        "peak_bf16_flops": peak,
        "torch": torch.__version__,
        "args": vars(args),
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
