"""Aggregation rules: how the server combines client updates.

Every aggregator is an object called on a 2-D tensor of flattened client
updates ``(n, d)`` (any device, any floating dtype) and returning ``(d,)`` in
the same dtype. Chapter ``00_introduction`` uses :class:`Mean` (FedAvg); the
robust rules are taught in chapters ``04_median`` to ``08_stronger_aggregators``.

Conventions shared by every robust rule (:class:`RobustAggregator`):

* **Requirements** on ``n`` and ``f`` (the number of Byzantine clients to
  tolerate) raise ``ValueError`` stating them, e.g. ``n > 2f + 2`` for Krum.
* **Non-finite updates.** An honest client never sends NaN or Inf (its training
  would have stopped), so a row with any non-finite entry is certainly
  Byzantine. Robust rules drop such rows before aggregating and lower ``f`` by
  one per dropped row (at least 0): the remaining rows contain at most
  ``f - k`` Byzantine ones, so every guarantee still holds, and the output is
  finite. ``last_info["dropped"]`` lists them. :class:`Mean` is not robust and
  refuses them with ``ValueError`` rather than returning NaN.
* **Sample counts.** ``weights`` (the clients' sample counts) are used by
  :class:`Mean` only: robust rules count every client once, since a Byzantine
  client could claim any number of samples.
* **What was kept.** After each call ``aggregator.last_info`` describes what the
  rule kept, in the input's row numbering: ``"selected"`` (row indices that a
  selection rule such as Krum kept), ``"kept_fraction"`` (per row, the fraction
  of coordinates in which its value entered a coordinate-wise rule; estimated on
  16,384 coordinates spread over the vector when it is longer),
  ``"weights"`` (per row, its weight in an output that is a weighted average of
  the rows), ``"scores"``, ``"iterations"``, ``"dropped"``. The FL loop records
  them per round (:func:`robustfl_lib.federated.run_federated`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..params import flatten_state, unflatten_state
# Pre-aggregators and the shared statistics live in sibling modules; re-exported here.
from .preaggregation import NNM, PRE_AGGREGATORS, Clipping, PreAggregator, check_f
from ..robust_stats import (
    check_updates,
    compute_dtype,
    coordinate_median,
    finite_rows,
    pairwise_sq_distances,
    sort_columns,
    sq_distances_to,
)

__all__ = [
    "Aggregator",
    "RobustAggregator",
    "NonFiniteBeyondTolerance",
    "spread_radius",
    "Mean",
    "Median",
    "TrimmedMean",
    "Krum",
    "MultiKrum",
    "GeometricMedian",
    "CenteredClipping",
    "Bulyan",
    "Pipeline",
    "PreAggregator",
    "NNM",
    "Clipping",
    "PRE_AGGREGATORS",
    "krum_scores",
    "pairwise_sq_distances",
    "coordinate_median",
    "sort_columns",
    "AGGREGATORS",
    "get_aggregator",
    "aggregate_states",
]

# last_info entries holding one value per input row (re-indexed when rows are dropped).
_PER_ROW = ("kept_fraction", "weights", "scores")


class Aggregator:
    """Base class: checks the input, then calls :meth:`aggregate`.

    Subclasses implement ``aggregate(updates, weights)``; ``weights`` are the
    clients' sample counts, which only rules that trust clients (the mean) use.
    ``last_info`` (a dict) describes what the last call kept (see the module
    docstring); :meth:`reset` forgets state kept between calls, if any.
    """

    #: Whether non-finite rows are dropped (robust rules) or refused (the mean).
    robust: bool = False
    #: The number of Byzantine clients the rule tolerates (0 for rules without ``f``).
    f: int = 0

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        check_updates(updates)
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=updates.dtype, device=updates.device)
            if weights.shape != (updates.shape[0],):
                raise ValueError(
                    f"weights must have shape ({updates.shape[0]},) to match updates, got {tuple(weights.shape)}"
                )
            if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError("weights must be finite, non-negative and not all zero")
        self.last_info: dict[str, Any] = {}
        return self.aggregate(updates, weights)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def requirement(self, n: int, f: int) -> None:
        """Raise ``ValueError`` stating the rule's requirement on ``n`` and ``f`` if unmet."""

    def aggregate_finite(
        self, updates: torch.Tensor, weights: torch.Tensor | None, dropped: int
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(result, info)`` on finite rows, ``dropped`` non-finite rows having been removed."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget any state kept between calls (called at the start of every FL run)."""

    def get_state(self) -> dict[str, Any]:
        """State kept between calls, as tensors and plain values (saved in FL checkpoints)."""
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned (when an FL run resumes)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith(("_", "last_")))
        return f"{type(self).__name__}({args})"


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


