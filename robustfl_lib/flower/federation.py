"""What the Flower apps take from the in-process simulation, so that both run the same federation.

Every function here answers a question :func:`~robustfl_lib.run_federated` also answers,
with the same code or the same formula: which clients are Byzantine and with which attack,
which aggregator with which ``f``, how an honest client trains, how the generators of
clients and attacks are seeded. ``tests/test_flower.py`` checks that a Flower simulation
reproduces ``run_federated`` bit for bit, so any drift between the two breaks a test.
Chapter ``14_scaling_out_with_flower``.
"""

from __future__ import annotations

from ..aggregators import Aggregator, get_aggregator
from ..byzantine import ByzantineAttack, DataPoisoning, get_attack
from ..federated import ClientUpdate, FLConfig, sgd_client_update
from ..federated import byzantine_clients as _byzantine_ids

__all__ = [
    "byzantine_clients",
    "num_byzantine",
    "client_seed",
    "attack_seed",
    "local_update_for",
    "attack_for",
    "aggregator_for",
]


def num_byzantine(config: FLConfig) -> int:
    """How many of the ``config.num_clients`` clients are Byzantine (``config.num_byzantine``)."""
    return config.num_byzantine


def byzantine_clients(config: FLConfig) -> list[int]:
    """The partition ids of the Byzantine clients: the seeded subset ``run_federated`` draws."""
    return [int(c) for c in _byzantine_ids(config.num_clients, config.num_byzantine, config.seed)]


def client_seed(config: FLConfig, server_round: int, client: int) -> int:
    """Seed of client ``client``'s generator in round ``server_round`` (rounds count from 1),
    as in :func:`~robustfl_lib.federated.compute_client_updates`."""
    return config.seed * 100_003 + server_round * 1_009 + int(client)


def attack_seed(seed: int, server_round: int) -> int:
    """Seed of the attack's generator in round ``server_round``, as in ``run_federated``."""
    return seed * 7_919 + server_round


def local_update_for(config: FLConfig) -> ClientUpdate:
    """The honest client's local step for ``config`` (standard or adversarial training)."""
    return sgd_client_update


def attack_for(config: FLConfig) -> ByzantineAttack | DataPoisoning | None:
    """The attack the config names (``byzantine_attack`` with ``attack_kwargs``), or None."""
    if config.byzantine_attack is None:
        return None
    return get_attack(config.byzantine_attack, **config.attack_kwargs)


def aggregator_for(config: FLConfig) -> Aggregator:
    """The aggregator with ``f = config.resolved_aggregator_f``, its ``n``/``f`` requirement
    checked for the clients per round and its state reset, as ``run_federated`` builds it."""
    aggregator = get_aggregator(config.aggregator, f=config.resolved_aggregator_f, **config.aggregator_kwargs)
    if hasattr(aggregator, "requirement"):
        aggregator.requirement(config.participants_per_round, aggregator.f)
    if hasattr(aggregator, "reset"):
        aggregator.reset()
    return aggregator
