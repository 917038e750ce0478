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
import typing
from collections.abc import Mapping
from typing import Any

import torch

from ..data import Dataset, load_dataset, partition
from ..federated import FLConfig

__all__ = ["config_to_run_config", "config_from_run_config", "cached_dataset", "cached_partition"]

_ALIASES = {"num-server-rounds": "rounds"}


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
    round instead of silently running the default. ``progress`` is off.

    Chapter ``14_scaling_out_with_flower``.
    """
    types = _field_types()
    values: dict[str, Any] = {"progress": False}
    for key, value in run_config.items():
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