class NonFiniteBeyondTolerance(RuntimeWarning):
    """More updates were non-finite than the rule tolerates Byzantine clients (see
    :meth:`RobustAggregator.tolerated`): dropping them all leaves a result without a guarantee."""


class RobustAggregator(Aggregator):
    """Base class of the robust rules: checks ``n`` against ``f``, drops non-finite
    rows (lowering ``f`` by one per dropped row), calls :meth:`aggregate_finite`
    and records ``last_info`` in the input's row numbering.

    Dropping rests on a premise: every non-finite row is Byzantine, so ``k`` of them
    leave at most ``f - k`` Byzantine rows among the rest. When ``k`` exceeds what the
    rule tolerates (:meth:`tolerated`: ``f`` for rules that take it; fewer than half the
    rows for the median, the geometric median and centered clipping), the premise is
    broken: the rule still returns its value on the finite rows, computed with
    ``f = 0``, but it warns (:class:`NonFiniteBeyondTolerance`) and records
    ``last_info["nonfinite_beyond_tolerance"] = k - tolerated`` (0 when the premise holds).
    """

    robust = True

    def tolerated(self, n: int) -> int:
        """How many of ``n`` rows may be Byzantine (non-finite rows included) with the
        rule's guarantee intact: ``f`` for rules that take ``f``, else ``ceil(n/2) - 1``."""
        if "f" in inspect.signature(type(self)).parameters:
            return self.f
        return (n + 1) // 2 - 1

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        n = updates.shape[0]
        self.requirement(n, self.f)
        finite = finite_rows(updates)
        if bool(finite.all()):
            out, info = self.aggregate_finite(updates, weights, 0)
            info["dropped"] = []
            info["nonfinite_beyond_tolerance"] = 0
            self.last_info = info
            return out.to(updates.dtype)
        rows = finite.nonzero().flatten()
        dropped = n - len(rows)
        if len(rows) == 0:
            raise ValueError(f"all {n} updates are non-finite; there is nothing to aggregate")
        try:
            self.requirement(len(rows), max(self.f - dropped, 0))
        except ValueError as err:
            raise ValueError(f"after dropping {dropped} non-finite update(s), {len(rows)} remain: {err}") from None
        beyond = dropped - self.tolerated(n)
        if beyond > 0:
            warnings.warn(
                f"{self!r}: {dropped} of {n} updates are non-finite, more than the {self.tolerated(n)} Byzantine "
                f"client(s) the rule tolerates; the premise that every non-finite update is Byzantine and the "
                f"rest are mostly honest no longer holds, so the result carries no guarantee (it is the rule "
                f"applied to the {len(rows)} finite updates with f = 0)",
                NonFiniteBeyondTolerance,
                stacklevel=3,
            )
        out, info = self.aggregate_finite(updates[rows], None if weights is None else weights[rows], dropped)
        info["nonfinite_beyond_tolerance"] = max(beyond, 0)
        for key, value in info.items():
            if key == "selected":
                info[key] = rows[value]
            elif key in _PER_ROW:
                fill = torch.inf if key == "scores" else 0.0
                full = torch.full((n,), fill, dtype=value.dtype, device=value.device)
                info[key] = full.index_copy_(0, rows, value)
        info["dropped"] = (~finite).nonzero().flatten().tolist()
        self.last_info = info
        return out.to(updates.dtype)


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


