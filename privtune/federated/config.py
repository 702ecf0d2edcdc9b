"""Configuration of a federated prompt-tuning run: rounds, clients, local and server optimisation, layer choice.

One typed dataclass read by the round loop (:mod:`privtune.federated.loop`) and therefore by every driver of it:
the in-process and the DDP Lightning Strategies (``strategy.init_args.federated: {...}``) and a Flower app.
The server optimizer is injected by class path with its own typed ``__init__`` arguments::

    federated:
      server:
        class_path: privtune.federated.FedAdam
        init_args: {eta: 0.1, eta_l: 0.1}

Defaults follow the FedPepTAO code (arXiv 2310.15080, spec §5-§8) where it is specific.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from privtune.federated.client import LocalConfig
from privtune.federated.client_dp import ClientLevelDP
from privtune.federated.fedopt import ServerOptimizer
from privtune.federated.fedpeptao import FedPepTAOServer
from privtune.federated.fedprox import check_mu
from privtune.federated.sampling import check_fraction

LayerChoice = Literal["all", "fedpeptao", "list"]


@dataclass
class FederatedConfig:
    """Everything the federated round loop needs besides the model and the data.

    Attributes:
        num_rounds: federated rounds ``T``.
        sample_fraction: clients sampled per round, ``M = ceil(fraction * N)``, in ``(0, 1]``.
        dropout_fraction: fraction of sampled clients that never report, in ``[0, 1)``.
        straggler_fraction: fraction of reporting clients that run fewer local steps, in ``[0, 1)``.
        straggler_steps_fraction: the share of their local steps stragglers complete, in ``(0, 1]``.
        server: the server optimizer, a :class:`~privtune.federated.ServerOptimizer` (``FedPepTAOServer``,
            ``FedAvg``, ``FedAvgM``, ``FedAdam``, ``FedYogi``, ``FedAdagrad``, ``Scaffold``); in YAML a
            ``class_path`` with typed ``init_args``. The run works on a copy, so one config can start several runs.
        proximal_mu: FedProx's proximal weight ``mu`` (arXiv 1812.06127) added to every client's gradient; 0
            disables it. FedProx is ``server: FedAvg`` with ``proximal_mu > 0``.
        layers: ``all`` (every layer's prefix is federated), ``fedpeptao`` (score and select), or ``list``.
        selected_layers: the layers for ``layers: list``.
        personal_layers: with ``layers: fedpeptao`` or ``list``, each client trains and keeps its unselected layers
            (FedPepTAO's personalisation, the default); ``False`` freezes them at their initial values (no effect with
            ``layers: all``).
        num_selected_layers: ``k`` for ``layers: fedpeptao`` (``None``: from ``selection_ratio``).
        selection_ratio: ``r`` with ``k = round(r L)``; ``None`` estimates it by SLQ of the prompt Hessian.
        slq_iterations: Lanczos iterations of the SLQ estimate.
        scoring_batch_size: samples per client for layer scoring (8 in the code; never 1).
        client_optimizer: ``adamw`` or ``sgd``.
        client_lr: local learning rate (``None``: the server's recommended ``client_lr``, e.g. FedOpt's
            ``eta_l``; else 0.04).
        client_weight_decay: AdamW weight decay.
        clip_norm: local gradient clipping (0 disables).
        local_epochs: local epochs ``E`` per round.
        local_max_steps: cap on local steps per round (0: none).
        reset_local_optimizer: a fresh client optimizer every round (``None``: the server's recommendation, e.g.
            FedPepTAO's ``reset_local_opt_each_round``; else False, the FedPepTAO code's behaviour).
        local_zero_grad: zero the gradient before each local step (``None``: the server's recommendation; else
            True).
        client_dp: client-level differential privacy (DP-FedAvg, McMahan et al. 2018) over the communicated
            tensors: each client's update clipped to ``clipping_norm``, uniform mean, Gaussian noise, RDP accounting
            with ``q = sampled / all clients`` per round; the run stops before a round that would exceed
            ``target_epsilon``. In YAML ``client_dp: {clipping_norm: 0.5, target_epsilon: 3.0, delta: 1e-4}`` (the
            typed arguments of :class:`~privtune.federated.client_dp.ClientLevelDP`). ``None``: off.
        membership_audit: at the end, attack the global and the personalised models with membership inference
            (members: training examples of clients that took part; non-members: held-out examples; see
            :mod:`privtune.federated.membership`) and put the reports in the run's report.
        membership_examples: at most this many members and as many non-members for that audit.
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
    server: ServerOptimizer = field(default_factory=FedPepTAOServer)
    proximal_mu: float = 0.0
    layers: LayerChoice = "all"
    selected_layers: list[int] | None = None
    personal_layers: bool = True
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
    reset_local_optimizer: bool | None = None
    local_zero_grad: bool | None = None
    client_dp: ClientLevelDP | None = None
    membership_audit: bool = False
    membership_examples: int = 200
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
        check(
            isinstance(self.server, ServerOptimizer),
            f"`server` must be a privtune.federated.ServerOptimizer (class_path: privtune.federated.FedAvg, FedAvgM, "
            f"FedAdam, FedYogi, FedAdagrad, Scaffold or FedPepTAOServer); got {self.server!r}.",
        )
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
        try:
            check_mu(self.proximal_mu)
        except ValueError:
            problems.append(f"`proximal_mu` (FedProx) must be >= 0; got {self.proximal_mu}.")
        check(self.local_epochs >= 1, f"`local_epochs` must be >= 1; got {self.local_epochs}.")
        check(self.local_max_steps >= 0, f"`local_max_steps` must be >= 0; got {self.local_max_steps}.")
        check(self.membership_examples >= 2, f"`membership_examples` must be >= 2; got {self.membership_examples}.")
        check(self.eval_every >= 1, f"`eval_every` must be >= 1; got {self.eval_every}.")
        check(self.client_lr is None or self.client_lr > 0, f"`client_lr` must be > 0; got {self.client_lr}.")
        check(
            self.client_dp is None or isinstance(self.client_dp, ClientLevelDP),
            f"`client_dp` must be a privtune.federated.client_dp.ClientLevelDP or None; got {self.client_dp!r}.",
        )
        check(
            self.client_dp is None or not getattr(self.server, "per_client_extras", False),
            f"`client_dp` cannot protect `server: {type(self.server).__name__}`: its clients also upload "
            "control-variate changes that client-level DP does not clip or noise; use another server optimizer "
            "(FedAvg, FedAdam, FedPepTAOServer, ...) with client_dp.",
        )
        if problems:
            raise ValueError("Invalid federated configuration: " + " ".join(problems))

    def resolved_client_lr(self, server: ServerOptimizer) -> float:
        """The clients' learning rate: ``client_lr``, else the server's recommendation, else 0.04."""
        return self.client_lr or server.client_lr or 0.04

    def local_config(self, server: ServerOptimizer) -> LocalConfig:
        """Client-side optimisation settings (explicit values, else the server's recommendation, else defaults)."""

        def pick(value: bool | None, recommended: bool | None, default: bool) -> bool:
            return value if value is not None else recommended if recommended is not None else default

        return LocalConfig(
            optimizer=self.client_optimizer,
            lr=self.resolved_client_lr(server),
            weight_decay=self.client_weight_decay,
            clip_norm=self.clip_norm,
            local_epochs=self.local_epochs,
            max_steps=self.local_max_steps,
            zero_grad=pick(self.local_zero_grad, server.client_zero_grad, True),
            reset_optimizer=pick(self.reset_local_optimizer, server.client_reset_optimizer, False),
        )
