"""robustfl on Flower: robust aggregators and Byzantine attacks as Flower apps.

An optional part of the library (``pip install "robustfl[flower]"``); ``import
robustfl_lib`` never imports it, and this package says how to install Flower when it
is missing. Written against Flower's Message API (``flwr>=1.42``):

* :class:`RobustStrategy`: Flower's FedAvg with its aggregation step replaced by any
  robustfl aggregator on the clients' deltas; :func:`sample_weights` keeps forged
  sample counts from weighting a client up; :class:`Collusion` simulates omniscient
  attackers server-side;
* :func:`make_client_app`: honest ClientApps (standard or adversarial local training)
  and Byzantine ones (omniscient or local-knowledge attacks);
* :func:`make_server_app` and :func:`run_flower_simulation`: the ServerApp, and a whole
  federation in Flower's simulation engine returning :class:`~robustfl_lib.FLResult`;
* :mod:`robustfl_lib.flower.apps`: module-level ``server_app`` / ``client_app`` that
  ``flwr run`` starts on a SuperLink and SuperNodes, configured by the run config.

Taught in chapter ``14_scaling_out_with_flower``.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "robustfl_lib.flower needs Flower; install the extra: pip install \"robustfl[flower]\" "
        "(it pulls flwr[simulation]>=1.42)"
    ) from err

from .client import KNOWLEDGE, make_client_app
from .config import cached_dataset, cached_partition, config_from_run_config, config_to_run_config
from .federation import (
    aggregator_for,
    attack_for,
    attack_seed,
    byzantine_clients,
    client_seed,
    eval_attack_for,
    local_update_for,
    num_byzantine,
    round_participants,
)
from .simulation import make_server_app, run_flower_simulation
from .strategy import (
    BYZANTINE_KEY,
    CLIENT_ID_KEY,
    NUM_EXAMPLES_KEY,
    WEIGHTINGS,
    Collusion,
    RobustStrategy,
    record_to_state,
    sample_weights,
    state_to_record,
)

__all__ = [
    "RobustStrategy",
    "Collusion",
    "sample_weights",
    "WEIGHTINGS",
    "make_client_app",
    "KNOWLEDGE",
    "make_server_app",
    "run_flower_simulation",
    "config_to_run_config",
    "config_from_run_config",
    "cached_dataset",
    "cached_partition",
    "byzantine_clients",
    "num_byzantine",
    "client_seed",
    "local_update_for",
    "attack_for",
    "attack_seed",
    "aggregator_for",
    "eval_attack_for",
    "round_participants",
    "record_to_state",
    "state_to_record",
    "BYZANTINE_KEY",
    "CLIENT_ID_KEY",
    "NUM_EXAMPLES_KEY",
]
