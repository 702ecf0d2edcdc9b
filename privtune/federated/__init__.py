"""Federated prompt tuning over named dicts of tensors: FedPepTAO (arXiv 2310.15080) and its baselines.

Pure torch (and NumPy for partitions); no Lightning. The round loop (:mod:`privtune.federated.loop`) is typed
against the :class:`FederatedClient` Protocol; the Lightning Strategies in ``privtune.strategies`` and the Flower
app only drive it.
"""

from privtune.federated.accounting import CommLedger, RoundRecord, prefix_transfer_elements
from privtune.federated.aggregate import (
    AggregationError,
    ClientUpdate,
    check_compatible,
    normalized_weights,
    state_bytes,
    weighted_average,
)
from privtune.federated.client import ClientState, ClientStore, LocalConfig, local_update, make_optimizer
from privtune.federated.client_dp import ClientLevelDP, PrivacyBudgetExhausted
from privtune.federated.config import FederatedConfig
from privtune.federated.fedopt import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedOpt, FedYogi, ServerOptimizer
from privtune.federated.fedpeptao import FedPepTAOOptions, FedPepTAOServer
from privtune.federated.fedprox import ProximalTerm, add_proximal_gradient, proximal_term
from privtune.federated.loop import CommunicatedView, FederatedLoop, LocalResult, ResumeMismatchError, local_round
from privtune.federated.partition import (
    Partition,
    mean_tv_distance,
    partition_labels,
    partition_like,
    validate_partition_args,
)
from privtune.federated.protocol import ClientData, FederatedClient, PartialPromptClient
from privtune.federated.sampling import RoundPlan, check_fraction, client_seed, plan_round
from privtune.federated.scaffold import DELTA_C, DriftCorrection, Scaffold, client_control_variate

__all__ = [
    "DELTA_C",
    "ClientData",
    "CommunicatedView",
    "DriftCorrection",
    "FederatedClient",
    "FederatedConfig",
    "FederatedLoop",
    "LocalResult",
    "PartialPromptClient",
    "ProximalTerm",
    "ResumeMismatchError",
    "local_round",
    "AggregationError",
    "ClientLevelDP",
    "ClientState",
    "ClientStore",
    "ClientUpdate",
    "CommLedger",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedPepTAOOptions",
    "FedPepTAOServer",
    "FedYogi",
    "LocalConfig",
    "Partition",
    "PrivacyBudgetExhausted",
    "RoundPlan",
    "RoundRecord",
    "Scaffold",
    "ServerOptimizer",
    "add_proximal_gradient",
    "check_compatible",
    "check_fraction",
    "client_control_variate",
    "client_seed",
    "local_update",
    "make_optimizer",
    "mean_tv_distance",
    "normalized_weights",
    "partition_labels",
    "partition_like",
    "plan_round",
    "prefix_transfer_elements",
    "proximal_term",
    "state_bytes",
    "validate_partition_args",
    "weighted_average",
]