def _affine_sq_distances(dist: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    r"""Squared distances from every row to :math:`z = \sum_k c_k x_k` (with
    :math:`\sum_k c_k = 1`), from pairwise squared distances only:
    :math:`\|x_i - z\|^2 = \sum_k c_k D_{ik} - \tfrac12 c^\top D c`."""
    dc = dist @ coef
    return (dc - 0.5 * (coef @ dc)).clamp_min(0)


def _finite_component(dist: torch.Tensor) -> torch.Tensor:
    """Rows at a finite distance from the most central row (rows whose distance
    overflowed are infinitely far and take no part in iterative rules)."""
    central = dist.median(dim=1).values.argmin()
    return torch.isfinite(dist[central])


class GeometricMedian(RobustAggregator):
    r"""Geometric median by smoothed Weiszfeld iterations (Pillutla et al. 2022, RFA).

    .. math:: z^\star = \arg\min_z \sum_i \|z - x_i\|,\qquad
        z \leftarrow \frac{\sum_i \beta_i x_i}{\sum_i \beta_i},\quad
        \beta_i = \frac{1}{\max(\nu, \|z - x_i\|)}.

    Breakdown point 1/2 and rotation invariant (unlike the coordinate-wise
    median); it needs no ``f``. Starting from the mean, ``z`` stays a weighted
    average of the rows, so each iteration works on the ``(n, n)`` matrix of
    squared distances only (one Gram matrix, then ``O(n^2)`` per iteration) and
    ``z`` itself is formed once at the end. Stops when the weights change by less
    than ``tol`` (L1) or after ``max_iter`` iterations. ``last_info["weights"]``:
    each row's weight in ``z``; ``["iterations"]``. Chapter ``08_stronger_aggregators``.
    """

    def __init__(self, nu: float = 1e-6, max_iter: int = 500, tol: float = 1e-10):
        if not nu > 0 or not max_iter >= 1 or not tol > 0:
            raise ValueError(f"need nu > 0, max_iter >= 1, tol > 0; got nu={nu}, max_iter={max_iter}, tol={tol}")
        self.nu, self.max_iter, self.tol = nu, max_iter, tol

    def aggregate_finite(self, updates, weights, dropped):
        dist = pairwise_sq_distances(updates)
        live = _finite_component(dist)
        d_live = dist[live][:, live]
        w = torch.full((int(live.sum()),), 1.0 / int(live.sum()), dtype=torch.float64, device=dist.device)
        it = 0
        for it in range(1, self.max_iter + 1):
            beta = 1.0 / _affine_sq_distances(d_live, w).sqrt().clamp_min(self.nu)
            w_new = beta / beta.sum()
            done = (w_new - w).abs().sum() < self.tol
            w = w_new
            if done:
                break
        full = torch.zeros(updates.shape[0], dtype=torch.float64, device=dist.device)
        full[live] = w
        ct = compute_dtype(updates.dtype)
        return full.to(ct) @ updates.to(ct), {"weights": full, "iterations": it}


def spread_radius(dist: torch.Tensor) -> torch.Tensor:
    r"""The typical distance between two rows, :math:`\operatorname{med}_i \operatorname{med}_{j \ne i} \|x_i - x_j\|`,
    from squared distances ``(n, n)`` (float64 scalar; rows at an infinite distance count as far).
    The default radius of :class:`CenteredClipping`. One row alone has no spread: 0."""
    n = dist.shape[0]
    if n < 2:
        return torch.zeros((), dtype=torch.float64, device=dist.device)
    off = dist.masked_select(~torch.eye(n, dtype=torch.bool, device=dist.device)).reshape(n, n - 1)
    return off.sqrt().median(dim=1).values.median()


class CenteredClipping(RobustAggregator):
    r"""Centered clipping (Karimireddy, He & Jaggi 2021, "Learning from History for
    Byzantine Robust Optimization", ICML).

    Starting from a centre :math:`v_0`, repeat ``iterations`` (:math:`L`) times

    .. math:: v \leftarrow v + \frac1n \sum_i (x_i - v)\,\min\!\Big(1, \frac{\tau}{\|x_i - v\|}\Big):

    each update may pull the centre by at most :math:`\tau/n`, so ``f`` Byzantine
    clients move it by at most :math:`f\tau/n` per iteration. It needs no ``f``.

    **The radius.** The paper's analysis takes :math:`\tau` of the order of the honest
    updates' spread around the centre, and its experiments fix :math:`\tau` by hand
    (ByzFL's default: :math:`\tau = 100`, :math:`L = 1`). ``tau=None`` estimates the
    spread from the updates themselves, independently of the centre:

    .. math:: \tau = \operatorname{med}_i\, \operatorname{med}_{j \ne i} \|x_i - x_j\|,

    the typical distance between two updates. With fewer than half the rows Byzantine
    most of these pairs are honest, so Byzantine clients cannot inflate it, and unlike
    a radius measured from :math:`v_0` it does not grow when the centre is far from the
    updates (which would make every row "inside" and the rule the plain mean).
    A float fixes :math:`\tau`.

    **The centre.** ``init="median"`` (default, stateless): the coordinate-wise median;
    ``"zero"``; ``"previous"``: the last output, as in the paper, where the server
    centres at the previous round's aggregate and the clients send worker momentum
    (:math:`v_0 = 0` in the first round; :meth:`reset` forgets it; saved in FL checkpoints).
    The output equals the mean exactly when every update lies within :math:`\tau` of
    every iterate (then each step is the plain average); otherwise the far updates pull
    with length :math:`\tau` only.

    Every iterate is an affine combination of the rows and :math:`v_0`, so the
    iterations work on squared distances only. ``last_info["weights"]``: each row's
    coefficient in the output; ``["tau"]``: the radius used. Chapter ``08_stronger_aggregators``.
    """

    def __init__(self, tau: float | None = None, iterations: int = 3, init: str = "median"):
        if tau is not None and not tau > 0:
            raise ValueError(f"tau must be > 0 (or None for the spread of the updates), got {tau!r}")
        if not iterations >= 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if init not in ("median", "zero", "previous"):
            raise ValueError(f"init must be 'median', 'zero' or 'previous', got {init!r}")
        self.tau, self.iterations, self.init = tau, iterations, init
        self._previous: torch.Tensor | None = None

    def reset(self) -> None:
        self._previous = None

    def get_state(self) -> dict[str, Any]:
        return {"previous": self._previous}

    def set_state(self, state: dict[str, Any]) -> None:
        self._previous = state.get("previous")

    def aggregate_finite(self, updates, weights, dropped):
        n, d = updates.shape
        if self.init == "median":
            v0 = coordinate_median(updates)
        elif self.init == "previous" and self._previous is not None:
            if self._previous.shape != (d,):
                raise ValueError(f"previous centre has shape {tuple(self._previous.shape)}, updates have d={d}; reset()")
            v0 = self._previous.to(device=updates.device, dtype=updates.dtype)
        else:
            v0 = torch.zeros(d, dtype=updates.dtype, device=updates.device)
        # Squared distances among the rows and the starting centre (index n), without
        # concatenating v0 to the (n, d) updates.
        dist = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=updates.device)
        dist[:n, :n] = pairwise_sq_distances(updates)
        dist[n, :n] = dist[:n, n] = sq_distances_to(updates, v0)
        live = torch.isfinite(dist[n])
        live[n] = True
        d_live = dist[live][:, live]
        m = int(live.sum())
        coef = torch.zeros(m, dtype=torch.float64, device=dist.device)
        coef[-1] = 1.0
        tau = spread_radius(dist[:n, :n]) if self.tau is None else torch.tensor(float(self.tau), dtype=torch.float64, device=dist.device)
        for _ in range(self.iterations):
            r = _affine_sq_distances(d_live, coef)[:-1].sqrt()
            alpha = torch.where(r > tau, tau / r, torch.ones_like(r)) / n
            coef = coef * (1 - alpha.sum())
            coef[:-1] += alpha
        full = torch.zeros(n + 1, dtype=torch.float64, device=dist.device)
        full[live] = coef
        ct = compute_dtype(updates.dtype)
        out = full[:n].to(ct) @ updates.to(ct) + full[n].to(ct) * v0.to(ct)
        if self.init == "previous":
            self._previous = out.detach().clone()
        return out, {"weights": full[:n], "tau": float(tau)}


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


