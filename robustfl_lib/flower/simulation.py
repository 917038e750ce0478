"""The ServerApp, and the whole federation in Flower's simulation engine.

:func:`make_server_app` builds the global model exactly as
:func:`~robustfl_lib.run_federated` does (same seed, same initial weights), runs
:class:`~robustfl_lib.flower.strategy.RobustStrategy` for ``config.rounds`` rounds and
evaluates the global model on the held-out test split after every round.
:func:`run_flower_simulation` runs that ServerApp with the ClientApp of
:func:`~robustfl_lib.flower.client.make_client_app` on ``config.num_clients`` virtual
SuperNodes (``flwr.simulation.run_simulation``, Ray backend) and returns the same
:class:`~robustfl_lib.FLResult` as the in-process simulation, so the two can be compared
number for number. Chapter ``14_scaling_out_with_flower``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..byzantine import ByzantineAttack
from ..data import Dataset
from ..federated import FLConfig, FLResult
from ..models import build_model
from ..runtime import get_device, set_seed
from ..training import evaluate
from .client import make_client_app
from .config import cached_dataset, config_from_run_config
from .federation import (aggregator_for, attack_for, byzantine_clients, check_flower_config, eval_attack_for,
                         round_participants)
from .strategy import Collusion, RobustStrategy, record_to_state, state_to_record

__all__ = ["make_server_app", "run_flower_simulation"]


def make_server_app(
    config: FLConfig | None = None,
    data: Dataset | None = None,
    weighting: str = "equal",
    collude: bool = True,
    same_participants: bool = True,
    callback: Callable[[dict[str, Any]], None] | None = None,
    store: dict[str, Any] | None = None,
) -> ServerApp:
    """A ``ServerApp`` that trains ``config`` with a robustfl aggregator.

    Without ``config`` the run config is read (real deployments). ``weighting`` goes to
    :class:`~robustfl_lib.flower.strategy.RobustStrategy`. With ``collude`` and a
    Byzantine fraction the server simulates the omniscient attackers'
    :class:`~robustfl_lib.flower.strategy.Collusion` on flagged replies (harmless when
    the Byzantine clients attack with local knowledge: nothing is flagged). With
    ``same_participants`` each round trains the partitions
    :func:`~robustfl_lib.federated.select_participants` draws, as in ``run_federated``
    (the strategy learns which node holds which partition first); without it Flower
    samples the nodes. The evaluation
    record of each round goes to ``callback``; ``store`` (a dict) receives the
    ``"history"``, the final ``"state"`` and the ``"strategy"``.

    Chapter ``14_scaling_out_with_flower``.
    """
    if config is not None:
        check_flower_config(config)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else config_from_run_config(context.run_config)
        check_flower_config(cfg)
        set_seed(cfg.seed)
        ds = data if data is not None else cached_dataset(cfg)
        device = get_device(cfg.device)
        model = build_model(cfg.model, ds.input_shape, ds.num_classes).to(device)
        n, k = cfg.num_clients, cfg.participants_per_round
        aggregator = aggregator_for(cfg)
        attack = attack_for(cfg)
        collusion = Collusion(attack, seed=cfg.seed) if collude and isinstance(attack, ByzantineAttack) else None
        byzantine = set(byzantine_clients(cfg))
        rng = np.random.default_rng(cfg.seed)  # the participants run_federated draws, round by round
        dropped_out: dict[int, list[int]] = {}

        def select(server_round: int) -> list[int]:
            answering, dropped_out[server_round] = round_participants(cfg, rng, server_round)
            return answering

        strategy = RobustStrategy(
            aggregator=aggregator, f=aggregator.f, weighting=weighting, collusion=collusion,
            fraction_train=k / n, min_train_nodes=k, min_available_nodes=n,
            select=select if same_participants else None,
        )
        eval_attack = eval_attack_for(cfg)
        history: list[dict[str, Any]] = []

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:  # run_federated records rounds 1..R only
                return None
            model.load_state_dict(record_to_state(arrays))
            done = strategy.rounds[-1] if strategy.rounds else {}
            participants = done.get("participants", [])
            record = {"round": server_round, "participants": participants,
                      "dropped_out": dropped_out.get(server_round, []),
                      "byzantine": [] if "skipped" in done.get("aggregation", {}) or not cfg.attacks_in_round(server_round)
                                   else [c for c in participants if c in byzantine],
                      "aggregation": done.get("aggregation", {}), "update_norm": done.get("update_norm", 0.0)}
            if cfg.attack_rounds is not None and "skipped" not in done.get("aggregation", {}):
                record = {**record, "attacking": cfg.attacks_in_round(server_round)}
            if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
                record.update(evaluate(model, ds.x_test, ds.y_test, attack=eval_attack))
            else:
                record.update(clean_accuracy=None, robust_accuracy=None)
            if done.get("failures"):
                record["failures"] = list(done["failures"])
            history.append(record)
            if callback is not None:
                callback(record)
            return MetricRecord({key: v for key, v in record.items() if isinstance(v, float)})

        strategy.start(grid=grid, initial_arrays=state_to_record(model.state_dict()), num_rounds=cfg.rounds,
                       evaluate_fn=evaluate_fn)
        if store is not None:
            store.update(history=history, state={key: v.clone() for key, v in model.state_dict().items()},
                         strategy=strategy, byzantine=sorted(byzantine))

    return app


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Flower and Ray log every round at INFO; keep errors only unless ``verbose``. Flower's Ray
    backend also rewrites ``PYTHONPATH`` for its workers; it is restored afterwards."""
    logger = logging.getLogger("flwr")
    level = logger.level
    old_env = os.environ.get("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")
    old_path = os.environ.get("PYTHONPATH")
    if not verbose:
        logger.setLevel(logging.ERROR)
        os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"  # silences a FutureWarning per actor
        # Importing Ray in a notebook logs a hint about ipywidgets (rich output we do not use).
        logging.getLogger("ray.widgets.util").setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
        if old_env is None:
            os.environ.pop("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", None)
        else:
            os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = old_env


