"""How every privtune LightningModule builds its optimizer and writes trainable-only checkpoints."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.cli import OptimizerCallable


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    factory: OptimizerCallable | None,
    lr: float,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Build the optimizer over ``params`` (the ones that require grad, after any model surgery).

    ``factory`` (a ``class_path`` / ``init_args`` optimizer from YAML) picks the algorithm and its other
    arguments; AdamW with ``weight_decay`` when it is ``None``. ``lr`` is the one learning rate: it is set
    on every parameter group, so ``--model.init_args.lr`` always wins.
    """
    params = list(params)
    if factory is None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    optimizer = factory(params)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return optimizer


def keep_trainable_tensors(module: torch.nn.Module, checkpoint: dict) -> None:
    """Drop every frozen tensor from ``checkpoint["state_dict"]`` (in place).

    The frozen rest of the model is rebuilt from its name or folder when the module is built again, so a
    LoRA, prompt or adapter checkpoint holds only what training changed. Modules that use this set
    ``strict_loading = False`` so the partial state dict loads.
    """
    keep = {name for name, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
