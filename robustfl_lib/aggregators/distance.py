"""Distance-based rules: they choose or weight whole updates from their pairwise distances
(Krum, Multi-Krum, Bulyan's selection). Chapters ``06_krum`` to ``08_stronger_aggregators``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..robust_stats import compute_dtype, coordinate_median, pairwise_sq_distances, sort_columns
from .base import RobustAggregator
from .preaggregation import check_f

__all__ = ["Krum", "MultiKrum", "Bulyan", "krum_scores"]


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    r"""Krum scores from squared distances (Blanchard et al. 2017):
    :math:`s(i) = \sum_{j \in N_i} \|x_i - x_j\|^2` over the :math:`n - f - 2`
    nearest other rows :math:`N_i`. ``dist`` is ``(n, n)``; needs :math:`n > 2f + 2`.
    Chapter ``06_krum``."""
    n = dist.shape[0]
    k = n - f - 2
    if k < 1:
        raise ValueError(f"Krum scores need n > 2f + 2 = {2 * f + 2}, got n={n}")
    d = dist.clone()
    d.fill_diagonal_(torch.inf)
    return d.topk(k, dim=1, largest=False).values.sum(dim=1)


# Scores within this relative distance of each other are ties: float32 distances carry
# rounding noise of about 1e-7, which must not decide between two equally good updates.
_TIE_RTOL = 1e-5


def _tie_groups(key: torch.Tensor) -> torch.Tensor:
    """An integer per entry, equal for entries whose values chain within ``_TIE_RTOL``
    (relative) of each other in sorted order; it depends on the values only."""
    values, order = torch.sort(key)
    gaps = values.diff()
    scale = torch.maximum(values[1:].abs(), values[:-1].abs())
    close = torch.isfinite(values[1:]) & (gaps <= _TIE_RTOL * scale)  # inf ties nothing finite...
    new_group = ~(close | (values[1:] == values[:-1]))  # ...but ties another inf
    ids = torch.cat([torch.zeros(1, dtype=torch.long, device=key.device), new_group.long().cumsum(0)])
    return torch.empty_like(ids).scatter_(0, order, ids)


def _rank(scores: torch.Tensor, dist: torch.Tensor, row_sums: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Row indices by increasing score, with ties broken by values, not positions, so
    that the result does not depend on the order of the rows. Ties (scores within
    rounding noise) are common: two mutual nearest neighbours tie whenever one neighbour
    counts. They go to the row with the smaller total distance to all rows, then to the
    smaller sum of entries (``row_sums()`` is called only when a tie remains)."""
    total = torch.nan_to_num(dist, posinf=torch.finfo(dist.dtype).max).sum(dim=1)
    keys = [_tie_groups(scores), _tie_groups(total)]
    if len(torch.unique(torch.stack(keys, dim=1), dim=0)) < len(scores):
        keys.append(row_sums())
    order = torch.arange(len(scores), device=scores.device)
    for key in reversed(keys):  # a stable sort per key, least significant first
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def _row_sums(updates: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A function returning the rows' sums, computed once on first use."""
    cache: list[torch.Tensor] = []

    def get() -> torch.Tensor:
        if not cache:
            cache.append(updates.sum(dim=1, dtype=torch.float64))
        return cache[0]

    return get


class Krum(RobustAggregator):
    r"""Krum (Blanchard et al. 2017): the update with the smallest score

    .. math:: s(i) = \sum_{j \in N_i} \|x_i - x_j\|^2,

    :math:`N_i` being the :math:`n - f - 2` updates nearest to :math:`x_i`.
    Requires :math:`n > 2f + 2`: then an honest update's neighbourhood always
    holds honest updates, and a Byzantine update is chosen only if it is as close
    to the honest ones as they are to each other. It returns one client's update
    (high variance) and trusts that honest updates cluster, which non-IID data
    breaks (chapter ``08``). Distances come from one centered Gram matrix
    (:func:`~robustfl_lib.robust_stats.pairwise_sq_distances`), so the choice is
    the float64 one even for raw weights with a large common offset.
    ``last_info["selected"]`` holds the chosen row, ``["scores"]`` every score.
    Chapter ``06_krum``.
    """

    def __init__(self, f: int):
        self.f = check_f(f)

    def requirement(self, n: int, f: int) -> None:
        if not n > 2 * f + 2:
            raise ValueError(f"{type(self).__name__}(f={f}) needs n > 2f + 2 = {2 * f + 2} updates, got n={n}")

    def _ranked(self, updates: torch.Tensor, dropped: int) -> tuple[torch.Tensor, torch.Tensor]:
        dist = pairwise_sq_distances(updates)
        scores = krum_scores(dist, max(self.f - dropped, 0))
        return _rank(scores, dist, _row_sums(updates)), scores

    def aggregate_finite(self, updates, weights, dropped):
        order, scores = self._ranked(updates, dropped)
        best = order[:1]
        return updates[best[0]].clone(), {"selected": best, "scores": scores}


class MultiKrum(Krum):
    r"""Multi-Krum (Blanchard et al. 2017): the mean of the ``m`` updates with the
    smallest Krum scores (:class:`Krum` for the score); ``m`` larger than ``n`` is capped at ``n``.

    ``m=None`` averages :math:`m = n - f`, as many as there are honest clients;
    ``m=1`` is Krum. Averaging lowers Krum's variance while still discarding the
    ``n - m`` outlying updates. Requires :math:`n > 2f + 2` and :math:`m \ge 1`.
    ``last_info["selected"]``: the ``m`` rows averaged. Chapter ``07_multi_krum``.
    """

    def __init__(self, f: int, m: int | None = None):
        super().__init__(f)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"m (how many updates to average) must be an integer >= 1 or None, got {m!r}")
        self.m = m

    def aggregate_finite(self, updates, weights, dropped):
        n = updates.shape[0]
        f = max(self.f - dropped, 0)
        m = n - f if self.m is None else min(self.m, n)
        order, scores = self._ranked(updates, dropped)
        chosen = order[:m]
        ct = compute_dtype(updates.dtype)
        # A weighted sum rather than updates[chosen].mean(0): no copy of the m chosen rows.
        w = torch.zeros(n, dtype=ct, device=updates.device).index_fill_(0, chosen, 1.0 / m)
        return w @ updates.to(ct), {"selected": chosen, "scores": scores}


