"""Build a federated run's parts from a privtune config file, the same way on every Flower process.

A privtune federated config (``configs/fed_prompt/*.yaml``, read by ``train.py`` for the in-process simulation)
names the client model (``model``), the client-partitioned data (``data``) and the run's
:class:`~privtune.federated.config.FederatedConfig` (``trainer.strategy.init_args.federated``). The Flower
``ServerApp`` reads only the federated part; every ``ClientApp`` builds the model and the data and keeps only its
own partition (``partition-id`` of its SuperNode). ``seed_everything`` seeds Python, NumPy and torch before the model
is built, as ``train.py`` does, so every process starts from the same prompt.

Threat model: the config is public (model name, hyper-parameters); a client's data never leaves its process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import ArgumentParser

from privtune.federated.config import FederatedConfig
from privtune.federated.protocol import ClientData, FederatedClient, check_client, check_data

CONFIG_KEY = "config"  # the run-config entry (pyproject's [tool.flwr.app.config] or --run-config) with the path


@dataclass
class ClientSide:
    """What a ClientApp process builds once per config: the client model, the data and its initial tensors.

    Attributes:
        client: the client model (its tensors are overwritten every round; several partitions may share it).
        data: the client-partitioned data, set up.
        initial: a copy of the model's trainable tensors as built (what a client that never trained holds).
    """

    client: FederatedClient
    data: ClientData
    initial: dict[str, torch.Tensor]


def read_config(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of a privtune config file.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if it is not a federated config (no ``trainer.strategy.init_args.federated``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"privtune Flower app: config {str(path)!r} does not exist; set the run config `{CONFIG_KEY}` to a "
            "privtune federated config (e.g. configs/fed_prompt/tiny_debug.yaml)."
        )
    raw = yaml.safe_load(path.read_text()) or {}
    federated = (((raw.get("trainer") or {}).get("strategy") or {}).get("init_args") or {}).get("federated")
    if federated is None or "model" not in raw or "data" not in raw:
        raise ValueError(
            f"privtune Flower app: {str(path)!r} is not a federated config: it needs `model`, `data` and "
            "`trainer.strategy.init_args.federated` (see configs/fed_prompt/)."
        )
    return raw


def config_path(explicit: str | Path | None, run_config: Any) -> Path:
    """The config path given to the app factory, else the run config's ``config`` entry.

    Raises:
        ValueError: if neither names one.
    """
    if explicit is not None:
        return Path(explicit)
    value = run_config.get(CONFIG_KEY) if run_config is not None else None
    if not value:
        raise ValueError(
            f'privtune Flower app: no config; set `{CONFIG_KEY} = "path/to/config.yaml"` in the app\'s '
            f"[tool.flwr.app.config] or pass --run-config '{CONFIG_KEY}=\"...\"' to `flwr run`."
        )
    return Path(str(value))


def federated_config(raw: dict[str, Any]) -> FederatedConfig:
    """The run's :class:`FederatedConfig` (server optimizer by class path, typed arguments)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--federated", type=FederatedConfig)
    cfg = parser.parse_object({"federated": raw["trainer"]["strategy"]["init_args"]["federated"]})
    return parser.instantiate(cfg).federated


def num_clients(raw: dict[str, Any]) -> int:
    """``N`` as the config's data section gives it (``data.init_args.num_clients``).

    Raises:
        ValueError: if the data section does not name it.
    """
    value = ((raw.get("data") or {}).get("init_args") or {}).get("num_clients")
    if not isinstance(value, int) or value < 1:
        raise ValueError(
            f"privtune Flower app: the config's data must set `num_clients` (one SuperNode per client); got {value!r}."
        )
    return value


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (what ``train.py``'s ``seed_everything`` does before building the model)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_client_side(raw: dict[str, Any], partial: bool) -> ClientSide:
    """Build and set up the client model and the client-partitioned data of a config.

    Args:
        raw: the config mapping (:func:`read_config`).
        partial: FedPepTAO's layer selection is configured (the model must be a ``PartialPromptClient``).

    Raises:
        TypeError: if the model lacks a member of the client Protocol.
        ValueError: if the data is not client-partitioned.
    """
    import torch.nn as nn

    from privtune.datamodules.federated import FederatedDataModule

    seed = raw.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed_everything(seed)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=nn.Module)
    parser.add_argument("--data", type=FederatedDataModule)
    built = parser.instantiate(parser.parse_object({"model": raw["model"], "data": raw["data"]}))
    client, data = built.model, built.data
    check_client(client, partial=partial)
    check_data(data)
    inner = getattr(data, "inner", None)
    if inner is not None and getattr(inner, "tokenizer_name", "unset") is None:
        # train.py hands the datamodule the LightningModule's tokenizer; here the model's name loads the same one
        inner.tokenizer_name = getattr(client, "hparams", {}).get("model")
    data.setup("fit")
    if hasattr(client, "configure_labels") and hasattr(data, "num_classes"):
        client.configure_labels(data.label_token_ids, data.num_classes, data.label_names)
    initial = {k: v.detach().clone() for k, v in client.client_parameters().items()}
    return ClientSide(client=client, data=data, initial=initial)
