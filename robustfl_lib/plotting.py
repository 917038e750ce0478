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