class Bulyan(RobustAggregator):
    r"""Bulyan (El Mhamdi, Guerraoui & Rouault 2018).

    1. Select :math:`\theta = n - 2f` updates by applying Krum repeatedly, each
       time removing the winner from the candidates.
    2. Per coordinate, average the :math:`\beta = \theta - 2f` selected values
       closest to their median.

    Requires :math:`n \ge 4f + 3`. Stage 1 removes updates far away in norm;
    stage 2 removes values that hide inside a selected update's coordinates, so
    a Byzantine update cannot shift any coordinate by more than the honest
    spread, even in high dimension where Krum alone can be fooled.
    ``last_info["selected"]``: the :math:`\theta` rows of stage 1, in order of
    selection. Chapter ``08_stronger_aggregators``.
    """

    def __init__(self, f: int):
        self.f = check_f(f)

    def requirement(self, n: int, f: int) -> None:
        if not n >= 4 * f + 3:
            raise ValueError(f"Bulyan(f={f}) needs n >= 4f + 3 = {4 * f + 3} updates, got n={n}")

    def aggregate_finite(self, updates, weights, dropped):
        n = updates.shape[0]
        f = max(self.f - dropped, 0)
        theta, beta = n - 2 * f, n - 4 * f
        dist = pairwise_sq_distances(updates)
        eye = torch.eye(n, dtype=torch.bool, device=dist.device)
        remaining = torch.ones(n, dtype=torch.bool, device=dist.device)
        chosen = []
        sums = _row_sums(updates)
        for _ in range(theta):  # iterations of the selection, each on the (n, n) matrix only
            r = int(remaining.sum())
            k = min(max(r - f - 2, 1), r - 1)
            pair_ok = remaining[:, None] & remaining[None, :] & ~eye
            d = torch.where(pair_ok, dist, torch.inf)
            scores = d.topk(k, dim=1, largest=False).values.sum(dim=1) if k > 0 else torch.zeros_like(d[0])
            best = _rank(torch.where(remaining, scores, torch.inf), dist, sums)[0]
            chosen.append(best)
            remaining[best] = False
        selected = torch.stack(chosen)
        s = sort_columns(updates[selected])
        med = coordinate_median(s, sorted_x=s).to(compute_dtype(updates.dtype))
        # The beta values closest to the median form a contiguous run of the sorted column:
        # among the 2f + 1 runs of length beta, take the one with the smallest reach from it.
        starts = torch.arange(theta - beta + 1, device=s.device)
        reach = torch.maximum(med - s[starts].to(med.dtype), s[starts + beta - 1].to(med.dtype) - med)
        first = reach.argmin(dim=0)
        rows = first[None, :] + torch.arange(beta, device=s.device)[:, None]
        return s.gather(0, rows).to(med.dtype).mean(dim=0), {"selected": selected}
