"""What the Flower apps take from the in-process simulation, so that both run the same federation.

Every function here answers a question :func:`~robustfl_lib.run_federated` also answers,
with the same code or the same formula: which clients are Byzantine and with which attack,
which aggregator with which ``f``, how an honest client trains, how the generators of
clients and attacks are seeded. ``tests/test_flower.py`` checks that a Flower simulation
reproduces ``run_federated`` bit for bit, so any drift between the two breaks a test.
Chapter ``14_scaling_out_with_flower``.
"""

from __future__ import annotations

import numpy as np

from ..aggregators import Aggregator, get_aggregator
from ..attacks import PGD
from ..byzantine import ByzantineAttack, DataPoisoning
from ..federated import ClientUpdate, FLConfig, adversarial_client_update, select_participants, sgd_client_update
from ..federated import byzantine_clients as _byzantine_ids
from ..federated.server import _make_attack

__all__ = [
    "byzantine_clients",
    "num_byzantine",
    "client_seed",
    "attack_seed",
    "local_update_for",
    "attack_for",
    "aggregator_for",
    "eval_attack_for",
    "round_participants",
    "check_flower_config",
]


def check_flower_config(config: FLConfig) -> None:
    """Raise ``ValueError`` for a setting the Flower apps cannot run as ``run_federated`` does.

    * ``client_momentum > 0``: worker momentum needs each client's momentum kept across rounds,
      and a Flower ClientApp is stateless between messages (the in-process simulation keeps it:
      :class:`~robustfl_lib.federated.WorkerMomentum`);
    * ``server_root_size > 0``: the server's root data and its own update (FLTrust) are not
      wired into the ServerApp.
    * ``model_kwargs``: the apps build ``config.model`` with the builder's defaults.

    Chapter ``14_scaling_out_with_flower``.
    """
    if config.client_momentum > 0:
        raise ValueError(f"client_momentum={config.client_momentum} is not supported by the Flower apps (ClientApps "
                         "keep no state between rounds, so no worker momentum); use run_federated, or "
                         "client_momentum=0")
    if config.server_root_size > 0:
        raise ValueError(f"server_root_size={config.server_root_size} (the server's root data, e.g. for FLTrust) is "
                         "not supported by the Flower apps; use run_federated, or server_root_size=0")
    if config.model_kwargs:  # the apps build config.model with its defaults; refuse rather than ignore the keywords
        raise ValueError(f"model_kwargs={config.model_kwargs!r} is not supported by the Flower apps; use "
                         "run_federated, or model_kwargs={}")


def num_byzantine(config: FLConfig) -> int:
    """How many of the ``config.num_clients`` clients are Byzantine (``config.num_byzantine``).

    Chapter ``14_scaling_out_with_flower``.
    """
    return config.num_byzantine


def byzantine_clients(config: FLConfig) -> list[int]:
    """The partition ids of the Byzantine clients: the seeded subset ``run_federated`` draws.

    Chapter ``14_scaling_out_with_flower``.
    """
    return [int(c) for c in _byzantine_ids(config.num_clients, config.num_byzantine, config.seed)]


def client_seed(config: FLConfig, server_round: int, client: int) -> int:
    """Seed of client ``client``'s generator in round ``server_round`` (rounds count from 1),
    as in :func:`~robustfl_lib.federated.compute_client_updates`.

    Chapter ``14_scaling_out_with_flower``.
    """
    return config.seed * 100_003 + server_round * 1_009 + int(client)


def attack_seed(seed: int, server_round: int) -> int:
    """Seed of the attack's generator in round ``server_round``, as in ``run_federated``.

    Chapter ``14_scaling_out_with_flower``.
    """
    return seed * 7_919 + server_round


def local_update_for(config: FLConfig) -> ClientUpdate:
    """The honest client's local step: ``config.local_training`` is ``"standard"`` (SGD) or
    ``"adversarial"`` (PGD adversarial training with ``config.adv_*``), the client-by-client
    step of ``run_federated`` (its ``vectorized`` path computes the same, batched).

    Chapter ``14_scaling_out_with_flower``.
    """
    if config.local_training == "adversarial":
        return adversarial_client_update
    if config.local_training != "standard":
        raise ValueError(f"local_training must be 'standard' or 'adversarial', got {config.local_training!r}")
    return sgd_client_update


def eval_attack_for(config: FLConfig) -> PGD | None:
    """The PGD attack that measures robust accuracy on the test split (``config.eval_eps``), or None.

    Chapter ``14_scaling_out_with_flower``.
    """
    return config.eval_attack() if config.eval_eps is not None else None


def round_participants(config: FLConfig, rng: np.random.Generator, server_round: int) -> tuple[list[int], list[int]]:
    """``(answering, dropped_out)`` partition ids of round ``server_round``: the participants
    :func:`~robustfl_lib.federated.select_participants` draws from ``rng`` (seeded with
    ``config.seed``, one call per round, in order), less those that drop out with
    probability ``config.dropout``, from the same per-round stream as ``run_federated``.

    Chapter ``14_scaling_out_with_flower``.
    """
    participants = select_participants(rng, config)
    answered = np.random.default_rng([config.seed, 3, server_round]).random(len(participants)) >= config.dropout
    return participants[answered].tolist(), participants[~answered].tolist()


def attack_for(config: FLConfig) -> ByzantineAttack | DataPoisoning | None:
    """The attack the config names (``byzantine_attack`` with ``attack_kwargs``), or None; an
    attack that searches its scale against the rule (``"optimal_alie"``, ...) named without an
    ``aggregator`` is built against the config's own (:func:`aggregator_for`), as in ``run_federated``.

    Chapter ``14_scaling_out_with_flower``.
    """
    if config.byzantine_attack is None:
        return None
    return _make_attack(config, aggregator_for(config))


def aggregator_for(config: FLConfig) -> Aggregator:
    """The aggregator with ``f = config.resolved_aggregator_f``, its ``n``/``f`` requirement
    checked for the clients per round and its state reset, as ``run_federated`` builds it.

    Chapter ``14_scaling_out_with_flower``.
    """
    aggregator = get_aggregator(config.aggregator, f=config.resolved_aggregator_f, **config.aggregator_kwargs)
    if hasattr(aggregator, "requirement"):
        aggregator.requirement(config.participants_per_round, aggregator.f)
    if hasattr(aggregator, "reset"):
        aggregator.reset()
    return aggregator
