"""The federated run's configuration lives in the core (:mod:`privtune.federated.config`); re-exported here."""

from privtune.federated.config import FederatedConfig

__all__ = ["FederatedConfig"]
