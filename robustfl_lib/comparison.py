"""The aggregator x attack x Byzantine-fraction comparison of chapter ``09_robust_federated_learning``.

:func:`compare_aggregators` runs every combination in lock step with
:func:`robustfl_lib.federated.run_grid` (one batched local-training computation
per round for all runs). A combination whose aggregator cannot tolerate that
many Byzantine clients by its own requirement (Bulyan's ``n >= 4f + 3``, Krum's
``n > 2f + 2``, ...) is not run and shows as NaN: outside its guarantee the rule
refuses to run rather than give a number. :func:`breakdown_fraction` reads the
empirical breakdown point off the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from .aggregators import get_aggregator
from .data import Dataset
from .federated import FLConfig, run_grid

__all__ = ["Comparison", "compare_aggregators", "breakdown_fraction", "plot_comparison"]


@dataclasses.dataclass
class Comparison:
    """Final accuracies, indexed ``[aggregator, attack, fraction]`` (NaN: not run, see module doc)."""

    aggregators: list[str]
    attacks: list[str]
    fractions: list[float]
    clean: np.ndarray
    robust: np.ndarray | None

    def worst_case(self, metric: str = "clean") -> np.ndarray:
        """``[aggregator, fraction]``: the accuracy under the most damaging attack (NaN if any was not run)."""
        return getattr(self, metric).min(axis=1)

    def table(self, metric: str = "clean") -> str:
        """A plain-text table: one row per aggregator x attack, one column per fraction."""
        values = getattr(self, metric)
        head = f"{'aggregator':>18} {'attack':>10} " + " ".join(f"{f:>6.0%}" for f in self.fractions)
        lines = [head]
        for i, agg in enumerate(self.aggregators):
            for j, atk in enumerate(self.attacks):
                cells = " ".join("     -" if np.isnan(v) else f"{v:6.3f}" for v in values[i, j])
                lines.append(f"{agg:>18} {atk:>10} {cells}")
        return "\n".join(lines)


def _feasible(config: FLConfig) -> bool:
    agg = get_aggregator(config.aggregator, f=config.resolved_aggregator_f, **config.aggregator_kwargs)
    try:
        if hasattr(agg, "requirement"):
            agg.requirement(config.participants_per_round, agg.f)
    except ValueError:
        return False
    return True


def compare_aggregators(
    base: FLConfig,
    aggregators: Sequence[str],
    attacks: Sequence[str],
    fractions: Sequence[float],
    data: Dataset | None = None,
    progress: bool = True,
) -> Comparison:
    """Run ``base`` for every aggregator x attack x Byzantine fraction; fraction 0 is run
    once per aggregator (no attacker) and shared by every attack's column."""
    if not aggregators or not attacks or not fractions:
        raise ValueError("need at least one aggregator, one attack and one fraction")
    configs, where = [], []
    for i, agg in enumerate(aggregators):
        for k, frac in enumerate(fractions):
            for j, atk in enumerate(attacks if frac > 0 else attacks[:1]):
                cfg = dataclasses.replace(base, aggregator=agg, byzantine_fraction=frac,
                                          byzantine_attack=atk if frac > 0 else None, aggregator_f=None,
                                          progress=False)
                if _feasible(cfg):
                    configs.append(cfg)
                    where.append((i, j if frac > 0 else slice(None), k))
    shape = (len(aggregators), len(attacks), len(fractions))
    clean = np.full(shape, np.nan)
    robust = np.full(shape, np.nan) if base.eval_eps is not None else None
    for (i, j, k), result in zip(where, run_grid(configs, data=data, progress=progress)):
        last = result.history[-1]
        clean[i, j, k] = last["clean_accuracy"]
        if robust is not None:
            robust[i, j, k] = last["robust_accuracy"]
    return Comparison(list(aggregators), list(attacks), list(fractions), clean, robust)


def breakdown_fraction(comparison: Comparison, threshold: float = 0.5, metric: str = "clean") -> list[float]:
    """Per aggregator, the smallest tested fraction at which some attack (or the rule's own
    requirement) pushes accuracy below ``threshold``; ``inf`` if none up to the largest tested."""
    worst = comparison.worst_case(metric)
    out = []
    for row in worst:
        broken = [f for f, v in zip(comparison.fractions, row) if np.isnan(v) or v < threshold]
        out.append(min(broken) if broken else float("inf"))
    return out


def plot_comparison(comparison: Comparison, metric: str = "clean", vmin: float = 0.0, vmax: float = 1.0):
    """One heatmap per attack: aggregator (rows) x Byzantine fraction (columns), cells = final accuracy."""
    values = getattr(comparison, metric)
    n_att = len(comparison.attacks)
    fig, axes = plt.subplots(1, n_att, figsize=(2.3 * n_att + 1.5, 0.42 * len(comparison.aggregators) + 1.6),
                             sharey=True, squeeze=False)
    for j, (ax, atk) in enumerate(zip(axes[0], comparison.attacks)):
        data = np.ma.masked_invalid(values[:, j, :])
        # cividis: ordered for readers with a red-green colour vision deficiency (RdYlGn is not)
        im = ax.imshow(data, vmin=vmin, vmax=vmax, cmap="cividis", aspect="auto")
        for (i, k), v in np.ndenumerate(values[:, j, :]):
            dark = not np.isnan(v) and v < vmin + 0.5 * (vmax - vmin)  # cividis is dark at the low end
            ax.text(k, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                    color="white" if dark else "black")
        ax.set_xticks(range(len(comparison.fractions)), [f"{f:.0%}" for f in comparison.fractions], fontsize=7)
        ax.set_title(atk, fontsize=9)
        ax.set_xlabel("Byzantine", fontsize=8)
    axes[0][0].set_yticks(range(len(comparison.aggregators)), comparison.aggregators, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=f"final {metric} accuracy")
    return axes