class Pipeline(RobustAggregator):
    """Pre-aggregation steps followed by an aggregator: ``Pipeline(NNM(f), Krum(f))``.

    Non-finite rows are dropped once, before the first step (each step's ``f``
    then shrinks by their number); every pre-aggregator maps ``(n, d)`` to
    ``(n, d)`` with rows still in client order, so ``last_info`` (the final
    aggregator's, plus ``"pre"``: one dict per step) refers to clients.
    ``get_aggregator("nnm+krum", f=2)`` builds the same. Chapter ``08_stronger_aggregators``.
    """

    def __init__(self, *steps: PreAggregator | Aggregator):
        if not steps or not isinstance(steps[-1], Aggregator):
            raise ValueError("Pipeline needs pre-aggregators followed by one Aggregator as its last step")
        for s in steps[:-1]:
            if not isinstance(s, PreAggregator):
                raise ValueError(f"every step but the last must be a PreAggregator (NNM, Clipping), got {s!r}")
        self.steps = steps

    @property
    def f(self) -> int:  # type: ignore[override]
        return max(s.f for s in self.steps)

    def requirement(self, n: int, f: int) -> None:
        for s in self.steps:
            s.requirement(n, max(s.f - (self.f - f), 0))

    def tolerated(self, n: int) -> int:
        """The least that any step tolerates: ``f`` of each pre-aggregator that takes ``f``,
        and the final rule's own tolerance (0 for a rule that is not robust)."""
        last = self.steps[-1]
        bounds = [s.f for s in self.steps[:-1] if "f" in inspect.signature(type(s)).parameters]
        bounds.append(last.tolerated(n) if isinstance(last, RobustAggregator) else 0)
        return min(bounds)

    def reset(self) -> None:
        self.steps[-1].reset()

    def get_state(self) -> dict[str, Any]:
        return self.steps[-1].get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.steps[-1].set_state(state)

    def aggregate_finite(self, updates, weights, dropped):
        x = updates
        pre_info = []
        for step in self.steps[:-1]:
            x = step.transform(x, dropped)
            pre_info.append({"name": type(step).__name__})
        out, info = self.steps[-1].aggregate_finite(x, weights, dropped)
        info["pre"] = pre_info
        return out, info

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(map(repr, self.steps))})"