def run_flower_simulation(
    config: FLConfig,
    data: Dataset | None = None,
    knowledge: str = "omniscient",
    weighting: str = "equal",
    num_cpus: int | None = None,
    cpus_per_client: float = 1.0,
    backend_config: dict[str, Any] | None = None,
    claimed_examples: int | None = None,
    verbose: bool = False,
) -> FLResult:
    """Run ``config`` in Flower's simulation engine: ``config.num_clients`` virtual SuperNodes.

    The result has the shape of :func:`~robustfl_lib.run_federated`'s: the global model and
    one record per round (``"round"``, ``"participants"``, ``"clean_accuracy"``, ...).
    ``knowledge`` (``"omniscient"`` or ``"local"``) and ``claimed_examples`` configure the
    Byzantine ClientApps, ``weighting`` the server (see
    :func:`~robustfl_lib.flower.client.make_client_app` and
    :func:`~robustfl_lib.flower.strategy.sample_weights`).

    Ray runs the ClientApps in ``num_cpus / cpus_per_client`` worker processes (default:
    every core, one client per core); ``backend_config`` replaces Flower's backend
    settings wholesale. A ClientApp that raises fails the whole run with a
    ``RuntimeError`` naming the dropped replies: in a simulation a failed client is a bug,
    not a dropout.

    Flower: Beutel et al. (2020). Chapter ``14_scaling_out_with_flower``.
    """
    from flwr.simulation import run_simulation

    config.validate()
    check_flower_config(config)
    aggregator_for(config)  # an impossible n/f fails here, before Ray starts
    if data is None:
        data = cached_dataset(config)
    store: dict[str, Any] = {}
    server = make_server_app(config, data=data, weighting=weighting, store=store)
    # The clients load the dataset by name in their worker; only a dataset given by the
    # caller travels with the messages.
    client = make_client_app(config, data=data if data is not cached_dataset(config) else None,
                             knowledge=knowledge, claimed_examples=claimed_examples)
    if backend_config is None:
        cpus = num_cpus or os.cpu_count() or 1
        backend_config = {
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                          "logging_level": logging.ERROR if not verbose else logging.INFO,
                          "log_to_driver": verbose},
        }
    with _quiet(verbose):
        run_simulation(server_app=server, client_app=client, num_supernodes=config.num_clients,
                       backend_config=backend_config, verbose_logging=verbose)
    if "history" not in store:
        raise RuntimeError("the Flower simulation ended before the ServerApp finished; rerun with verbose=True")
    failures = [f for h in store["history"] for f in h.get("failures", [])]
    if failures:
        raise RuntimeError(f"{len(failures)} client replies failed in the Flower simulation, e.g. {failures[0]}")
    model = build_model(config.model, data.input_shape, data.num_classes).to(get_device(config.device))
    model.load_state_dict(store["state"])
    return FLResult(model=model, history=store["history"], config=config, byzantine=store["byzantine"])
