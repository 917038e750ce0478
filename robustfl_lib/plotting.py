"""Figures the chapters share (matplotlib; each function returns its Axes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["plot_images", "plot_label_distribution", "plot_history"]


def _axes(ax, figsize):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_images(
    images: torch.Tensor, labels: Sequence | None = None, ncols: int = 10, title: str | None = None, size: float = 1.0
):
    """A grid of (N, C, H, W) images in [0, 1], each titled with its label if given."""
    images = images.detach().cpu()
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * 1.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i]
            img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
            ax.imshow(img.numpy(), cmap="gray_r", vmin=0, vmax=1)
            if labels is not None:
                ax.set_title(str(labels[i]), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return axes


def plot_label_distribution(counts: np.ndarray, ax=None, title: str | None = None):
    """Stacked bars: the label mix of each client (``counts`` from ``data.label_counts``)."""
    counts = np.asarray(counts)
    ax = _axes(ax, (7, 3))
    bottom = np.zeros(len(counts))
    cmap = plt.get_cmap("tab10" if counts.shape[1] <= 10 else "tab20")
    for k in range(counts.shape[1]):
        ax.bar(np.arange(len(counts)), counts[:, k], bottom=bottom, color=cmap(k % cmap.N), label=str(k))
        bottom += counts[:, k]
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.set_xticks(np.arange(len(counts)))
    ax.legend(title="label", ncol=2, fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    if title:
        ax.set_title(title)
    return ax


def plot_history(histories: Mapping[str, Sequence[Mapping]], key: str = "clean_accuracy", ax=None, title=None):
    """One line per run: ``key`` against the round number."""
    ax = _axes(ax, (6, 3.5))
    for name, hist in histories.items():
        ax.plot([h["round"] for h in hist], [h[key] for h in hist], marker="o", ms=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return ax


# ---------------------------------------------------------------- Byzantine chapters (03-08)

__all__ += ["plot_aggregation_2d", "plot_accuracy_heatmap", "plot_attack_runs", "plot_attack_bars"]


def plot_aggregation_2d(
    honest: torch.Tensor,
    byzantine: torch.Tensor,
    aggregators: Mapping[str, object],
    kept: str | None = None,
    ax=None,
    title: str | None = None,
):
    """Honest (dots) and Byzantine (crosses) 2-D updates, the honest mean (+), and each
    aggregator's output (stars). ``kept`` names one aggregator whose choice is drawn:
    the updates a selection rule kept are ringed; for a weighted average (geometric median,
    centered clipping) the ring's area is the row's weight; for the median and the trimmed
    mean the box spans, per coordinate, the values that were averaged. Chapters ``03``-``08``."""
    from .aggregators import Median, TrimmedMean
    from .robust_stats import sort_columns

    ax = _axes(ax, (5, 4.2))
    x = torch.cat([honest, byzantine]).float()
    h, b = honest.detach().cpu().numpy(), byzantine.detach().cpu().numpy()
    b = b[np.isfinite(b).all(axis=1)]
    ax.scatter(h[:, 0], h[:, 1], s=22, color="C0", alpha=0.8, label="honest")
    if len(b):
        ax.scatter(b[:, 0], b[:, 1], s=70, color="C3", marker="x", linewidths=2, label="Byzantine")
    mu = h.mean(axis=0)
    ax.scatter([mu[0]], [mu[1]], s=120, color="black", marker="+", linewidths=2, label="honest mean", zorder=4)
    for i, (name, agg) in enumerate(aggregators.items()):
        out = agg(x).detach().cpu().numpy()
        color = f"C{(i + 1) % 10}" if i + 1 != 3 else "C9"
        ax.scatter([out[0]], [out[1]], s=200, marker="*", color=color, edgecolor="black", zorder=5, label=name)
        if name == kept:
            info = getattr(agg, "last_info", {})
            if "selected" in info:
                sel = x[info["selected"]].cpu().numpy()
                ax.scatter(sel[:, 0], sel[:, 1], s=160, facecolors="none", edgecolors=color, linewidths=1.5,
                           label=f"kept by {name}")
            elif "weights" in info:  # a weighted average of the rows: ring area ~ weight
                w = info["weights"].detach().cpu().numpy()[: len(x)]
                xs = x.cpu().numpy()
                ax.scatter(xs[:, 0], xs[:, 1], s=600 * len(xs) * w / max(w.sum(), 1e-12) / 4, facecolors="none",
                           edgecolors=color, linewidths=1.2, label=f"weight in {name}")
            elif isinstance(agg, (Median, TrimmedMean)):
                finite = x[torch.isfinite(x).all(dim=1)]
                s = sort_columns(finite).cpu().numpy()
                n = len(s)
                f = (n - 1) // 2 if isinstance(agg, Median) else max(agg.f - (len(x) - n), 0)
                lo, hi = s[f], s[n - 1 - f]
                ax.add_patch(plt.Rectangle(lo, *(hi - lo), fill=True, alpha=0.15, color=color,
                                           label=f"values averaged by {name}"))
                if isinstance(agg, Median):  # half of the values on each side, per coordinate
                    ax.axvline(out[0], color=color, ls="--", lw=1)
                    ax.axhline(out[1], color=color, ls="--", lw=1)
    ax.set_xlabel("coordinate 1")
    ax.set_ylabel("coordinate 2")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title)
    return ax


def plot_accuracy_heatmap(grid: Mapping[str, Mapping[str, object]], ax=None, title: str | None = None, last: int = 5):
    """Final test accuracy (mean of the ``last`` rounds) per aggregator (rows) and attack
    (columns); runs that failed (refused NaN, or diverged) are grey. Chapters ``03``-``08``."""
    from .experiments import final_accuracy

    from .experiments import RunFailure

    rows, cols = list(grid), list(next(iter(grid.values())))
    acc = np.array([[final_accuracy(grid[r][c], last) for c in cols] for r in rows])
    ax = _axes(ax, (1.0 + 0.75 * len(cols), 0.8 + 0.45 * len(rows)))
    # cividis, not a red-green map: its lightness rises with accuracy, so readers with a red-green
    # colour vision deficiency (and a grey-scale print) read the same order.
    cmap = plt.get_cmap("cividis").copy()
    cmap.set_bad("lightgray")
    ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            run = grid[rows[i]][cols[j]]
            dark = np.isfinite(acc[i, j]) and acc[i, j] < 0.5  # white text on cividis's dark blue half
            ax.text(j, i, run.kind if isinstance(run, RunFailure) else f"{acc[i, j]:.2f}", ha="center", va="center",
                    fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), [c.replace("_", " ") for c in cols], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_attack_runs(runs: Mapping[str, object], key: str = "clean_accuracy", ax=None, title: str | None = None):
    """One line per attack: ``key`` against the round (failed runs dotted, up to their
    last completed round). Chapters ``03``-``08``."""
    from .experiments import RunFailure

    ax = _axes(ax, (6, 3.5))
    for i, (name, r) in enumerate(runs.items()):
        style = dict(color="black", lw=2.5) if name == "none" else dict(color=f"C{i % 10}", lw=1.2)
        if isinstance(r, RunFailure):
            rounds = [h["round"] for h in r.history]
            ax.plot(rounds, [h[key] for h in r.history], ls=":", label=f"{name.replace('_', ' ')} ({r.kind})", **style)
            continue
        ax.plot([h["round"] for h in r.history], [h[key] for h in r.history], label=name.replace("_", " "), **style)
    ax.set_xlabel("round")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    if title:
        ax.set_title(title)
    return ax


def plot_attack_bars(runs: Mapping[str, object], ax=None, title: str | None = None, last: int = 5):
    """Final test accuracy (mean of the ``last`` rounds) under each attack, one bar per
    attack, the no-attack run (``"none"``) as a dashed line; failed runs are marked.
    Chapters ``04``-``08``."""
    from .experiments import RunFailure, final_accuracy

    names = [k for k in runs if k != "none"]
    acc = [final_accuracy(runs[k], last) for k in names]
    ax = _axes(ax, (0.6 * len(names) + 1.5, 3.2))
    bars = ax.bar(range(len(names)), np.nan_to_num(acc), color=[f"C{i % 10}" for i in range(1, len(names) + 1)])
    for bar, k, a in zip(bars, names, acc):
        label = runs[k].kind if isinstance(runs[k], RunFailure) else f"{a:.2f}"
        ax.text(bar.get_x() + bar.get_width() / 2, max(np.nan_to_num(a), 0) + 0.01, label, ha="center",
                va="bottom", fontsize=7)
    if "none" in runs:
        ax.axhline(final_accuracy(runs["none"], last), color="black", ls="--", lw=1.2, label="no attack")
        ax.legend(fontsize=7, loc="lower left")
    ax.set_xticks(range(len(names)), [k.replace("_", " ") for k in names], rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel(f"test accuracy (last {last} rounds)")
    if title:
        ax.set_title(title)
    return ax