#: Names accepted by :func:`get_aggregator` (and ``FLConfig.aggregator``).
AGGREGATORS: dict[str, type[Aggregator]] = {
    "mean": Mean,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "multi_krum": MultiKrum,
    "geometric_median": GeometricMedian,
    "centered_clipping": CenteredClipping,
    "bulyan": Bulyan,
}


def _build(cls: type, f: int, kwargs: dict[str, Any]):
    if "f" in inspect.signature(cls).parameters:
        kwargs = {**kwargs, "f": f}
    return cls(**kwargs)


def get_aggregator(spec: str | Aggregator, f: int = 0, **kwargs) -> Aggregator:
    """An aggregator from its name or the object itself (returned unchanged).

    Names: ``"mean"``, ``"median"``, ``"trimmed_mean"``, ``"krum"``,
    ``"multi_krum"``, ``"geometric_median"``, ``"centered_clipping"``,
    ``"bulyan"``; pre-aggregators are prefixed with ``+``: ``"nnm+krum"``,
    ``"clipping+mean"``, ``"nnm+clipping+median"``. ``f`` (the number of
    Byzantine clients to tolerate) goes to every step that takes it; ``kwargs``
    go to the final aggregator.
    """
    if isinstance(spec, Aggregator) or (callable(spec) and not isinstance(spec, str)):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"aggregator must be a name or an Aggregator, got {spec!r}")
    check_f(f)
    *pre, final = spec.split("+")
    if final not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {final!r}; choose one of {sorted(AGGREGATORS)}")
    unknown = [p for p in pre if p not in PRE_AGGREGATORS]
    if unknown:
        raise ValueError(f"unknown pre-aggregator(s) {unknown}; choose from {sorted(PRE_AGGREGATORS)}")
    agg = _build(AGGREGATORS[final], f, kwargs)
    if not pre:
        return agg
    return Pipeline(*(_build(PRE_AGGREGATORS[p], f, {}) for p in pre), agg)


def aggregate_states(
    states: Sequence[Mapping[str, torch.Tensor]],
    aggregator: str | Aggregator,
    weights: torch.Tensor | Sequence[float] | None = None,
    f: int = 0,
) -> dict[str, torch.Tensor]:
    """Apply any aggregator to a list of ``state_dict``\\s (models or deltas).

    Floating entries (parameters and float buffers) are flattened
    (:func:`robustfl_lib.params.flatten_state`), aggregated as one ``(n, d)``
    tensor and unflattened. Integer and boolean buffers (BatchNorm's
    ``num_batches_tracked``) cannot be averaged: each gets the element-wise
    median over clients (lower median, so an integer; for booleans the majority),
    which no minority of clients can set. All states must share keys, shapes
    and dtypes (``ValueError`` otherwise). ``aggregator`` may be a name (with
    ``f``). Chapter ``04_median``.
    """
    if len(states) == 0:
        raise ValueError("states is empty")
    ref = states[0]
    for i, s in enumerate(states[1:], 1):
        if list(s.keys()) != list(ref.keys()):
            raise ValueError(f"state {i} has keys {list(s.keys())}, state 0 has {list(ref.keys())}")
        for k, v in s.items():
            if v.shape != ref[k].shape or v.dtype != ref[k].dtype:
                raise ValueError(
                    f"state {i}[{k!r}] is {tuple(v.shape)} {v.dtype}, state 0 has {tuple(ref[k].shape)} {ref[k].dtype}"
                )
    agg = get_aggregator(aggregator, f=f)
    out = unflatten_state(agg(torch.stack([flatten_state(s) for s in states]), weights=weights), ref)
    for k, v in ref.items():
        if not torch.is_floating_point(v):
            stacked = torch.stack([s[k] for s in states])
            if v.dtype == torch.bool:
                out[k] = stacked.to(torch.uint8).median(dim=0).values.bool()
            else:
                out[k] = stacked.median(dim=0).values
    return out
