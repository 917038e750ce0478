"""The whole federation in Flower's simulation engine.

:func:`run_flower_simulation` runs the ServerApp of
:func:`~robustfl_lib.flower.serverapp.make_server_app` with the ClientApp of
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
from pathlib import Path
from typing import Any

from ..data import Dataset
from ..federated import FLConfig, FLResult
from ..models import build_model
from ..runtime import get_device
from .client import make_client_app
from .config import DeploymentSettings, cached_dataset
from .federation import aggregator_for, check_flower_config
from .serverapp import make_server_app

__all__ = ["make_server_app", "run_flower_simulation"]


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
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
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

    With ``checkpoint_dir`` the ServerApp saves its state there every
    ``config.checkpoint_every`` rounds and after the last; ``resume=True`` continues from it
    and ends with exactly the model and history of the uninterrupted run. ``callback``
    receives each round's record (an exception it raises stops the run, as a crash would).

    Flower: Beutel et al. (2020). Chapter ``14_scaling_out_with_flower``.
    """
    from flwr.simulation import run_simulation

    config.validate()
    check_flower_config(config)
    aggregator_for(config)  # an impossible n/f fails here, before Ray starts
    if data is None:
        data = cached_dataset(config)
    store: dict[str, Any] = {}
    settings = DeploymentSettings(checkpoint_dir=str(Path(checkpoint_dir).resolve()) if checkpoint_dir else "",
                                  resume=resume)
    server = make_server_app(config, data=data, weighting=weighting, store=store, settings=settings,
                             callback=callback)
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
