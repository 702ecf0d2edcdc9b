"""Lightning Strategies that simulate federated prompt tuning (FedPepTAO, arXiv 2310.15080) in one process or
across DDP ranks."""

from privtune.strategies.config import SERVERS, FederatedConfig
from privtune.strategies.federated_simulation import FederatedDDP, FederatedSimulation, final_prompt
from privtune.strategies.runner import FederatedRunner

__all__ = ["SERVERS", "FederatedConfig", "FederatedDDP", "FederatedRunner", "FederatedSimulation", "final_prompt"]
