"""Filters: rules that detect suspicious updates, drop them and average the rest (DnC, SignGuard).

Where a robust statistic (a median, a trimmed mean) bounds what every update can do, a filter
decides which updates to believe and then trusts them fully. Both rules here decide on a random
part of the coordinates, drawn anew in every call from the rule's own ``torch.Generator``, so an
attacker who optimises against the rule cannot know in advance where it will look:

* :class:`DnC`: the updates that stand out along the direction of largest variance (Shejwalkar &
  Houmansadr 2021);
* :class:`SignGuard`: the updates whose norm or whose mix of signs is unlike the majority's
  (Xu et al. 2022).

Both are taught in chapter ``16_optimising_attacks``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..robust_stats import compute_dtype
from .base import RobustAggregator
from .preaggregation import _row_norms, check_f

__all__ = ["DnC", "SignGuard"]


def _own_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a CPU generator of the rule's own seeded with 0 (never torch's global stream)."""
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return value


def _kept_weights(keep: torch.Tensor, weights: torch.Tensor | None, weighted: bool) -> torch.Tensor:
    """Float64 weights summing to one over the kept rows: equal, or proportional to the sample counts
    when ``weighted`` (equal again if every kept row claims zero samples)."""
    w = keep.double()
    if weighted and weights is not None:
        counted = w * weights.double()
        if counted.sum() > 0:
            w = counted
    return w / w.sum()


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def _top_direction_scores(sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per row of ``sub`` (``(n, b)``, float64), :math:`s_i = \langle y_i - \mu, v\rangle^2` with
    :math:`\mu` the mean row and :math:`v` the top right singular vector of the centred rows :math:`Y`,
    as ``(s / p^2, p)``. Rows whose largest magnitude lies outside ``[1e-100, 1e100]`` are divided
    by it first (``p``; else ``p = 1``), so that no square overflows or underflows: the order of
    the scores, which is all the filter uses, does not depend on ``p`` (``s`` itself may overflow
    to ``inf`` for huge rows).

    :math:`Y v = \sigma u` for the top left singular vector :math:`u`, so :math:`s = \lambda u^2` with
    :math:`(\lambda, u)` the top eigenpair of the ``(n, n)`` matrix :math:`Y Y^\top`: no SVD in
    dimension ``b``."""
    low, high = torch.aminmax(sub)
    peak = torch.maximum(-low, high)
    if not peak > 0:
        return torch.zeros(sub.shape[0], dtype=torch.float64, device=sub.device), torch.ones_like(peak)
    if 1e-100 <= peak <= 1e100:
        peak = torch.ones_like(peak)
    else:
        sub = sub / peak
    y = sub - sub.mean(dim=0)
    evals, evecs = torch.linalg.eigh(y @ y.T)
    return evals[-1].clamp_min(0) * evecs[:, -1].square(), peak


class DnC(RobustAggregator):
    r"""Divide-and-conquer (Shejwalkar & Houmansadr 2021, "Manipulating the Byzantine: Optimizing
    Model Poisoning Attacks and Defenses for Federated Learning", NDSS).

    For :math:`t = 1, \dots, T` (``niters``): draw a set :math:`r_t` of ``b`` of the ``d``
    coordinates uniformly at random; on those coordinates centre the updates,
    :math:`y_i = x_i[r_t] - \mu_t` with :math:`\mu_t = \frac1n \sum_j x_j[r_t]`; take :math:`v_t`,
    the top right singular vector of the matrix of the :math:`y_i`; score every update and keep the
    :math:`n - \lfloor c f \rfloor` lowest scores:

    .. math:: s_i^{(t)} = \langle y_i, v_t \rangle^2,\qquad
        I_t = \{\, n - \lfloor c f\rfloor \text{ rows of smallest } s^{(t)} \,\},\qquad
        \mathrm{DnC}(x) = \frac{1}{|I|} \sum_{i \in I} x_i,\quad I = \bigcap_{t=1}^{T} I_t.

    Updates that move the mean far must stand out along the direction of largest variance, where
    the squared projection finds them; the coordinates are subsampled so that the decomposition
    stays small and an attacker cannot choose coordinates that the rule never looks at.
    ``c`` is the filtering fraction (``c f`` rows flagged per iteration). **Requires**
    :math:`n > 2f` (an honest majority) and :math:`n > \lfloor c f \rfloor` (something is kept).

    **Defaults** ``niters=5``, ``c=1``, ``b=10_000``: the paper's defense as its reimplementations
    run it (Blades' ``Dnc``: ``sub_dim=10000``, ``filter_frac=1.0``). When ``d <= b`` every
    coordinate is used, the iterations would all agree, and one is run (no randomness at all).

    **Conventions.** Scores come from the ``(n, n)`` Gram matrix of the centred sub-vectors in
    float64 (see :func:`_top_direction_scores`); ties go to the lower row index (a stable sort).
    :math:`\lfloor c f\rfloor` is taken after rounding :math:`c f` to 9 decimals (so ``c=0.3``,
    ``f=10`` flags 3). If the intersection is empty (possible when :math:`T c f \ge n`), the rows kept
    in the most iterations are kept (the intersection, whenever it is non-empty);
    ``last_info["empty_intersection"]`` says so. With :math:`\lfloor c f \rfloor = 0` (``f = 0``) no
    row is flagged and no coordinate is drawn: the output is the mean.

    **Randomness.** Each iteration draws one 62-bit seed from ``generator`` (``torch.randint``) and
    takes ``numpy.random.default_rng(seed).choice(d, b, replace=False)``, sorted, as :math:`r_t`:
    :math:`O(b)` work where ``torch.randperm(d)`` would cost :math:`O(d)`. ``generator=None`` gives
    the rule a CPU generator of its own seeded with 0 (never torch's global stream), so two rules
    built alike agree; pass a seeded generator to vary it. The generator's state is saved and
    restored by the FL checkpoints, as for :class:`~robustfl_lib.aggregators.Bucketing`.

    **Sample counts.** ``weighted=False`` (default): every kept update counts once, since a
    Byzantine client could claim any number of samples (the convention of every robust rule).
    ``weighted=True``: the mean of the kept set is weighted by the clients' sample counts
    (``weights``), FedAvg over the clients the filter trusts.

    Non-finite updates are dropped first, ``f`` shrinking by one per dropped row (see
    :class:`~robustfl_lib.aggregators.RobustAggregator`). ``last_info["selected"]``: the kept rows;
    ``["weights"]``: each row's weight in the output; ``["scores"]``: per row, its largest score
    over the iterations; ``["iterations"]``; ``["empty_intersection"]``. Cost: per iteration one
    gather of ``(n, b)`` coordinates and one ``(n, n)`` eigendecomposition, then one pass over the
    updates for the mean; :math:`O(n b)` extra memory. Taught in chapter
    ``16_optimising_attacks``.
    """

    def __init__(self, f: int, niters: int = 5, c: float = 1.0, b: int = 10_000, weighted: bool = False,
                 generator: torch.Generator | None = None):
        self.f = check_f(f)
        self.niters = _positive_int(niters, "niters (the number of subsampling iterations)")
        c = _number(c, "c (the filtering fraction)")
        if not (0 < c < math.inf):
            raise ValueError(f"c (the filtering fraction) must be finite and > 0, got {c!r}")
        self.c = c
        self.b = _positive_int(b, "b (the number of coordinates sampled per iteration)")
        self.weighted = _flag(weighted, "weighted")
        self.generator = _own_generator(generator)

    def flagged(self, f: int) -> int:
        """:math:`\\lfloor c f \\rfloor`, the number of rows each iteration flags."""
        return math.floor(round(self.c * f, 9))

    def requirement(self, n: int, f: int) -> None:
        k = self.flagged(f)
        if not (n > 2 * f and n > k):
            raise ValueError(f"DnC(f={f}, c={self.c:g}) needs n > 2f = {2 * f} and n > floor(c f) = {k} "
                             f"updates, got n={n}")

    def _coordinates(self, d: int, b: int, device: torch.device) -> torch.Tensor:
        rng = np.random.default_rng(_draw_seed(self.generator))
        return torch.from_numpy(np.sort(rng.choice(d, size=b, replace=False))).to(device)

    def aggregate_finite(self, updates, weights, dropped):
        n, d = updates.shape
        k = self.flagged(max(self.f - dropped, 0))
        scores = torch.zeros(n, dtype=torch.float64, device=updates.device)
        runs, empty = 0, False
        if k == 0:
            keep = torch.ones(n, dtype=torch.bool, device=updates.device)
        else:
            b = min(self.b, d)
            runs = self.niters if b < d else 1
            kept = torch.zeros(n, dtype=torch.long, device=updates.device)  # iterations that kept each row
            for _ in range(runs):
                sub = updates if b == d else updates.index_select(1, self._coordinates(d, b, updates.device))
                s, peak = _top_direction_scores(sub.double())
                scores = torch.maximum(scores, s * peak * peak)
                kept[torch.sort(s, stable=True).indices[: n - k]] += 1
            most = kept.max()
            keep, empty = kept == most, int(most) < runs
        w = _kept_weights(keep, weights, self.weighted)
        ct = compute_dtype(updates.dtype)
        info = {"selected": keep.nonzero().flatten(), "weights": w, "scores": scores, "iterations": runs,
                "empty_intersection": empty}
        return w.to(ct) @ updates.to(ct), info


_CLUSTERINGS = ("meanshift", "dbscan")


def _median(values: torch.Tensor) -> torch.Tensor:
    """The median, the mean of the two middle values for an even count (the library's convention)."""
    s = torch.sort(values).values
    m = len(s)
    return s[m // 2] if m % 2 else (s[m // 2 - 1] + s[m // 2]) / 2


def _sign_counts(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``block``, the numbers of positive and of negative entries (int64, on the CPU).
    On the CPU NumPy counts them (``count_nonzero`` of a comparison), several times faster than
    torch's sum of a boolean tensor over a strided block."""
    if block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64):
        b = block.detach().numpy()
        pos, neg = np.count_nonzero(b > 0, axis=1), np.count_nonzero(b < 0, axis=1)
        return torch.from_numpy(pos.astype(np.int64)), torch.from_numpy(neg.astype(np.int64))
    return (block > 0).sum(dim=1).cpu(), (block < 0).sum(dim=1).cpu()


def _bandwidth(feat: np.ndarray, quantile: float) -> float:
    """Mean-shift bandwidth: the mean over points of the distance to their ``m``-th nearest other
    point, ``m = max(1, floor(quantile n) - 1)`` (capped at ``n - 1``). This is scikit-learn's
    ``estimate_bandwidth`` on all points whenever ``floor(quantile n) >= 2`` (it counts the point
    itself among its ``floor(quantile n)`` neighbours), without its collapse to 0 for small ``n``."""
    n = len(feat)
    if n < 2:
        return 0.0
    dist = np.sqrt(np.square(feat[:, None, :] - feat[None, :, :]).sum(axis=-1))
    dist.sort(axis=1)  # column 0 is each point itself
    m = min(n - 1, max(1, int(quantile * n) - 1))
    return float(dist[:, m].mean())


class SignGuard(RobustAggregator):
    r"""SignGuard (Xu, Huang, Song & Lan 2022, "SignGuard: Byzantine-robust Federated Learning through
    Collaborative Malicious Gradient Filtering", ICDCS).

    Two filters, then clipped averaging. With :math:`M = \operatorname{median}_i \|x_i\|`:

    1. **norms:** :math:`S_1 = \{ i : L \le \|x_i\| / M \le R \}` (written
       :math:`L M \le \|x_i\| \le R M`, so :math:`M = 0` keeps the zero updates);
    2. **signs:** on a random block :math:`B` of :math:`k = \lceil \text{fraction} \cdot d \rceil`
       consecutive coordinates, each update's sign statistics
       :math:`(p_i, z_i, q_i) = \frac1k\big(\#\{j \in B: x_{ij} > 0\}, \#\{x_{ij} = 0\}, \#\{x_{ij} < 0\}\big)`,
       each divided by its largest value over the updates; cluster these points and let
       :math:`S_2` be the largest cluster;
    3. :math:`S = S_1 \cap S_2` and

    .. math:: \mathrm{SignGuard}(x) = \frac{1}{|S|} \sum_{i \in S} x_i \min\Big(1, \frac{M}{\|x_i\|}\Big).

    Honest gradients share a mix of signs that an attack which reverses, rescales or shifts them
    changes; the norm filter and the clipping bound what the updates that pass can do. The rule takes
    no ``f``: the largest cluster is taken as benign, which presumes an honest majority, so it
    tolerates fewer than half non-finite updates (:meth:`RobustAggregator.tolerated`) and has no
    requirement on ``n`` beyond one update.

    **The authors' choices** (the defaults, from the paper and its released code): ``lower``
    :math:`L = 0.1`, ``upper`` :math:`R = 3` (the code's bounds are strict; here they are closed); sign
    statistics on 10% of the coordinates (``fraction=0.1``) taken, as in the authors' code, as one
    block of consecutive coordinates at a random offset (one cheap slice, where gathering scattered
    coordinates of a long vector costs many times more); each statistic divided by its maximum over
    the clients (the authors' code); mean-shift clustering (``clustering="meanshift"``, scikit-learn's
    ``MeanShift`` with ``bin_seeding=True, cluster_all=False``: points near no mode are outliers)
    with its bandwidth estimated at ``quantile=0.5``; the authors' alternative
    ``clustering="dbscan"`` (``eps=0.05``, ``min_samples=2``) is also available.

    **Choices made here.** The bandwidth is computed from all points (:func:`_bandwidth`; the
    authors' code subsamples 50). When it is 0 (every point coincides with its neighbours) or
    ``n = 1``, clusters are the groups of identical points. The largest cluster's ties go to the
    first cluster in scikit-learn's order. If :math:`S` is empty, :math:`S_1` is kept instead, and if
    that is empty too, every update (``last_info["fallback"]``: ``"norm_filter"``, ``"all"``, or
    ``None``): the output stays defined, each update clipped to :math:`M`. :math:`M` is the median
    of all (finite) updates' norms, the mean of the two middle ones for even ``n``. ``generator``
    draws the block's offset; ``None`` gives the rule a CPU generator of its own seeded with 0 (see
    :class:`DnC`), and FL checkpoints save its state.

    **Sample counts.** ``weighted=False`` (default): every kept update counts once (a Byzantine
    client could claim any count); ``weighted=True``: the clipped updates of :math:`S` are averaged
    with weights proportional to the clients' sample counts.

    ``last_info["selected"]``: the rows of :math:`S`; ``["weights"]``: each row's coefficient in the
    output (weight times clipping factor, so they sum to at most 1); ``["norm_threshold"]``:
    :math:`M`; ``["norm_rejected"]``, ``["sign_rejected"]``: how many rows each filter rejected;
    ``["clusters"]``; ``["fallback"]``. Cost: one pass for the norms, one over the block for the
    signs (counted by NumPy on the CPU), one for the output; the clustering works on ``n`` points in
    3 dimensions, whatever ``d`` (about 10 ms for mean shift at ``n = 50``, 5 ms for DBSCAN, on one
    core). Taught in chapter ``16_optimising_attacks``.
    """

    def __init__(self, lower: float = 0.1, upper: float = 3.0, fraction: float = 0.1,
                 clustering: str = "meanshift", quantile: float = 0.5, eps: float = 0.05, min_samples: int = 2,
                 weighted: bool = False, generator: torch.Generator | None = None):
        lower, upper = _number(lower, "lower (L)"), _number(upper, "upper (R)")
        if not (0 <= lower <= 1 <= upper):
            raise ValueError(f"the norm bounds must satisfy 0 <= lower <= 1 <= upper (the median norm itself "
                             f"passes), got lower={lower!r}, upper={upper!r}")
        self.lower, self.upper = lower, upper
        fraction = _number(fraction, "fraction")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction (of the coordinates whose signs are counted) must be in (0, 1], got {fraction!r}")
        self.fraction = fraction
        if clustering not in _CLUSTERINGS:
            raise ValueError(f"clustering must be one of {_CLUSTERINGS}, got {clustering!r}")
        self.clustering = clustering
        quantile = _number(quantile, "quantile")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile (of the mean-shift bandwidth) must be in (0, 1], got {quantile!r}")
        self.quantile = quantile
        eps = _number(eps, "eps")
        if not 0 < eps < math.inf:
            raise ValueError(f"eps (DBSCAN's radius) must be finite and > 0, got {eps!r}")
        self.eps = eps
        self.min_samples = _positive_int(min_samples, "min_samples (DBSCAN's core size)")
        self.weighted = _flag(weighted, "weighted")
        self.generator = _own_generator(generator)

    def sign_features(self, updates: torch.Tensor) -> torch.Tensor:
        """The ``(n, 3)`` float64 points that are clustered (on the CPU): per update the fractions of
        positive, zero and negative coordinates in one random block, each column divided by its
        maximum (a column of zeros stays zero). Draws the block's offset from ``generator``."""
        n, d = updates.shape
        k = min(d, max(1, math.ceil(round(self.fraction * d, 9))))
        start = int(torch.randint(0, d - k + 1, (1,), generator=self.generator, device=self.generator.device))
        pos, neg = _sign_counts(updates[:, start : start + k])
        frac = torch.stack([pos, k - pos - neg, neg], dim=1).double() / k
        top = frac.amax(dim=0)
        return torch.where(top > 0, frac / torch.where(top > 0, top, 1.0), frac)

    def largest_cluster(self, feat: np.ndarray) -> tuple[np.ndarray, int]:
        """A boolean mask of the largest cluster of the rows of ``feat`` (none if every point is an
        outlier), and the number of clusters."""
        if self.clustering == "dbscan":
            from sklearn.cluster import DBSCAN

            labels = DBSCAN(eps=self.eps, min_samples=self.min_samples).fit(feat).labels_
        else:
            h = _bandwidth(feat, self.quantile)
            if h > 0:
                from sklearn.cluster import MeanShift

                labels = MeanShift(bandwidth=h, bin_seeding=True, cluster_all=False).fit(feat).labels_
            else:
                labels = np.unique(feat, axis=0, return_inverse=True)[1].reshape(-1)
        clustered = labels >= 0
        if not clustered.any():
            return np.zeros(len(feat), dtype=bool), 0
        sizes = np.bincount(labels[clustered])
        return labels == int(sizes.argmax()), int((sizes > 0).sum())

    def aggregate_finite(self, updates, weights, dropped):
        n = updates.shape[0]
        device = updates.device
        norms = _row_norms(updates)
        med = _median(norms)
        if med > 0:
            by_norm = (norms >= self.lower * med) & (norms <= self.upper * med)
        else:
            by_norm = norms == 0
        mask, clusters = self.largest_cluster(self.sign_features(updates).numpy())
        by_sign = torch.from_numpy(mask).to(device)
        keep, fallback = by_norm & by_sign, None
        if not keep.any():
            keep, fallback = (by_norm, "norm_filter") if by_norm.any() else (torch.ones_like(by_norm), "all")
        clip = torch.where(norms > med, med / norms, torch.ones_like(norms))
        w = _kept_weights(keep, weights, self.weighted) * clip
        ct = compute_dtype(updates.dtype)
        info = {"selected": keep.nonzero().flatten(), "weights": w, "norm_threshold": float(med),
                "norm_rejected": int((~by_norm).sum()), "sign_rejected": int((~by_sign).sum()),
                "clusters": clusters, "fallback": fallback}
        return w.to(ct) @ updates.to(ct), info
