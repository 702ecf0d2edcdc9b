"""The sandwich split of a transformer stack and per-family tables of the linears inside a block.

Offsite-Tuning (arXiv 2302.04870) splits the ``L`` blocks of a model into a trainable **adapter** (the
bottom ``l`` and top ``r`` blocks) and a frozen **middle** ``[l, L - r)`` that the model owner compresses
into an emulator. Threat model: the data owner receives the adapters and a lossy emulator of the middle,
never the original middle blocks; the model owner never sees the data.

The block list itself is reached through :mod:`privtune.models.blocks`; this module adds what the
emulator needs on top: validated split indices and, per architecture family, which linears form the
attention (compressed by SRC / GradOT DRD) and the MLP (pruned by GradOT SCP).

=========  ===============================================  ===========================  ===============
family     attention linears                                MLP input linears            MLP output
=========  ===============================================  ===========================  ===============
llama      self_attn.{q,k,v,o}_proj                         mlp.gate_proj, mlp.up_proj   mlp.down_proj
gpt2       attn.c_attn (fused q|k|v), attn.c_proj (Conv1D)  mlp.c_fc                     mlp.c_proj
opt        self_attn.{q,k,v,out}_proj                       fc1                          fc2
bert       attention.self.{query,key,value},                intermediate.dense           output.dense
           attention.output.dense
=========  ===============================================  ===========================  ===============
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from privtune.models import family as model_family


@dataclass(frozen=True)
class BlockLinears:
    """Paths (relative to one block) of the linears the compressors touch."""

    attention: tuple[str, ...]
    mlp_in: tuple[str, ...]
    mlp_out: str


FAMILY_LINEARS: dict[str, BlockLinears] = {
    "llama": BlockLinears(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj",
    ),
    "gpt2": BlockLinears(("attn.c_attn", "attn.c_proj"), ("mlp.c_fc",), "mlp.c_proj"),
    "opt": BlockLinears(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"), ("fc1",), "fc2"
    ),
    "bert": BlockLinears(
        (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ),
        ("intermediate.dense",),
        "output.dense",
    ),
}


def block_linears(model: nn.Module) -> BlockLinears:
    """The :class:`BlockLinears` row of ``model``'s architecture family."""
    return FAMILY_LINEARS[model_family(model)]


@dataclass(frozen=True)
class SandwichSplit:
    """Bottom adapter ``[0, bottom)``, middle ``[bottom, L - top)``, top adapter ``[L - top, L)``.

    Raises:
        ValueError: if a count is negative or the adapters leave no middle block.
    """

    num_layers: int
    bottom: int = 2
    top: int = 2

    def __post_init__(self) -> None:
        problems = []
        for name, value in (("adapter_bottom", self.bottom), ("adapter_top", self.top)):
            if value < 0:
                problems.append(f"`{name}={value}` must be >= 0")
        if self.num_layers - self.bottom - self.top < 1:
            problems.append(
                f"`adapter_bottom={self.bottom}` + `adapter_top={self.top}` leaves no middle block in a model with "
                f"{self.num_layers} blocks; allowed: adapter_bottom + adapter_top <= {self.num_layers - 1}"
            )
        if problems:
            raise ValueError("Invalid sandwich split: " + "; ".join(problems) + ".")

    @property
    def bottom_indices(self) -> list[int]:
        """Original indices of the bottom adapter blocks."""
        return list(range(self.bottom))

    @property
    def top_indices(self) -> list[int]:
        """Original indices of the top adapter blocks."""
        return list(range(self.num_layers - self.top, self.num_layers))

    @property
    def adapter_indices(self) -> list[int]:
        """Original indices of every adapter block, bottom then top."""
        return self.bottom_indices + self.top_indices

    @property
    def middle_indices(self) -> list[int]:
        """Original indices of the middle blocks, in depth order."""
        return list(range(self.bottom, self.num_layers - self.top))


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c`` for ``path="a.b.c"``."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at ``path`` under ``root``."""
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    setattr(parent, name, module)


def linear_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(W [d_out, d_in], bias [d_out] | None)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (``x @ W + b``).

    GPT-2's ``Conv1D`` stores its weight transposed (``[d_in, d_out]``); the returned matrix is always in the
    ``nn.Linear`` layout so the compressors need one code path.
    """
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise TypeError(f"Expected a linear layer with a 2-D weight, got {type(module).__name__}.")
    w = weight.T if type(module).__name__ == "Conv1D" else weight
    return w, getattr(module, "bias", None)


def as_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A fresh ``nn.Linear`` holding copies of ``weight [d_out, d_in]`` and ``bias``."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer
