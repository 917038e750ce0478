"""Running the benchmark: the validation split, lock-step groups of runs, rows of results."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..data import Dataset, load_dataset
from ..evidence import correct_predictions, final_metric, run_over_seeds
from ..experiments import RunFailure
from ..federated import GRID_VARIABLE, FLConfig, config_dict
from .config import WorstCaseConfig, _number, _plan, load_worst_case_config
from .result import ROW_COLUMNS, WorstCaseResult

__all__ = ["validation_split", "worst_case_benchmark"]


def validation_split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(fit, report)``: both train on ``data``'s training split minus a stratified ``fraction``
    of it (scikit-learn's ``train_test_split``, ``random_state=seed``: chapter
    ``09_robust_federated_learning``'s three-way split). ``fit`` holds that held-out part as its
    test split, so the FL loop evaluates on validation data; ``report`` holds the real test split."""
    from sklearn.model_selection import train_test_split

    if not _number(fraction) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    train, val = train_test_split(np.arange(len(data.y_train)), test_size=fraction,
                                  stratify=data.y_train.cpu().numpy(), random_state=seed)
    x, y = data.x_train[train], data.y_train[train]
    fit = Dataset(data.name, x, y, data.x_train[val], data.y_train[val], data.num_classes, data.class_names)
    report = Dataset(data.name, x, y, data.x_test, data.y_test, data.num_classes, data.class_names)
    return fit, report


def _fixed_fields(cfg: FLConfig) -> str:
    return repr(sorted((k, repr(v)) for k, v in config_dict(cfg).items() if k not in GRID_VARIABLE))


def _run_group(configs: Mapping[Any, FLConfig], seeds: Sequence[int], fit: Mapping[int, Dataset],
               report: Mapping[int, Dataset]) -> dict[Any, list[tuple[float, float, str]]]:
    """``{name: [(validation accuracy, test accuracy, status) per seed]}`` of one lock-step grid;
    a failed run is ``(0.0, 0.0, kind)``."""
    results = run_over_seeds(configs, seeds, data=fit)
    out = {}
    for name, runs in results.items():
        val = final_metric(runs)
        out[name] = [(0.0, 0.0, r.kind) if isinstance(r, RunFailure)
                     else (float(v), float(correct_predictions(r, report).mean()), "ok") for r, v in zip(runs, val)]
    return out


def worst_case_benchmark(config: str | os.PathLike | Mapping[str, Any] | WorstCaseConfig, progress: bool = True,
                         full: bool = False, base_seed: int | None = None) -> WorstCaseResult:
    """Run the worst-case benchmark (ByzFL's protocol, González et al. 2025, "ByzFL: Research
    Framework for Robust Federated Learning"; the package docstring has the details).

    For a cell (rule, heterogeneity, fraction), settings ``h`` of the rule's grid, attacks
    ``a`` and seeds ``s``, with ``V[h, a, s]`` and ``T[h, a, s]`` the final global model's
    accuracy on the validation and the test split (0 for a failed run):

    * ``worst_case="mean"`` (ByzFL's): ``h* = argmax_h min_a mean_s V[h, a, s]``, the worst
      attack on test ``a* = argmin_a mean_s T[h*, a, s]``, reported
      ``summarize(T[h*, a*, :], n_test)``;
    * ``worst_case="per_seed"``: ``h* = argmax_h mean_s min_a V[h, a, s]``, reported
      ``summarize(min_a T[h*, a, :], n_test)``.

    "Worst case" is thus the accuracy the rule keeps against the strongest attack of the set,
    with its hyperparameters chosen for that worst case on data the report never sees.

    ``config`` is a TOML path, a dict (:func:`load_worst_case_config`, with ``full`` and
    ``base_seed``) or a :class:`WorstCaseConfig`. Runs that may share a lock-step grid
    (:data:`robustfl_lib.federated.GRID_VARIABLE`) run together: per heterogeneity level and
    rule, every fraction, setting of the rule's own parameters, attack and seed, one grid per
    distinct value of the other settings (e.g. per learning rate). ``progress`` shows a tqdm
    bar over the runs. Returns a :class:`WorstCaseResult`. Chapter: ``17_which_rule``.
    """
    if not isinstance(config, WorstCaseConfig):
        config = load_worst_case_config(config, full=full, base_seed=base_seed)
    plan = _plan(config)
    base = FLConfig(**config.fl)
    fit, report = {}, {}
    for s in config.seeds:
        fit[s], report[s] = validation_split(load_dataset(base.dataset, seed=s, **base.dataset_kwargs),
                                             config.validation_fraction, s)
    groups: dict[tuple[str, str, str], dict[tuple[int, str], FLConfig]] = {}
    for i, entry in enumerate(plan):
        for label, run in entry["runs"].items():
            groups.setdefault((entry["heterogeneity"], entry["rule"], _fixed_fields(run)), {})[(i, label)] = run
    results: dict[tuple[int, str], list[tuple[float, float, str]]] = {}
    total = sum(len(g) for g in groups.values()) * len(config.seeds)
    with tqdm(total=total, desc="worst case", unit="run", disable=not progress) as bar:
        for (het, rule, _), named in groups.items():
            bar.set_postfix_str(f"{rule}, {het}")
            results.update(_run_group(named, config.seeds, fit, report))
            bar.update(len(named) * len(config.seeds))
    n_val, n_test = len(fit[config.seeds[0]].y_test), len(report[config.seeds[0]].y_test)
    rows = []
    for i, entry in enumerate(plan):
        cell = {k: entry[k] for k in ("heterogeneity", "fraction", "num_byzantine", "rule", "setting")}
        if entry["na"] is not None:
            rows.append({**dict.fromkeys(ROW_COLUMNS), **cell, "status": f"n/a: {entry['na']}"})
        for label in entry["runs"]:
            for s, (v, t, status) in zip(config.seeds, results[(i, label)]):
                rows.append({**cell, "attack": label, "seed": s, "val_accuracy": v, "test_accuracy": t,
                             "n_val": n_val, "n_test": n_test, "status": status})
    return WorstCaseResult(rows, worst_case=config.worst_case, config=config)
