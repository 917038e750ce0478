"""Spectral rules: they judge a set of updates by the largest eigenvalue of its covariance, the
direction in which Byzantine updates that shift the mean must stand out (SMEA, CAF).

Both work on the ``(n, n)`` matrix of squared distances only: the covariance of a (weighted) set
of rows has the same non-zero eigenvalues as its centred Gram matrix, and centring is
:math:`K = -\\tfrac12 (I - \\mathbf 1 w^\\top) D (I - w \\mathbf 1^\\top)` for weights :math:`w`
summing to one. One Gram pass over the ``(n, d)`` updates, then ``O(n^3)`` work per
eigendecomposition, and the output, a weighted average of the rows, formed once at the end: no
``(d, d)`` covariance and no power iteration in dimension ``d``. Taught in chapter ``18_more_robust_rules``.
"""

from __future__ import annotations

import math

import torch

from ..robust_stats import compute_dtype, pairwise_sq_distances
from .base import RobustAggregator
from .distance import SubsetSearch, subset_complements
from .iterative import _finite_component
from .preaggregation import check_f

__all__ = ["SMEA", "CAF"]

# At most this many subsets' (m, m) Gram matrices are decomposed at once: 32 MiB of float64 at m = 64.
_SUBSET_CHUNK = 1024
# SMEA's lower bounds: power steps per subset, and the relative slack that keeps a subset whose
# bound only rounding lifts above the best exact eigenvalue.
_POWER_STEPS = 8
_BOUND_RTOL = 1e-9


