"""Lightning Strategies that drive the federated round loop of ``privtune.federated.loop`` (FedPepTAO, arXiv
2310.15080) in one process or across DDP ranks."""

from privtune.federated.config import FederatedConfig
from privtune.strategies.callback_policy import check_callbacks
from privtune.strategies.federated_simulation import FederatedDDP, FederatedSimulation, final_prompt

__all__ = ["FederatedConfig", "FederatedDDP", "FederatedSimulation", "check_callbacks", "final_prompt"]
