"""One :class:`~robustfl_lib.FLConfig` for both runtimes, and the Flower run config it travels as.

In the simulation engine the apps are built with the ``FLConfig`` itself. On real
devices a ServerApp and its ClientApps only share Flower's *run config*, the
``[tool.flwr.app.config]`` table of the app's ``pyproject.toml`` (overridable with
``flwr run --run-config``): flat TOML scalars with kebab-case keys. This module maps
one to the other (``local_epochs`` <-> ``local-epochs``; Flower's customary
``num-server-rounds`` is read as ``rounds``) and holds what every node derives from the
config alone: the data, the partition, a client's seed and who is Byzantine. Chapter
``14_scaling_out_with_flower``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from collections.abc import Mapping
from typing import Any

import torch

from ..data import Dataset, load_dataset, partition
from ..federated import FLConfig

__all__ = ["DeploymentSettings", "DEPLOYMENT_KEYS", "config_to_run_config", "config_from_run_config",
           "settings_from_run_config", "cached_dataset", "cached_partition"]

_ALIASES = {"num-server-rounds": "rounds"}


@dataclasses.dataclass(frozen=True)
class DeploymentSettings:
    """How the ServerApp runs on a real federation, beside the :class:`~robustfl_lib.FLConfig` it trains.

    * ``round_timeout``: seconds a round waits for the replies it asked for; a node that has
      not answered by then is recorded as lost (by its node id) and the round goes on with the
      replies it has, under the quorum rule (too few for the rule's ``f``: the round is skipped);
    * ``wait_for_nodes``: seconds the run waits for ``num_clients`` SuperNodes to connect
      before it starts with those present (Flower's own strategies wait forever);
    * ``bench_rounds``: rounds a node that missed a deadline sits out before it is asked again
      (the SuperLink keeps listing a dead node until two heartbeats, about 60 s, have lapsed);
    * ``checkpoint_dir``: an absolute path (the ServerApp runs in another working directory);
      the state after every ``FLConfig.checkpoint_every`` rounds and after the last is saved
      there, and the final model and history are read from it; ``""``: no checkpoints;
    * ``resume``: continue from the checkpoint in ``checkpoint_dir``.

    In the run config they are ``round-timeout``, ``wait-for-nodes``, ``bench-rounds``,
    ``checkpoint-dir`` and ``resume`` (:data:`DEPLOYMENT_KEYS`). Chapter ``14_scaling_out_with_flower``.
    """

    round_timeout: float = 600.0
    wait_for_nodes: float = 60.0
    bench_rounds: int = 2
    checkpoint_dir: str = ""
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("round_timeout", "wait_for_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if isinstance(self.bench_rounds, bool) or not isinstance(self.bench_rounds, int) or self.bench_rounds < 0:
            raise ValueError(f"bench_rounds must be an integer >= 0, got {self.bench_rounds!r}")
        if not isinstance(self.checkpoint_dir, str):
            raise ValueError(f"checkpoint_dir must be a string (a path), got {self.checkpoint_dir!r}")
        if self.checkpoint_dir and not os.path.isabs(self.checkpoint_dir):
            raise ValueError(f"checkpoint_dir must be an absolute path (the ServerApp runs in a directory of "
                             f"Flower's choosing), got {self.checkpoint_dir!r}")
        if not isinstance(self.resume, bool):
            raise ValueError(f"resume must be true or false, got {self.resume!r}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=true needs a checkpoint-dir to resume from")


#: Run config keys that configure the deployment (:class:`DeploymentSettings`), not the FLConfig.
DEPLOYMENT_KEYS = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(DeploymentSettings)}


def settings_from_run_config(run_config: Mapping[str, Any]) -> DeploymentSettings:
    """The :class:`DeploymentSettings` in a Flower run config (absent keys: the defaults).

    Chapter ``14_scaling_out_with_flower``.
    """
    values = {DEPLOYMENT_KEYS[k]: v for k, v in run_config.items() if k in DEPLOYMENT_KEYS}
    if isinstance(values.get("bench_rounds"), float) and float(values["bench_rounds"]).is_integer():
        values["bench_rounds"] = int(values["bench_rounds"])
    return DeploymentSettings(**values)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(FLConfig)


def config_to_run_config(config: FLConfig) -> dict[str, bool | int | float | str]:
    """``config`` as a Flower run config: kebab-case keys, TOML scalars only.

    ``None`` fields are left out (TOML has no null; the default applies); a field that
    holds an object (an aggregator instance) or a non-empty dict raises ``ValueError``,
    since a run config cannot carry it to other machines.

    Chapter ``14_scaling_out_with_flower``.
    """
    out: dict[str, bool | int | float | str] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None or (isinstance(value, dict) and not value):
            continue
        if not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"FLConfig.{f.name}={value!r} cannot travel in a Flower run config (TOML scalars only)")
        out[f.name.replace("_", "-")] = value
    return out


def config_from_run_config(run_config: Mapping[str, Any], **overrides: Any) -> FLConfig:
    """The ``FLConfig`` a Flower run config describes (inverse of :func:`config_to_run_config`).

    Keys are FLConfig fields in kebab-case; ints are accepted for float fields. An unknown
    key raises ``ValueError`` naming it, so a typo in ``pyproject.toml`` fails at the first
    round instead of silently running the default. The deployment's own keys
    (:data:`DEPLOYMENT_KEYS`, read by :func:`settings_from_run_config`) are skipped.
    ``progress`` is off.

    Chapter ``14_scaling_out_with_flower``.
    """
    types = _field_types()
    values: dict[str, Any] = {"progress": False}
    for key, value in run_config.items():
        if key in DEPLOYMENT_KEYS:
            continue
        name = _ALIASES.get(key, key.replace("-", "_"))
        if name not in types:
            raise ValueError(f"run config key {key!r} is not an FLConfig field; known: {sorted(types)}")
        allowed = typing.get_args(types[name]) or (types[name],)
        if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
            value = float(value)
        values[name] = value
    values.update(overrides)
    config = FLConfig(**values)
    config.validate()
    return config


@functools.lru_cache(maxsize=4)
def _dataset(name: str, seed: int, kwargs: tuple[tuple[str, Any], ...]) -> Dataset:
    return load_dataset(name, seed=seed, **dict(kwargs))


def cached_dataset(config: FLConfig) -> Dataset:
    """``load_dataset`` for ``config``, loaded once per process (a Flower node or Ray actor
    serves many rounds and, in simulation, many clients).

    Chapter ``14_scaling_out_with_flower``.
    """
    return _dataset(config.dataset, config.seed, tuple(sorted(config.dataset_kwargs.items())))


@functools.lru_cache(maxsize=8)
def _partition(name: str, seed: int, kwargs, num_clients: int, scheme: str, alpha: float) -> list[torch.Tensor]:
    data = _dataset(name, seed, kwargs)
    return partition(data.y_train, num_clients, scheme, alpha=alpha, seed=seed)


def cached_partition(config: FLConfig, data: Dataset | None = None) -> list[torch.Tensor]:
    """The clients' index sets for ``config``, exactly as :func:`~robustfl_lib.run_federated`
    draws them (same function, same seed).

    Chapter ``14_scaling_out_with_flower``.
    """
    if data is not None:
        return partition(data.y_train, config.num_clients, config.partition, alpha=config.alpha, seed=config.seed)
    return _partition(config.dataset, config.seed, tuple(sorted(config.dataset_kwargs.items())),
                      config.num_clients, config.partition, float(config.alpha))
