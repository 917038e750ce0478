"""The benchmark's configuration: reading a TOML file or a dict, validating every key, and the
plan of runs (one FLConfig per cell x setting x attack), built before any training."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..aggregators import AGGREGATOR_ALIASES, AGGREGATORS, Pipeline, get_aggregator
from ..aggregators.preaggregation import PRE_AGGREGATORS
from ..byzantine import ADAPTIVE_ATTACKS, ATTACKS, ByzantineAttack, get_attack
from ..evidence import MIN_SEEDS
from ..federated import FLConfig
from ..runtime import base_seed as env_base_seed
from ..runtime import derive_seeds

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

__all__ = ["WorstCaseConfig", "load_worst_case_config", "WORST_CASE_CONVENTIONS"]

#: Where the minimum over attacks is taken (see the module docstring).
WORST_CASE_CONVENTIONS = ("mean", "per_seed")

_BENCH_KEYS = ("rules", "attacks", "fractions", "heterogeneity", "seeds", "base_seed", "validation_fraction",
               "worst_case", "grid", "full")
_FL_FIELDS = tuple(f.name for f in dataclasses.fields(FLConfig))
_SET_BY_BENCHMARK = ("aggregator", "aggregator_kwargs", "byzantine_fraction", "byzantine_attack", "attack_kwargs",
                     "partition", "alpha", "seed", "progress")
# Settings that define the problem, not the method: a rule's grid may not tune them.
_PROBLEM = ("dataset", "dataset_kwargs", "model", "num_clients", "clients_per_round", "rounds", "dropout", "device")


@dataclasses.dataclass(frozen=True)
class _Setting:
    label: str
    fl: dict[str, Any]  # FLConfig fields
    kwargs: dict[str, Any]  # the final aggregator's
    steps: dict[str, dict[str, Any]]  # per pre-aggregation step name


@dataclasses.dataclass(frozen=True)
class _Rule:
    label: str
    name: str
    settings: tuple[_Setting, ...]


@dataclasses.dataclass(frozen=True)
class _Attack:
    label: str
    name: str
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class WorstCaseConfig:
    """A validated benchmark configuration (:func:`load_worst_case_config` builds it).

    ``fl``: the FLConfig fields every run shares; ``rules``, ``attacks``: what is compared and
    what attacks; ``fractions``, ``heterogeneity`` (``"iid"`` or Dirichlet alphas): the cells'
    axes; ``seeds``: derived from ``base_seed``."""

    fl: dict[str, Any]
    rules: tuple[_Rule, ...]
    attacks: tuple[_Attack, ...]
    fractions: tuple[float, ...]
    heterogeneity: tuple[str | float, ...]
    seeds: tuple[int, ...]
    base_seed: int
    validation_fraction: float = 0.2
    worst_case: str = "mean"


class _ConfigError(ValueError):
    pass


def _fail(where: str, message: str) -> NoReturn:
    raise _ConfigError(f"{where}: {message}" if where else message)


def _read(spec: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        return copy.deepcopy(dict(spec))
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"config must be a path to a TOML file or a dict, got {type(spec).__name__}")
    if tomllib is None:
        raise RuntimeError("reading a TOML config needs Python >= 3.11 (tomllib) or the tomli package "
                           "(pip install tomli); or pass the configuration as a dict")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise _ConfigError(f"{path}: not valid TOML: {err}") from None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _as_list(value: Any, where: str) -> list[Any]:
    out = list(value) if isinstance(value, (list, tuple)) else [value]
    if not out:
        _fail(where, "needs at least one value")
    return out


def _named(entry: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(entry, str):
        return {"name": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        _fail(where, f"must be a name or a table with a 'name', got {entry!r}")
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        _fail(where, f"unknown key(s) {unknown}; allowed: {list(allowed)}")
    return dict(entry)


def _settings(name: str, grid: Any, where: str) -> tuple[_Setting, ...]:
    if grid is None:
        return (_Setting("default", {}, {}, {}),)
    if not isinstance(grid, Mapping):
        _fail(where, f"grid must be a table of lists, got {grid!r}")
    pre = name.split("+")[:-1]
    axes: list[tuple[tuple[str, ...], list[Any]]] = []
    for key, values in grid.items():
        if isinstance(values, Mapping):  # a pre-aggregation step's own parameters, e.g. bucketing.s
            if key not in pre:
                _fail(where, f"grid.{key} names no pre-aggregation step of {name!r} (steps: {pre})")
            axes += [((key, k), _as_list(v, f"{where}: grid.{key}.{k}")) for k, v in values.items()]
        elif key in _FL_FIELDS and (key in _SET_BY_BENCHMARK or key in _PROBLEM):
            _fail(where, f"grid.{key} cannot be tuned per rule ({key} is set for the whole benchmark)")
        else:
            axes.append(((key,), _as_list(values, f"{where}: grid.{key}")))
    out = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        fl: dict[str, Any] = {}
        kwargs: dict[str, Any] = {}
        steps: dict[str, dict[str, Any]] = {}
        for (path, _), v in zip(axes, combo):
            if len(path) == 2:
                steps.setdefault(path[0], {})[path[1]] = v
            elif path[0] in _FL_FIELDS:
                fl[path[0]] = v
            else:
                kwargs[path[0]] = v
        label = " ".join(f"{'.'.join(p)}={v}" for (p, _), v in zip(axes, combo)) or "default"
        out.append(_Setting(label, fl, kwargs, steps))
    return tuple(out)


def load_worst_case_config(spec: str | os.PathLike | Mapping[str, Any], full: bool = False,
                           base_seed: int | None = None) -> WorstCaseConfig:
    """Read and validate a benchmark config: a TOML file (``tomllib``) or a dict of the same shape.

    Top-level keys: any :class:`~robustfl_lib.FLConfig` field shared by every run
    (``dataset``, ``num_clients``, ``rounds``, ``local_epochs``, ``lr``, ...; not the ones the
    benchmark sets: aggregator, attack, fraction, partition, alpha, seed), and

    * ``rules``: names (``"median"``, ``"nnm+trimmed_mean"``) or tables ``{name, label, grid}``;
      ``grid`` maps a hyperparameter to its values: an FLConfig field (``lr``), a keyword of
      the final aggregator (``tau``), or a table for a pre-aggregation step (``bucketing.s``);
      the settings are the product of the lists;
    * ``grid``: a grid of FLConfig fields every rule is tuned over (ByzFL's learning-rate list),
      merged into each rule's own (the rule's values win);
    * ``attacks``: names or tables ``{name, label, kwargs}``;
    * ``fractions`` (Byzantine fractions in [0, 1); 0 runs without attack),
      ``heterogeneity`` (``"iid"`` and/or Dirichlet alphas), ``seeds`` (k, default 5, or a
      list), ``base_seed`` (default ``$ROBUSTFL_SEED``), ``validation_fraction`` (0.2),
      ``worst_case`` (``"mean"`` or ``"per_seed"``);
    * ``full``: a table of the same keys that replaces them when ``full=True``.

    ``base_seed`` given here overrides the config's. Bad input raises ``ValueError`` naming
    the key; every run's FLConfig is built and validated here, before any training.
    """
    raw = _read(spec)
    overrides = raw.pop("full", {})
    if not isinstance(overrides, Mapping):
        _fail("full", f"must be a table of overrides, got {overrides!r}")
    for where, table in (("", raw), ("full", overrides)):
        unknown = sorted(k for k in table if k not in _BENCH_KEYS and k not in _FL_FIELDS)
        if unknown:
            _fail(where, f"unknown key(s) {unknown}; known: benchmark keys {list(_BENCH_KEYS)} and FLConfig fields")
        taken = sorted(k for k in table if k in _SET_BY_BENCHMARK)
        if taken:
            _fail(where, f"{taken} are set by the benchmark (rules, attacks, fractions, heterogeneity, seeds)")
    if full:
        raw.update(overrides)
    fl = {k: v for k, v in raw.items() if k in _FL_FIELDS}
    try:
        FLConfig(**fl, progress=False).validate()
    except (TypeError, ValueError) as err:
        _fail("", f"bad FLConfig setting: {err}")
    num_clients = FLConfig(**fl).num_clients
    fractions = _as_list(raw.get("fractions", [0.2]), "fractions")
    for p in fractions:
        if not _number(p) or not 0 <= p < 1:
            _fail("fractions", f"each Byzantine fraction must be a number in [0, 1), got {p!r}")
        if p > 0 and FLConfig(num_clients=num_clients, byzantine_fraction=p).num_byzantine == 0:
            _fail("fractions", f"{p} of {num_clients} clients makes no client Byzantine; use 0 for the no-attack run")
    if len(set(fractions)) != len(fractions):
        _fail("fractions", f"repeated values in {fractions}")
    het = _as_list(raw.get("heterogeneity", ["iid"]), "heterogeneity")
    for h in het:
        if h != "iid" and not (_number(h) and h > 0):
            _fail("heterogeneity", f"each level must be 'iid' or a Dirichlet alpha > 0, got {h!r}")
    wc = raw.get("worst_case", "mean")
    if wc not in WORST_CASE_CONVENTIONS:
        _fail("worst_case", f"must be one of {WORST_CASE_CONVENTIONS}, got {wc!r}")
    vf = raw.get("validation_fraction", 0.2)
    if not _number(vf) or not 0 < vf < 1:
        _fail("validation_fraction", f"must be a number in (0, 1), got {vf!r}")
    base = raw.get("base_seed") if base_seed is None else base_seed
    base = env_base_seed() if base is None else base
    if isinstance(base, bool) or not isinstance(base, int) or base < 0:
        _fail("base_seed", f"must be a non-negative integer, got {base!r}")
    seeds_spec = raw.get("seeds", MIN_SEEDS)
    if isinstance(seeds_spec, (list, tuple)):
        seeds = list(seeds_spec)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            _fail("seeds", f"a list of seeds must hold distinct non-negative integers, got {seeds!r}")
    elif isinstance(seeds_spec, int) and not isinstance(seeds_spec, bool):
        seeds = derive_seeds(base, seeds_spec) if seeds_spec >= 1 else []
    else:
        _fail("seeds", f"must be a number of seeds k or a list of seeds, got {seeds_spec!r}")
    if len(seeds) < 2:
        _fail("seeds", f"an interval over seeds needs k >= 2 (the book uses k >= {MIN_SEEDS}), got {seeds_spec!r}")
    common = raw.get("grid", {})
    if not isinstance(common, Mapping) or any(k not in _FL_FIELDS for k in common):
        _fail("grid", f"the common grid must be a table of FLConfig fields (e.g. lr = [0.1, 0.3]), got {common!r}")
    rules = []
    for i, entry in enumerate(_as_list(raw.get("rules", []), "rules")):
        e = _named(entry, f"rules[{i}]", ("name", "label", "grid"))
        where = f"rules[{i}] ({e.get('label', e['name'])})"
        *pre, final = e["name"].split("+")
        if AGGREGATOR_ALIASES.get(final, final) not in AGGREGATORS:
            _fail(where, f"unknown aggregator {final!r}; choose one of {sorted(AGGREGATORS)}")
        if any(s not in PRE_AGGREGATORS for s in pre):
            _fail(where, f"unknown pre-aggregator in {e['name']!r}; choose from {sorted(PRE_AGGREGATORS)}")
        own = e.get("grid", {})
        if not isinstance(own, Mapping):
            _fail(where, f"grid must be a table of lists, got {own!r}")
        grid = {**common, **own} or None
        rules.append(_Rule(str(e.get("label", e["name"])), e["name"], _settings(e["name"], grid, where)))
    attacks = []
    registry = {**ATTACKS, **ADAPTIVE_ATTACKS}
    for i, entry in enumerate(_as_list(raw.get("attacks", []), "attacks")):
        e = _named(entry, f"attacks[{i}]", ("name", "label", "kwargs"))
        if e["name"] not in registry:
            _fail(f"attacks[{i}]", f"unknown attack {e['name']!r}; choose one of {sorted(registry)}")
        kwargs = e.get("kwargs", {})
        if not isinstance(kwargs, Mapping):
            _fail(f"attacks[{i}]", f"kwargs must be a table, got {kwargs!r}")
        attacks.append(_Attack(str(e.get("label", e["name"])), e["name"], dict(kwargs)))
    for what, items in (("rules", rules), ("attacks", attacks)):
        labels = [x.label for x in items]
        if len(set(labels)) != len(labels) or (what == "attacks" and "none" in labels):
            _fail(what, f"labels must be distinct (give 'label' to repeated names; 'none' is reserved): {labels}")
    config = WorstCaseConfig(fl, tuple(rules), tuple(attacks), tuple(float(p) for p in fractions), tuple(het),
                             tuple(int(s) for s in seeds), int(base), float(vf), wc)
    _plan(config)  # builds and validates every run now, so a bad setting fails before any training
    return config


def _het_label(h: str | float) -> str:
    return "iid" if h == "iid" else f"dirichlet({h:g})"


def _build_rule(name: str, f: int, setting: _Setting):
    agg = get_aggregator(name, f=f, **setting.kwargs)
    if not setting.steps:
        return agg
    *pre, final = name.split("+")

    def make(cls, kwargs):
        return cls(**({**kwargs, "f": f} if "f" in inspect.signature(cls).parameters else kwargs))

    steps = [make(PRE_AGGREGATORS[p], setting.steps.get(p, {})) for p in pre]
    return Pipeline(*steps, make(AGGREGATORS[AGGREGATOR_ALIASES.get(final, final)], setting.kwargs))


def _attack_for(attack: _Attack, rule: Any, f: int) -> tuple[Any, dict[str, Any]]:
    """``(byzantine_attack, attack_kwargs)`` for FLConfig: the name, or an object built against ``rule``."""
    cls = {**ATTACKS, **ADAPTIVE_ATTACKS}[attack.name]
    params = inspect.signature(cls).parameters

    def against_rule():
        kwargs = {**attack.kwargs, "aggregator": copy.deepcopy(rule)}
        if "f" in params and "f" not in attack.kwargs:
            kwargs["f"] = f
        return get_attack(attack.name, **kwargs), {}

    if attack.kwargs.get("aggregator") == "rule":
        return against_rule()
    try:
        get_attack(attack.name, **attack.kwargs)
    except ValueError:
        if "aggregator" in params and "aggregator" not in attack.kwargs:
            return against_rule()
        raise
    return attack.name, dict(attack.kwargs)


def _probe(spec: Any, kwargs: dict[str, Any], num_honest: int, num_byzantine: int) -> None:
    """Forge once on small random updates, so that a bad attack setting (``z="big"``) fails here,
    as a config error, and not as every run's failure (which would score 0)."""
    attack = copy.deepcopy(get_attack(spec, **kwargs))
    if isinstance(attack, ByzantineAttack):
        attack.reset()
        gen = torch.Generator().manual_seed(0)
        try:
            attack(torch.randn(num_honest, 16, generator=gen), num_byzantine, generator=gen)
        except Exception as err:  # whatever stops it here would stop every run of it
            raise ValueError(f"the attack cannot forge updates here ({num_honest} honest, {num_byzantine} "
                             f"Byzantine): {type(err).__name__}: {err}") from None


def _plan(config: WorstCaseConfig) -> list[dict[str, Any]]:
    """One entry per cell x setting: its FLConfig per attack, or why the rule cannot run there."""
    base = FLConfig(**config.fl, progress=False)
    plan = []
    probed: set[tuple[Any, ...]] = set()  # a probe depends on the attack, the rule and the counts only
    for h, rule, p in itertools.product(config.heterogeneity, config.rules, config.fractions):
        for setting in rule.settings:
            where = f"rule {rule.label!r}, setting {setting.label!r}, fraction {p}"
            try:
                cfg = dataclasses.replace(base, **setting.fl, byzantine_fraction=p,
                                          partition="iid" if h == "iid" else "dirichlet",
                                          alpha=base.alpha if h == "iid" else float(h))
                f = cfg.resolved_aggregator_f
                agg = _build_rule(rule.name, f, setting)
            except (TypeError, ValueError) as err:
                _fail(where, str(err))
            entry = {"heterogeneity": _het_label(h), "fraction": p, "num_byzantine": cfg.num_byzantine,
                     "rule": rule.label, "setting": setting.label, "runs": {}, "na": None}
            plan.append(entry)
            if hasattr(agg, "requirement"):
                try:
                    agg.requirement(cfg.participants_per_round, agg.f)
                except ValueError as err:
                    entry["na"] = str(err)
                    continue
            named = {"aggregator": agg, "aggregator_kwargs": {}} if setting.steps else \
                {"aggregator": rule.name, "aggregator_kwargs": dict(setting.kwargs)}
            attacks = config.attacks if cfg.num_byzantine else (_Attack("none", "", {}),)
            for attack in attacks:
                try:
                    atk, kw = (None, {}) if attack.label == "none" else _attack_for(attack, agg, f)
                    key = (attack.label, rule.label, repr(setting.kwargs), repr(setting.steps), f,
                           cfg.participants_per_round, cfg.num_byzantine)
                    if atk is not None and key not in probed:
                        _probe(atk, kw, cfg.participants_per_round - cfg.num_byzantine, cfg.num_byzantine)
                        probed.add(key)
                    run = dataclasses.replace(cfg, **named, byzantine_attack=atk, attack_kwargs=kw)
                    run.validate()
                except (TypeError, ValueError) as err:
                    _fail(f"{where}, attack {attack.label!r}", str(err))
                entry["runs"][attack.label] = run
    return plan
