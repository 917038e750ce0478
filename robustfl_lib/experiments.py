"""The experiments the Byzantine chapters share: one aggregator against every attack.

Chapters ``03_byzantine_threats`` to ``08_stronger_aggregators`` each run the same
grid (an aggregator, each attack at a fraction of Byzantine clients, and the
no-attack baseline on IID and non-IID data); the code lives here once, and the
chapters call it:

* :func:`run_attacks`: one FL run per attack, plus the no-attack run;
* :func:`final_accuracy`, :func:`accuracy_table`: the numbers the chapters assert on;
* :func:`byzantine_selection_rate`, :func:`kept_share`: what the aggregator let through;
* :func:`toy_updates`: honest and Byzantine updates in 2-D for the geometric pictures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .byzantine import ByzantineAttack, DataPoisoning, get_attack
from .data import Dataset
from .federated import FLConfig, FLResult, run_federated, run_grid

__all__ = [
    "ATTACK_NAMES",
    "RunFailure",
    "attack_configs",
    "run_attacks",
    "final_accuracy",
    "accuracy_table",
    "byzantine_selection_rate",
    "kept_share",
    "toy_updates",
]

#: Every attack of :mod:`robustfl_lib.byzantine`, in the order the chapters show them.
ATTACK_NAMES: tuple[str, ...] = (
    "sign_flip",
    "scaling",
    "gaussian",
    "model_replacement",
    "alie",
    "ipm",
    "mimic",
    "nonfinite",
    "label_flip",
)


@dataclasses.dataclass
class RunFailure:
    """A run that could not go on: ``kind`` is ``"refused"`` when the aggregator refused
    the updates (the mean given a NaN update) and ``"diverged"`` when the global model
    was destroyed so that honest training itself became non-finite. ``history`` holds
    the rounds completed before."""

    error: str
    kind: str
    history: list[dict] = dataclasses.field(default_factory=list)

    def __repr__(self) -> str:
        return f"RunFailure({self.kind}: {self.error!r}, after {len(self.history)} rounds)"


def attack_configs(
    config: FLConfig,
    attacks: Sequence[str | ByzantineAttack | DataPoisoning] = ATTACK_NAMES,
    baseline: bool = True,
) -> dict[str, FLConfig]:
    """``{attack name: config}``: ``config`` once per attack at ``config.byzantine_fraction``,
    and with ``baseline`` first ``"none"``: the same aggregator with the same ``f`` and no
    Byzantine client (the reference a rule's breakdown is measured against)."""
    runs: dict[str, FLConfig] = {}
    if baseline:
        runs["none"] = dataclasses.replace(
            config, byzantine_fraction=0.0, byzantine_attack=None, aggregator_f=config.resolved_aggregator_f
        )
    for attack in attacks:
        name = attack if isinstance(attack, str) else type(get_attack(attack)).__name__
        runs[name] = dataclasses.replace(config, byzantine_attack=attack)
    return runs


def run_attacks(
    config: FLConfig,
    attacks: Sequence[str | ByzantineAttack | DataPoisoning] = ATTACK_NAMES,
    data: Dataset | None = None,
    baseline: bool = True,
    seeds: Sequence[int] | None = None,
) -> dict[str, FLResult | RunFailure] | dict[str, list[FLResult | RunFailure]]:
    """Run ``config`` once per attack (:func:`attack_configs`); keys are the attacks' names.

    A run that raises ``ValueError`` (the mean refusing a non-finite update) or
    ``FloatingPointError`` (honest training on a destroyed model) is recorded as a
    :class:`RunFailure` with the rounds it completed, rather than stopping the grid.
    The runs train in lock step, batched together (:func:`robustfl_lib.federated.run_grid`,
    same numbers as one run at a time); if any run fails, or the configuration cannot be
    batched, they are run one at a time instead.

    With ``seeds`` every attack runs once per seed, all in one lock-step grid
    (:func:`robustfl_lib.evidence.run_over_seeds`), and each value is the list of
    results in seed order: what the chapters' claims are measured on.
    """
    runs = attack_configs(config, attacks, baseline)
    if seeds is not None:
        from .evidence import run_over_seeds  # evidence builds on this module

        return run_over_seeds(runs, seeds, data=data)
    try:
        return dict(zip(runs, run_grid(list(runs.values()), data=data, progress=False)))
    except (ValueError, FloatingPointError):
        pass  # one run fails (or the configs cannot be batched): run them one by one to see which
    out: dict[str, FLResult | RunFailure] = {}
    for name, cfg in runs.items():
        done: list[dict] = []
        try:
            out[name] = run_federated(cfg, data=data, callback=done.append)
        except ValueError as err:
            out[name] = RunFailure(str(err), "refused", done)
        except FloatingPointError as err:
            out[name] = RunFailure(str(err), "diverged", done)
    return out


def final_accuracy(result: FLResult | RunFailure, last: int = 5) -> float:
    """Mean test accuracy over the ``last`` rounds (less noisy than the last round alone);
    NaN for a failed run."""
    if isinstance(result, RunFailure):
        return float("nan")
    return float(result.metric("clean_accuracy")[-last:].mean())


def accuracy_table(grid: Mapping[str, Mapping[str, FLResult | RunFailure]], last: int = 5) -> str:
    """A markdown table of :func:`final_accuracy`: one row per aggregator, one column per attack."""
    attacks = list(next(iter(grid.values())))
    lines = ["| aggregator | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
    for agg, runs in grid.items():
        cells = [runs[a].kind if isinstance(runs[a], RunFailure) else f"{final_accuracy(runs[a], last):.2f}" for a in attacks]
        lines.append(f"| {agg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def byzantine_selection_rate(result: FLResult) -> float:
    """For selection rules (Krum, Multi-Krum, Bulyan): the fraction of the selected
    updates, over all rounds, that came from Byzantine clients."""
    chosen = byz = 0
    for h in result.history:
        sel = h["aggregation"].get("selected")
        if sel is None:
            raise ValueError("this run's aggregator records no selection (use kept_share for coordinate-wise rules)")
        chosen += len(sel)
        byz += sum(c in h["byzantine"] for c in sel)
    return byz / chosen if chosen else float("nan")


def kept_share(result: FLResult) -> tuple[float, float]:
    """For coordinate-wise rules (median, trimmed mean): the mean ``kept_fraction`` of
    the Byzantine and of the honest participants over all rounds: how often each
    kind of client's value entered the aggregate."""
    byz, honest = [], []
    for h in result.history:
        kept = h["aggregation"].get("kept_fraction")
        if kept is None:
            raise ValueError("this run's aggregator records no kept_fraction")
        for cid, k in zip(h["participants"], kept):
            (byz if cid in h["byzantine"] else honest).append(k)
    return (float(np.mean(byz)) if byz else float("nan")), float(np.mean(honest))


def toy_updates(
    num_honest: int = 16,
    num_byzantine: int = 4,
    attack: str | ByzantineAttack | None = None,
    seed: int = 0,
    center: Sequence[float] = (1.0, 0.5),
    spread: Sequence[float] = (0.35, 0.25),
    **attack_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(honest, byzantine)`` updates in 2-D for the chapters' geometric pictures:
    honest ~ N(center, diag(spread)^2), Byzantine = ``attack(honest, num_byzantine)``
    (an empty ``(0, 2)`` tensor without an attack)."""
    g = torch.Generator().manual_seed(seed)
    honest = torch.tensor(center) + torch.tensor(spread) * torch.randn(num_honest, 2, generator=g)
    if attack is None:
        return honest, honest.new_empty((0, 2))
    atk = get_attack(attack, **attack_kwargs)
    if isinstance(atk, DataPoisoning):
        raise ValueError("label flipping acts on training data, not on updates; it has no 2-D picture")
    return honest, atk(honest, num_byzantine, generator=g)
