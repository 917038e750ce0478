"""The federated-learning simulation.

One round of FedAvg-style training (McMahan et al. 2017):

1. the server samples participating clients and sends the global weights ``w``;
2. each client trains locally and returns its update ``u_i = w_i - w`` (a delta);
3. the server sets ``w <- w + A(u_1, ..., u_n)`` for an aggregator ``A``
   (:mod:`robustfl_lib.aggregators`);
4. the global model is evaluated on held-out test data.

The aggregator and the client update step are pluggable. Taught in chapter
``00_introduction``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .aggregators import Aggregator, get_aggregator
from .data import Dataset, load_dataset, partition
from .models import build_model
from .params import flatten_state, load_vector_
from .runtime import get_device, make_generator, set_seed
from .training import evaluate, train

__all__ = ["FLConfig", "FLResult", "ClientUpdate", "sgd_client_update", "run_federated"]


@dataclass
class FLConfig:
    """Settings of one federated run (all have defaults that run on digits in seconds)."""

    dataset: str = "digits"
    model: str = "mlp"
    partition: str = "iid"  #: "iid", "dirichlet" or "shards"
    alpha: float = 0.5  #: Dirichlet concentration (smaller = more label skew)
    num_clients: int = 10
    clients_per_round: int | None = None  #: None: every client, every round
    rounds: int = 20
    local_epochs: int = 2
    lr: float = 0.2
    batch_size: int = 16
    aggregator: str | Aggregator = "mean"
    seed: int = 0
    device: str | None = None
    progress: bool = True
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(
                f"clients_per_round must be in [1, num_clients={self.num_clients}], got {self.clients_per_round}"
            )
        for name in ("rounds", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


class ClientUpdate(Protocol):
    """Trains ``model`` (a copy of the global model) in place on one client's data."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator
    ) -> None: ...


def sgd_client_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator
) -> None:
    """Local SGD for ``config.local_epochs`` epochs (the FedAvg client)."""
    train(model, x, y, epochs=config.local_epochs, lr=config.lr, batch_size=config.batch_size, generator=generator)


@dataclass
class FLResult:
    """The global model after the last round and one history record per round."""

    model: nn.Module
    history: list[dict[str, Any]]
    config: FLConfig

    def metric(self, key: str) -> np.ndarray:
        """One history column as an array, e.g. ``result.metric("clean_accuracy")``."""
        return np.array([h[key] for h in self.history], dtype=float)


def run_federated(
    config: FLConfig,
    data: Dataset | None = None,
    client_update: ClientUpdate = sgd_client_update,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> FLResult:
    """Simulate ``config.rounds`` rounds of federated training; same seed, same history.

    ``data`` skips loading ``config.dataset`` again; ``client_update`` replaces
    local SGD; ``callback`` receives each round's record as it is made.
    """
    config.validate()
    set_seed(config.seed)
    device = get_device(config.device)
    data = data if data is not None else load_dataset(config.dataset, seed=config.seed, **config.dataset_kwargs)
    parts = partition(data.y_train, config.num_clients, config.partition, alpha=config.alpha, seed=config.seed)
    aggregator = get_aggregator(config.aggregator)
    model = build_model(config.model, data.input_shape, data.num_classes).to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    rng = np.random.default_rng(config.seed)
    k = config.clients_per_round or config.num_clients
    history: list[dict[str, Any]] = []
    bar = tqdm(range(1, config.rounds + 1), desc="FL rounds", unit="round", disable=not config.progress)
    for rnd in bar:
        participants = np.sort(rng.choice(config.num_clients, size=k, replace=False))
        global_vec = flatten_state(model.state_dict())
        deltas, counts = [], []
        for cid in participants:
            local = copy.deepcopy(model)
            idx = parts[cid].to(device)
            client_update(local, x_train[idx], y_train[idx], config, make_generator(config.seed * 100_003 + rnd * 1_009 + int(cid)))
            deltas.append(flatten_state(local.state_dict()) - global_vec)
            counts.append(len(idx))
        updates = torch.stack(deltas)
        weights = torch.tensor(counts, dtype=updates.dtype, device=device)
        load_vector_(model, global_vec + aggregator(updates, weights=weights))
        record = {"round": rnd, "participants": participants.tolist(), **evaluate(model, data.x_test, data.y_test)}
        history.append(record)
        bar.set_postfix(acc=f"{record['clean_accuracy']:.3f}")
        if callback is not None:
            callback(record)
    return FLResult(model=model, history=history, config=config)


def config_dict(config: FLConfig) -> dict[str, Any]:
    """``config`` as a plain dict (aggregator objects by their repr), for logs and checkpoints."""
    d = asdict(config)
    if not isinstance(d["aggregator"], str):
        d["aggregator"] = repr(config.aggregator)
    return d
