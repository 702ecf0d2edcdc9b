"""Configuration of a federated prompt-tuning run: rounds, clients, local and server optimisation, layer choice.

One dataclass shared by the in-process and the DDP Strategy, so a YAML moves between them unchanged
(``strategy.init_args.federated: {...}``). Defaults follow the FedPepTAO code (arXiv 2310.15080, spec §5-§8)
where it is specific.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from privtune.federated.client import LocalConfig
from privtune.federated.fedopt import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, ServerOptimizer
from privtune.federated.fedpeptao import FedPepTAOOptions, FedPepTAOServer
from privtune.federated.sampling import check_fraction
from privtune.federated.scaffold import Scaffold

ServerName = Literal["fedpeptao", "fedavg", "fedavgm", "fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad"]
SERVERS: tuple[str, ...] = ("fedpeptao", "fedavg", "fedavgm", "fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad")
LayerChoice = Literal["all", "fedpeptao", "list"]


@dataclass
class FederatedConfig:
    """Everything the federated Strategy needs besides the model and the data.

    Attributes:
        num_rounds: federated rounds ``T``.
        sample_fraction: clients sampled per round, ``M = ceil(fraction * N)``, in ``(0, 1]``.
        dropout_fraction: fraction of sampled clients that never report, in ``[0, 1)``.
        straggler_fraction: fraction of reporting clients that run fewer local steps, in ``[0, 1)``.
        straggler_steps_fraction: the share of their local steps stragglers complete, in ``(0, 1]``.
        server: ``fedpeptao`` or a baseline (``fedavg``, ``fedavgm``, ``fedprox``, ``scaffold``, ``fedadam``,
            ``fedyogi``, ``fedadagrad``).
        server_kwargs: keyword arguments of the server optimizer (Flower names: ``eta``, ``server_momentum``...).
        preset: FedPepTAO option preset, ``code`` or ``clean``.
        fedpeptao: overrides of :class:`~privtune.federated.FedPepTAOOptions` fields.
        mu: FedProx proximal weight (``server: fedprox``).
        layers: ``all`` (every layer's prefix is federated), ``fedpeptao`` (score and select), or ``list``.
        selected_layers: the layers for ``layers: list``.
        num_selected_layers: ``k`` for ``layers: fedpeptao`` (``None``: from ``selection_ratio``).
        selection_ratio: ``r`` with ``k = round(r L)``; ``None`` estimates it by SLQ of the prompt Hessian.
        slq_iterations: Lanczos iterations of the SLQ estimate.
        scoring_batch_size: samples per client for layer scoring (8 in the code; never 1).
        client_optimizer: ``adamw`` or ``sgd``.
        client_lr: local learning rate (FedOpt baselines' ``eta_l`` when left ``None``; else 0.04).
        client_weight_decay: AdamW weight decay.
        clip_norm: local gradient clipping (0 disables).
        local_epochs: local epochs ``E`` per round.
        local_max_steps: cap on local steps per round (0: none).
        eval_every: personalised evaluation every this many rounds (and always at the last round).
        seed: seed of sampling, client data order and dropout.
        report_dir: where the JSON / Markdown report and the plot are written at the end (None: no report).
        round_checkpoint: a checkpoint path rewritten after every client, so a run killed mid-round resumes it.

    Raises:
        ValueError: on any out-of-range value, all reported at once.
    """

    num_rounds: int = 10
    sample_fraction: float = 0.1
    dropout_fraction: float = 0.0
    straggler_fraction: float = 0.0
    straggler_steps_fraction: float = 0.5
    server: ServerName = "fedpeptao"
    server_kwargs: dict[str, Any] = field(default_factory=dict)
    preset: Literal["code", "clean"] = "code"
    fedpeptao: dict[str, Any] = field(default_factory=dict)
    mu: float = 0.01
    layers: LayerChoice = "all"
    selected_layers: list[int] | None = None
    num_selected_layers: int | None = None
    selection_ratio: float | None = 0.5
    slq_iterations: int = 50
    scoring_batch_size: int = 8
    client_optimizer: Literal["adamw", "sgd"] = "adamw"
    client_lr: float | None = None
    client_weight_decay: float = 0.1
    clip_norm: float = 1.0
    local_epochs: int = 1
    local_max_steps: int = 0
    eval_every: int = 1
    seed: int = 42
    report_dir: str | None = None
    round_checkpoint: str | None = None

    def __post_init__(self) -> None:
        problems = []

        def check(cond: bool, msg: str) -> None:
            if not cond:
                problems.append(msg)

        check(self.num_rounds >= 1, f"`num_rounds` must be >= 1; got {self.num_rounds}.")
        for name, allow_zero in (
            ("sample_fraction", False),
            ("dropout_fraction", True),
            ("straggler_fraction", True),
            ("straggler_steps_fraction", False),
        ):
            try:
                check_fraction(name, getattr(self, name), allow_zero=allow_zero)
            except ValueError as err:
                problems.append(str(err))
        check(self.server in SERVERS, f"`server` must be one of {SERVERS}; got {self.server!r}.")
        check(self.preset in ("code", "clean"), f"`preset` must be one of ('code', 'clean'); got {self.preset!r}.")
        check(
            self.layers in ("all", "fedpeptao", "list"),
            f"`layers` must be all, fedpeptao or list; got {self.layers!r}.",
        )
        check(self.layers != "list" or bool(self.selected_layers), "`layers: list` needs `selected_layers`.")
        check(
            self.num_selected_layers is None or self.num_selected_layers >= 1,
            f"`num_selected_layers` must be >= 1; got {self.num_selected_layers}.",
        )
        check(
            self.selection_ratio is None or 0.0 < self.selection_ratio <= 1.0,
            f"`selection_ratio` must be in (0, 1] or None (SLQ); got {self.selection_ratio}.",
        )
        check(self.scoring_batch_size >= 2, f"`scoring_batch_size` must be >= 2; got {self.scoring_batch_size}.")
        check(self.mu >= 0, f"`mu` must be >= 0; got {self.mu}.")
        check(self.local_epochs >= 1, f"`local_epochs` must be >= 1; got {self.local_epochs}.")
        check(self.local_max_steps >= 0, f"`local_max_steps` must be >= 0; got {self.local_max_steps}.")
        check(self.eval_every >= 1, f"`eval_every` must be >= 1; got {self.eval_every}.")
        check(self.client_lr is None or self.client_lr > 0, f"`client_lr` must be > 0; got {self.client_lr}.")
        if problems:
            raise ValueError("Invalid federated configuration: " + " ".join(problems))
        self.options()  # validates the FedPepTAO overrides eagerly

    def options(self) -> FedPepTAOOptions:
        """The resolved FedPepTAO options (preset plus overrides)."""
        return FedPepTAOOptions.preset(self.preset, **self.fedpeptao)

    def build_server(self, num_clients: int) -> ServerOptimizer:
        """The server optimizer for ``num_clients`` clients."""
        kw = dict(self.server_kwargs)
        if self.server == "fedpeptao":
            return FedPepTAOServer(num_clients=num_clients, options=self.options(), adaptive_names=["prefix"])
        if self.server == "scaffold":
            kw.setdefault("eta_l", self.client_lr or 0.04)
            return Scaffold(num_clients=num_clients, **kw)
        classes = {
            "fedavg": FedAvg,
            "fedprox": FedAvg,
            "fedavgm": FedAvgM,
            "fedadam": FedAdam,
            "fedyogi": FedYogi,
            "fedadagrad": FedAdagrad,
        }
        return classes[self.server](**kw)

    def local_config(self, server: ServerOptimizer) -> LocalConfig:
        """Client-side optimisation settings (FedPepTAO's reset / zero-grad options apply to every method)."""
        opts = self.options()
        lr = self.client_lr or server.client_lr or 0.04
        return LocalConfig(
            optimizer=self.client_optimizer,
            lr=lr,
            weight_decay=self.client_weight_decay,
            clip_norm=self.clip_norm,
            local_epochs=self.local_epochs,
            max_steps=self.local_max_steps,
            zero_grad=opts.local_zero_grad,
            reset_optimizer=opts.reset_local_opt_each_round,
        )