def _centred_gram(dist: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    r"""Gram matrix of the rows centred at :math:`\mu = \sum_k w_k x_k` (:math:`\sum w = 1`), from
    squared distances: :math:`K_{ij} = (x_i - \mu)^\top (x_j - \mu)`, batched over leading dims."""
    dw = (dist @ w[..., None])[..., 0]
    wdw = (w * dw).sum(-1)
    return -0.5 * (dist - dw[..., :, None] - dw[..., None, :] + wdw[..., None, None])


def _mean_weights(n: int, rows: torch.Tensor | None, device) -> torch.Tensor:
    w = torch.zeros(n, dtype=torch.float64, device=device)
    if rows is None:
        return w.fill_(1.0 / n)
    return w.index_fill_(0, rows, 1.0 / len(rows))


class SMEA(SubsetSearch):
    r"""Smallest maximum eigenvalue averaging (Allouah, Guerraoui, Gupta, Pinot & Stephan 2023,
    "On the Privacy-Robustness-Utility Trilemma in Distributed Learning", ICML).

    .. math:: \mathrm{SMEA}_f(x) = \frac{1}{n-f}\sum_{i \in S^\star} x_i,\qquad
        S^\star \in \arg\min_{|S| = n-f} \lambda_{\max}\Big(\frac{1}{|S|}\sum_{i\in S}
        (x_i - \bar x_S)(x_i - \bar x_S)^\top\Big),

    the mean of the :math:`n - f` updates whose empirical covariance has the smallest largest
    eigenvalue: the subset least spread out in its worst direction. Requires :math:`n > 2f`.

    **Exact, and bounded.** The search is over all :math:`\binom{n}{f}` subsets, with exact
    eigenvalues where ByzFL takes one power-method step from a random vector: a subset's
    covariance has the eigenvalues of its :math:`(n-f) \times (n-f)` centred Gram matrix over
    :math:`n - f`, computed from the pairwise distances. Every subset first gets a lower bound
    (the Rayleigh quotient after a few power steps from the whole set's top eigenvector, all
    subsets at once as ``(C, n) @ (n, n)`` products); exact ``eigvalsh`` then runs in increasing
    order of the bound and stops once the bound exceeds the best exact value, so the minimum is
    exact and usually few subsets are decomposed (``last_info["eigendecompositions"]``). More than ``max_subsets`` subsets (default 100,000; :math:`n = 50` allows
    :math:`f \le 3`) raise ``ValueError`` rather than run for hours: raise the bound knowingly.
    Ties (equal eigenvalues) go to the first subset in the lexicographic order of the kept rows,
    ByzFL's order. ``f = 0`` is the mean. ``last_info["selected"]``: the kept rows; ``["weights"]``;
    ``["eigenvalue"]``: the smallest :math:`\lambda_{\max}`; ``["subsets"]``: how many were searched.
    Taught in chapter ``18_more_robust_rules``.
    """

    def aggregate_finite(self, updates, weights, dropped):
        n = updates.shape[0]
        f = max(self.f - dropped, 0)
        ct = compute_dtype(updates.dtype)
        if f == 0:
            w = _mean_weights(n, None, updates.device)
            return w.to(ct) @ updates.to(ct), {"weights": w, "selected": torch.arange(n, device=updates.device),
                                               "subsets": 1}
        dist = pairwise_sq_distances(updates)
        kept = subset_complements(n, f, dist.device)  # (C, n - f), in ByzFL's order
        m = n - f
        uniform = torch.full((m,), 1.0 / m, dtype=torch.float64, device=dist.device)

        # Lower bounds first: a Rayleigh quotient never exceeds the largest eigenvalue. For a
        # vector v centred on the subset and zero elsewhere, the subset's centred Gram matrix
        # B = -J D_S J / 2 gives -2 B v = centred (D v)[S] and v^T B v = -v^T D v / 2, so power
        # steps for all subsets at once are (C, n) @ (n, n) products, with no (C, m, m) array.
        # They start from the whole set's top eigenvector.
        keep = torch.zeros(len(kept), n, dtype=torch.float64, device=dist.device).scatter_(1, kept, 1.0)

        def centred(v: torch.Tensor) -> torch.Tensor:
            v = v * keep
            return v - (v.sum(dim=1, keepdim=True) / m) * keep

        top = torch.linalg.eigh(_centred_gram(dist, torch.full((n,), 1.0 / n, dtype=torch.float64,
                                                                  device=dist.device)))[1][:, -1]
        v = centred(top.expand(len(kept), n))
        for _ in range(_POWER_STEPS):
            v = centred(v @ dist)
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        low = (-0.5 * ((v @ dist) * v).sum(dim=1) / v.square().sum(dim=1).clamp_min(1e-300)).clamp_min(0) / m
        # Then exact eigenvalues in increasing order of the bound, in growing batches, until the
        # bound exceeds the best exact value found: every subset left is worse, so the minimum is exact.
        order = torch.argsort(low)
        slack = _BOUND_RTOL * float(low.max())  # rounding in a bound must not prune a tie at zero
        best_lam, best, exact, start, size = math.inf, -1, 0, 0, 64
        while start < len(order):
            cand = order[start : start + size]
            start, size = start + size, min(4 * size, _SUBSET_CHUNK)
            cand = cand[low[cand] <= best_lam * (1 + _BOUND_RTOL) + slack]
            if len(cand) == 0:
                break
            idx = kept[cand]
            gram = _centred_gram(dist[idx[:, :, None], idx[:, None, :]], uniform.expand(len(idx), m))
            lam = torch.linalg.eigvalsh(gram)[:, -1] / m
            exact += len(cand)
            i = int(lam.argmin())
            lam_min = float(lam[i])
            first = int(cand[lam == lam[i]].min())  # equal eigenvalues: the first subset in ByzFL's order
            if lam_min < best_lam or (lam_min == best_lam and first < best):
                best_lam, best = lam_min, first
        rows = kept[best]
        w = _mean_weights(n, rows, updates.device)
        info = {"selected": rows, "weights": w, "eigenvalue": best_lam, "subsets": len(kept),
                "eigendecompositions": exact}
        return w.to(ct) @ updates.to(ct), info


class CAF(RobustAggregator):
    r"""Covariance-bound agnostic filter (Allouah, Guerraoui & Stephan 2025, "Towards Trustworthy
    Federated Learning with Untrusted Participants", ICML), as ByzFL runs it.

    Weights :math:`c_i = 1`; while :math:`\sum_i c_i > n - 2f`:

    1. :math:`\mu_c = \sum_i c_i x_i / \sum_i c_i` and
       :math:`\Sigma_c = \sum_i c_i (x_i - \mu_c)(x_i - \mu_c)^\top / \sum_i c_i`;
    2. :math:`(\lambda, v)`: the top eigenpair of :math:`\Sigma_c`; remember :math:`\mu_c` if
       :math:`\lambda` is the smallest seen;
    3. :math:`\tau_i = ((x_i - \mu_c)^\top v)^2` and :math:`c_i \leftarrow c_i (1 - \tau_i / \max_j \tau_j)`.

    The output is the remembered :math:`\mu_c` of smallest :math:`\lambda`. Each pass zeroes the
    weight of the row that sticks out most along the worst direction and shrinks the others in
    proportion, so no bound on the honest covariance is needed. Requires :math:`n > 2f`.

    Conventions: the eigenpair is exact (from the :math:`n \times n` weighted centred Gram
    matrix), where ByzFL takes one power-method step from a random vector, so this rule is
    deterministic. ``f = 0`` gives the mean (ByzFL returns nothing: its loop never runs). When
    the weighted points coincide (:math:`\lambda = 0`) the filter stops: that mean is already
    the best. Rows whose distance to the others overflowed start with :math:`c_i = 0`. The
    loop stops after ``max_iter`` passes at the latest (each pass usually zeroes a row, so it
    rarely needs more than ``2f + 1``). ``last_info["weights"]``: each row's weight in the
    output; ``["eigenvalue"]``; ``["iterations"]``. Taught in chapter ``18_more_robust_rules``.
    """

    def __init__(self, f: int, max_iter: int = 1000):
        self.f = check_f(f)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        self.max_iter = max_iter

    def requirement(self, n: int, f: int) -> None:
        if not 2 * f < n:
            raise ValueError(f"CAF(f={f}) needs n > 2f = {2 * f} updates, got n={n}")

    def aggregate_finite(self, updates, weights, dropped):
        n = updates.shape[0]
        f = max(self.f - dropped, 0)
        ct = compute_dtype(updates.dtype)
        if f == 0:
            w = _mean_weights(n, None, updates.device)
            return w.to(ct) @ updates.to(ct), {"weights": w, "iterations": 0}
        dist = pairwise_sq_distances(updates)
        live = _finite_component(dist)
        d_live = dist[live][:, live]
        c = torch.ones(int(live.sum()), dtype=torch.float64, device=dist.device)
        best_lam, best_w, it = math.inf, c / c.sum(), 0
        while float(c.sum()) > n - 2 * f and it < self.max_iter:
            it += 1
            w = c / c.sum()
            gram = _centred_gram(d_live, w)
            sw = w.sqrt()
            evals, evecs = torch.linalg.eigh(sw[:, None] * gram * sw[None, :])
            lam = float(evals[-1])
            if lam < best_lam:
                best_lam, best_w = lam, w
            if not lam > 0:  # every weighted row sits at the mean: nothing left to filter
                break
            # (x_i - mu)^T v with v = Y^T W^{1/2} u / sqrt(lam), Y the centred rows, u the top eigenvector of W^{1/2} K W^{1/2}.
            tau = (gram @ (sw * evecs[:, -1])).square() / lam
            c = c * (1 - tau / tau.max())
        full = torch.zeros(n, dtype=torch.float64, device=dist.device)
        full[live] = best_w
        return full.to(ct) @ updates.to(ct), {"weights": full, "eigenvalue": best_lam, "iterations": it}
