"""Schematic diagrams drawn with matplotlib (no network scripts, so the book builds offline).

:func:`plot_defense_pipeline` is the map of the book on its landing page.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

__all__ = ["plot_defense_pipeline"]

_HONEST, _BYZ, _DEF, _MODEL = "#cfe8cf", "#f4c7c3", "#d6e4f5", "#fde9b8"


def _box(ax, x, y, w, h, text, color, sub=None):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec="#333333", lw=1.2))
    ax.text(x, y + (0.07 if sub else 0), text, ha="center", va="center", fontsize=9.5 if sub else 10, weight="bold")
    if sub:
        ax.text(x, y - 0.17, sub, ha="center", va="center", fontsize=7.5, color="#444444")


def _arrow(ax, a, b, **kw):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, lw=1.3, color="#333333", **kw))


def plot_defense_pipeline(ax=None):
    """The robust FL pipeline and the chapters that teach each stage.

    Client updates (honest and Byzantine) pass through update filtering,
    robust aggregation and validation into the global model, which is trained
    adversarially at the clients in the next round.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 4.2))
    clients = [("Client 1", "honest", _HONEST), ("Client 2", "honest", _HONEST),
               ("Client 3", "Byzantine", _BYZ), ("Client n", "honest", _HONEST)]
    ys = [3.3, 2.5, 1.7, 0.9]
    for (name, kind, color), y in zip(clients, ys):
        _box(ax, 0.9, y, 1.3, 0.6, name, color, kind)
    ax.text(0.9, 3.95, "client updates\n(ch. 3: attacks)", ha="center", va="bottom", fontsize=8.5)
    stages = [
        (3.2, "Update\nfiltering", "clipping, NNM, detectors\n(ch. 8, 11)"),
        (5.35, "Robust\naggregation", "median, trimmed mean, Krum,\nBulyan, ... (ch. 4-8)"),
        (7.5, "Validation", "clean + robust accuracy\non held-out data (ch. 9)"),
    ]
    for x, title, sub in stages:
        _box(ax, x, 2.1, 1.85, 1.0, title, _DEF)
        ax.text(x, 1.35, sub, ha="center", va="top", fontsize=7.5, color="#333333")
    for y in ys:
        _arrow(ax, (1.58, y), (2.25, 2.1))
    _arrow(ax, (4.15, 2.1), (4.4, 2.1))
    _arrow(ax, (6.3, 2.1), (6.55, 2.1))
    _box(ax, 9.75, 2.9, 1.9, 0.8, "Global model", _MODEL, "robust model (ch. 9, 10)")
    _box(ax, 9.75, 1.2, 1.9, 0.8, "Adversarial training", _MODEL, "at the clients (ch. 1, 2, 9)")
    _arrow(ax, (8.45, 2.3), (8.83, 2.8))
    _arrow(ax, (9.75, 2.48), (9.75, 1.62))
    _arrow(ax, (9.75, 0.78), (0.9, 0.45), connectionstyle="arc3,rad=-0.12", linestyle="--")
    ax.text(5.3, -0.32, "next round: the new global model goes back to the clients", ha="center", fontsize=8, style="italic")
    ax.set_xlim(0, 10.9)
    ax.set_ylim(-0.5, 4.5)
    ax.axis("off")
    return ax
