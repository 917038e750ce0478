"""Detectors (one boolean per update, ``True`` = flagged malicious) and :class:`Detect`, which
turns a detector into an aggregator. Chapter ``11_exercise_backdoor_detection``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..aggregators import Aggregator, Mean, RobustAggregator
from ..robust_stats import compute_dtype

__all__ = ["Detector", "NormZScore", "CosineSimilarity", "Clustering", "Detect"]


class Detector:
    """``detector(updates (n, d)) -> flagged (n,) bool``, ``True`` = looks malicious."""

    def __call__(self, updates: torch.Tensor) -> torch.Tensor:
        if updates.ndim != 2 or updates.shape[0] < 2:
            raise ValueError(f"a detector needs a 2-D tensor of at least 2 updates, got shape {tuple(updates.shape)}")
        bad = ~torch.isfinite(updates).all(dim=1)
        flagged = torch.zeros(updates.shape[0], dtype=torch.bool, device=updates.device)
        flagged[bad] = True  # a non-finite update is malicious by definition
        good = (~bad).nonzero().flatten()
        if len(good) >= 2:
            flagged[good] = self.flag(updates[good].to(compute_dtype(updates.dtype)))
        return flagged

    def flag(self, updates: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class NormZScore(Detector):
    r"""Flag updates whose norm is an outlier: :math:`z_i = (\|u_i\| - \mathrm{med}) / (1.4826\,\mathrm{MAD}) > t`.

    Median and MAD instead of mean and standard deviation, so that the boosted
    update cannot inflate the spread it is measured against. Only unusually *large*
    norms are flagged: a model-replacement update is boosted, never shrunk.
    """

    def __init__(self, threshold: float = 3.0):
        self.threshold = float(threshold)

    def flag(self, updates):
        norms = updates.norm(dim=1)
        med = norms.median()
        mad = (norms - med).abs().median().clamp_min(1e-12 * med.abs().clamp_min(1e-30))
        return (norms - med) / (1.4826 * mad) > self.threshold


class CosineSimilarity(Detector):
    r"""A simplified FoolsGold-style filter (after Fung et al. 2020): flag clients whose update is
    too similar to another's.

    Honest clients with different data disagree; sybils that share one goal (the
    same trigger) push the same direction. Client :math:`i` is flagged when
    :math:`\max_{j \ne i} \cos(u_i, u_j) > t`, on this round's updates only: none of
    FoolsGold's update histories, pardoning or logit learning rates, which
    :class:`~robustfl_lib.backdoor.FoolsGold` implements as published.
    """

    def __init__(self, threshold: float = 0.9):
        self.threshold = float(threshold)

    def flag(self, updates):
        unit = updates / updates.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cs = unit @ unit.T
        cs.fill_diagonal_(-1.0)
        return cs.max(dim=1).values > self.threshold


class Clustering(Detector):
    r"""A simplified FLAME-style filter, FLAME's first stage only (after Nguyen et al. 2022):
    HDBSCAN on pairwise cosine distances with ``min_cluster_size = n // 2 + 1``; updates
    outside the majority cluster are flagged.

    HDBSCAN may also call some honest updates noise: like FLAME, this trades a few
    honest updates for safety. If no cluster holds a majority (HDBSCAN calls
    everything noise), nothing is flagged. FLAME's clipping at the median norm of all
    clients and its noise are in :class:`~robustfl_lib.backdoor.FLAME`.
    """

    def flag(self, updates):
        n = updates.shape[0]
        unit = updates / updates.norm(dim=1, keepdim=True).clamp_min(1e-30)
        dist = (1.0 - unit @ unit.T).clamp_min(0.0).cpu().double().numpy()
        # A float32 matmul is not exactly symmetric, and HDBSCAN refuses an asymmetric matrix.
        dist = 0.5 * (dist + dist.T)
        np.fill_diagonal(dist, 0.0)
        labels = majority_cluster_labels(dist)
        if (labels < 0).all():
            return torch.zeros(n, dtype=torch.bool, device=updates.device)
        majority = np.bincount(labels[labels >= 0]).argmax()
        return torch.from_numpy(labels != majority).to(updates.device)


def majority_cluster_labels(dist: np.ndarray) -> np.ndarray:
    """HDBSCAN's labels (``-1`` = noise) of ``n`` points given their symmetric ``(n, n)`` distance
    matrix, with FLAME's settings: ``min_cluster_size = n // 2 + 1`` (so a cluster is a majority, and
    at most one exists), ``min_samples = 1``, a single cluster allowed. Shared by :class:`Clustering`
    and :class:`~robustfl_lib.backdoor.FLAME`."""
    from sklearn.cluster import HDBSCAN

    n = dist.shape[0]
    return HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed", allow_single_cluster=True,
                   copy=True).fit_predict(dist)


class Detect(RobustAggregator):
    """Aggregate with ``then`` (default :class:`Mean`) only the updates ``detector`` does not flag.

    ``last_info["flagged"]`` and ``["selected"]`` record the decision per round.
    If every update were flagged, all are kept (the detector gives no usable signal).
    """

    def __init__(self, detector: Detector, then: Aggregator | None = None):
        self.detector, self.then, self.f = detector, then if then is not None else Mean(), 0

    def aggregate_finite(self, updates, weights, dropped):
        flagged = self.detector(updates)
        keep = (~flagged).nonzero().flatten()
        if len(keep) == 0:
            keep = torch.arange(updates.shape[0], device=updates.device)
        out = self.then(updates[keep], None if weights is None else weights[keep])
        info: dict[str, Any] = {"selected": keep, "flagged": flagged.cpu().tolist()}
        return out, info
