"""Coordinate-wise rules: each coordinate of the output is computed from the ``n`` values of that
coordinate alone (the mean, the median, the trimmed mean, the mean around the median). Chapters
``00_introduction``, ``04_median`` and ``05_trimmed_mean``; Meamed: ``18_more_robust_rules``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..robust_stats import compute_dtype, coordinate_median, finite_rows, sort_columns
from .base import Aggregator, RobustAggregator
from .preaggregation import check_f

__all__ = ["Mean", "Median", "TrimmedMean", "Meamed", "mean_around_median"]


class Mean(Aggregator):
    r"""FedAvg (McMahan et al. 2017): :math:`\sum_i w_i u_i / \sum_i w_i`.

    With ``weights=None`` every client counts the same. One arbitrary client
    moves it arbitrarily far (breakdown point 0), which chapter ``03`` shows.
    It is not robust: a non-finite update raises ``ValueError`` instead of
    silently producing NaN.
    """

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        bad = ~finite_rows(updates)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"non-finite update from client row(s) {rows}; Mean is not robust to them")
        out, self.last_info = self.aggregate_finite(updates, weights, 0)
        return out

    def aggregate_finite(self, updates, weights, dropped):
        n = updates.shape[0]
        if weights is None:
            w = torch.full((n,), 1.0 / n, dtype=compute_dtype(updates.dtype), device=updates.device)
        else:
            w = (weights / weights.sum()).to(compute_dtype(updates.dtype))
        return (w @ updates.to(w.dtype)).to(updates.dtype), {"weights": w}


# kept_fraction is measured on at most this many coordinates (exact below it): 16 evenly
# spaced runs of 1024 contiguous coordinates, which read a small part of the memory that
# evenly spaced single coordinates would touch; a diagnostic, good to about a percent.
_KEPT_SAMPLE = 1 << 14


def _kept_fraction(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per row, the fraction of coordinates where its value lies in ``[lo, hi]``."""
    d = x.shape[1]
    if d > _KEPT_SAMPLE:
        runs, width = 16, _KEPT_SAMPLE // 16
        starts = torch.arange(runs, device=x.device) * ((d - width) // (runs - 1))
        cols = (starts[:, None] + torch.arange(width, device=x.device)[None, :]).flatten()
        x, lo, hi = x.index_select(1, cols), lo[cols], hi[cols]
    return ((x >= lo) & (x <= hi)).sum(dim=1, dtype=torch.float64) / x.shape[1]


class Median(RobustAggregator):
    r"""Coordinate-wise median (Yin et al. 2018).

    .. math:: \mathrm{Med}(x_1, \dots, x_n)_k = \text{median}(x_{1k}, \dots, x_{nk}),

    the mean of the two middle values when ``n`` is even (not ``torch.median``'s
    lower one). Breakdown point 1/2: fewer than ``n/2`` arbitrary rows keep every
    coordinate inside the honest rows' range. It needs no ``f``. One sort of
    each coordinate's ``n`` values. ``last_info["kept_fraction"]``: how often
    each row supplied a middle value. Chapter ``04_median``.
    """

    def aggregate_finite(self, updates, weights, dropped):
        n = updates.shape[0]
        s = sort_columns(updates)
        info = {"kept_fraction": _kept_fraction(updates, s[(n - 1) // 2], s[n // 2])}
        return coordinate_median(updates, sorted_x=s), info


class TrimmedMean(RobustAggregator):
    r"""Coordinate-wise trimmed mean (Yin et al. 2018).

    Per coordinate, drop the ``f`` largest and ``f`` smallest values and average
    the other :math:`n - 2f`:

    .. math:: \mathrm{TM}_f(x)_k = \frac{1}{n-2f} \sum_{r=f+1}^{n-f} x_{(r)k}.

    Requires :math:`2f < n`; with at most ``f`` arbitrary rows every coordinate
    stays inside the honest rows' range. ``f=0`` is the mean. ``last_info["kept_fraction"]``:
    how often each row's value was among the averaged ones. Chapter ``05_trimmed_mean``.
    """

    def __init__(self, f: int):
        self.f = check_f(f)

    def requirement(self, n: int, f: int) -> None:
        if not 2 * f < n:
            raise ValueError(f"TrimmedMean(f={f}) needs 2f < n, i.e. n > {2 * f} updates, got n={n}")

    def aggregate_finite(self, updates, weights, dropped):
        n = updates.shape[0]
        f = max(self.f - dropped, 0)
        s = sort_columns(updates)
        ct = compute_dtype(updates.dtype)
        info = {"kept_fraction": _kept_fraction(updates, s[f], s[n - f - 1])}
        return s[f : n - f].to(ct).mean(dim=0), info


def mean_around_median(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate, the mean of the ``k`` values closest to the median, from columns sorted
    along dim 0 (``(m, d)``, :func:`~robustfl_lib.robust_stats.sort_columns`); also returns the
    first sorted row of each coordinate's chosen run (``(d,)``).

    The ``k`` values closest to the median form a contiguous run of the sorted column: among
    the ``m - k + 1`` runs of length ``k``, the one with the smallest reach from the median
    (the first such run when two tie). Needs ``k > m / 2``: then every run holds the rows
    ``m - k .. k - 1``, so a run's sum is that core's plus at most ``m - k`` rows on either side,
    and no ``(k, d)`` index array is built.
    """
    m = s.shape[0]
    e = m - k  # runs start at rows 0..e
    ct = compute_dtype(s.dtype)
    med = coordinate_median(s, sorted_x=s).to(ct)
    reach = torch.maximum(med - s[: e + 1].to(ct), s[k - 1 :].to(ct) - med)  # (e + 1, d), slices, no copy of s
    if reach.device.type == "cpu":  # NumPy's argmin along rows is about twice torch's; both take the first minimum
        first = torch.from_numpy(np.argmin(reach.numpy(), axis=0))
    else:
        first = reach.argmin(dim=0)
    total = s[e:k].to(ct).sum(dim=0)
    if e > 0:
        side = torch.arange(e, device=s.device)[:, None]
        total += torch.where(side >= first, s[:e].to(ct), 0).sum(dim=0)  # left rows first..e-1
        total += torch.where(side < first, s[k:].to(ct), 0).sum(dim=0)  # right rows k..first+k-1
    return total / k, first


class Meamed(RobustAggregator):
    r"""Mean around the median (Xie, Koyejo & Gupta 2018, "Generalized Byzantine-tolerant SGD").

    Per coordinate :math:`k`, the mean of the :math:`n - f` values closest to the median:

    .. math:: \mathrm{Meamed}_f(x)_k = \frac{1}{n-f}\sum_{j=1}^{n-f} x_{\pi_k(j),k},\qquad
        |x_{\pi_k(1),k} - \mathrm{med}_k| \le \dots \le |x_{\pi_k(n),k} - \mathrm{med}_k|,

    :math:`\mathrm{med}_k` being the coordinate's median (the mean of the two middle values when
    ``n`` is even, as :class:`Median`). Like the trimmed mean it averages ``n - f`` values, but
    centred on the median rather than symmetric in rank, so ``f`` values on one side are dropped
    from that side. Requires :math:`n > 2f`; ``f = 0`` is the mean. Two values equally far from
    the median on opposite sides at the edge of the kept run (a tie the definition leaves open;
    ByzFL's ``argpartition`` breaks it arbitrarily) are decided for the smaller value. One sort
    per coordinate, then :math:`f + 1` candidate runs: no loop over coordinates.
    ``last_info["kept_fraction"]``: how often each row's value was among the averaged ones.
    Taught in chapter ``18_more_robust_rules``.
    """

    def __init__(self, f: int):
        self.f = check_f(f)

    def requirement(self, n: int, f: int) -> None:
        if not 2 * f < n:
            raise ValueError(f"Meamed(f={f}) needs n > 2f = {2 * f} updates, got n={n}")

    def aggregate_finite(self, updates, weights, dropped):
        n = updates.shape[0]
        k = n - max(self.f - dropped, 0)
        s = sort_columns(updates)
        out, first = mean_around_median(s, k)
        lo = s.gather(0, first[None, :])[0]
        hi = s.gather(0, (first + k - 1)[None, :])[0]
        return out, {"kept_fraction": _kept_fraction(updates, lo, hi)}
