"""Attacks that optimise against robust aggregation without knowing the rule (AGR-agnostic):
Min-Max and Min-Sum (Shejwalkar & Houmansadr 2021). Chapter ``16_optimising_attacks``.
"""

from __future__ import annotations

import math

import torch

from ..robust_stats import compute_dtype, pairwise_sq_distances
from .base import ByzantineAttack, _check_finite, _repeat

__all__ = ["MinMax", "MinSum"]

# Columns per block when the float64 products are accumulated: about 8 MiB of float64 per block.
_BLOCK_ELEMENTS = 1 << 20
# More halvings than any bracket needs (the bracket is at most 2n times the answer, see _bisect).
_MAX_STEPS = 200


def _centred_products(h: torch.Tensor, mu: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``c_i = ||u_i - mu||^2`` and ``b_i = <u_i - mu, p>`` in float64, from explicit differences over
    column blocks (no ``(n, d)`` float64 copy, no cancellation of a common offset)."""
    n, d = h.shape
    c = torch.zeros(n, dtype=torch.float64, device=h.device)
    b = torch.zeros(n, dtype=torch.float64, device=h.device)
    block = max(1024, _BLOCK_ELEMENTS // n)
    for start in range(0, d, block):  # a loop over column blocks, each one vectorized
        diff = h[:, start : start + block].double() - mu[start : start + block].double()
        c += diff.square().sum(dim=1)
        b += diff @ p[start : start + block].double()
    return c, b


class _AgrAgnostic(ByzantineAttack):
    r"""Shared part of Min-Max and Min-Sum: the malicious update :math:`m(\gamma) = \bar u + \gamma p`,
    the perturbation :math:`p`, and the bisection for the largest :math:`\gamma` that keeps
    :math:`m(\gamma)` within the honest updates' own spread (a subclass states the constraint)."""

    def __init__(self, direction: str = "std", tol: float = 1e-6):
        if direction not in ("unit_vec", "std", "sign"):
            raise ValueError(f"direction must be 'unit_vec', 'std' or 'sign', got {direction!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise ValueError(f"tol (the bisection's relative tolerance on gamma) must be in (0, 1), got {tol!r}")
        self.direction, self.tol = direction, float(tol)
        self.last_scale: float | None = None

    def perturbation(self, honest: torch.Tensor) -> torch.Tensor:
        r""":math:`p`: ``"unit_vec"`` :math:`-\bar u/\|\bar u\|` (zero if :math:`\bar u = 0`),
        ``"std"`` :math:`-\sigma` (the unbiased coordinate-wise standard deviation), ``"sign"``
        :math:`-\operatorname{sign}(\bar u)`; in the compute dtype."""
        h = honest.to(compute_dtype(honest.dtype))
        mu = h.mean(dim=0)
        if self.direction == "unit_vec":
            return -mu / mu.norm().clamp_min(1e-30)
        if self.direction == "sign":
            return -torch.sign(mu)
        return -h.std(dim=0, correction=1 if h.shape[0] > 1 else 0)

    def _constraint(self, c: torch.Tensor, b: torch.Tensor, a: float, dist: torch.Tensor):
        """``(lhs, bound, upper)``: ``lhs(gamma)`` the constrained quantity at ``m(gamma)``, the
        honest bound it must not exceed, and a ``gamma`` at which it provably does."""
        raise NotImplementedError

    def search(self, honest: torch.Tensor) -> float:
        r"""The largest feasible :math:`\gamma` to relative tolerance ``tol``: ``0`` is feasible
        and the feasible set is an interval (the constraint is convex in :math:`\gamma`), so a
        bisection on :math:`[0, \gamma_{\mathrm{up}}]` with :math:`\gamma_{\mathrm{up}}` infeasible
        halves a bracket :math:`[\gamma_{\mathrm{lo}}, \gamma_{\mathrm{hi}}]` until
        :math:`\gamma_{\mathrm{hi}} - \gamma_{\mathrm{lo}} \le \mathrm{tol}\cdot\gamma_{\mathrm{hi}}`
        and returns the feasible end :math:`\gamma_{\mathrm{lo}}`. Returns 0 when :math:`p = 0` or
        the honest updates coincide (nothing to hide in)."""
        _check_finite(honest)
        h = honest.to(compute_dtype(honest.dtype))
        mu, p = h.mean(dim=0), self.perturbation(h)
        c, b = _centred_products(h, mu, p)
        a = float(p.double().square().sum())
        if not math.isfinite(a):
            raise ValueError("the perturbation's norm overflows float64; the honest updates are too large")
        if a == 0.0:
            return 0.0
        dist = pairwise_sq_distances(h)  # (n, n) float64, each pair certified
        lhs, bound, hi = self._constraint(c, b, a, dist)
        if bound <= 0.0:
            return 0.0
        steps = 0
        while lhs(hi) <= bound:  # the provable bound, guarded against rounding
            hi, steps = 2 * hi, steps + 1
            if steps > 60:
                raise RuntimeError(f"{type(self).__name__}: no infeasible gamma found below {hi}")
        lo = 0.0
        for _ in range(_MAX_STEPS):
            if hi - lo <= self.tol * hi:
                break
            mid = 0.5 * (lo + hi)
            if lhs(mid) <= bound:
                lo = mid
            else:
                hi = mid
        return lo

    def forge(self, honest, num_byzantine, generator):
        gamma = self.search(honest)
        self.last_scale = gamma
        h = honest.to(compute_dtype(honest.dtype))
        return _repeat(h.mean(dim=0) + gamma * self.perturbation(h), num_byzantine)


class MinMax(_AgrAgnostic):
    r"""Min-Max (Shejwalkar & Houmansadr 2021, "Manipulating the Byzantine: optimizing model
    poisoning attacks and defenses for federated learning", NDSS): an AGR-agnostic attack, one
    that does not know the server's rule. Every Byzantine client sends
    :math:`m = \bar u + \gamma^\star p` with

    .. math:: \gamma^\star = \max\Big\{\gamma \ge 0 : \max_{i \le n_h} \|m(\gamma) - u_i\|
       \le \max_{i, j \le n_h} \|u_i - u_j\|\Big\},

    the largest step along :math:`p` that keeps the malicious update no farther from any honest
    update than the two farthest honest updates are from each other: to every rule that compares
    distances it looks like an honest update, yet it is as far from the honest mean as that
    allows. :math:`\bar u` is the plain mean of the honest updates, :math:`p` the paper's
    perturbation (``direction``): ``"unit_vec"`` (inverse unit vector :math:`-\bar u/\|\bar u\|`),
    ``"std"`` (inverse standard deviation :math:`-\sigma`, default) or ``"sign"`` (inverse sign
    :math:`-\operatorname{sign}(\bar u)`). The paper tries the three and keeps the most damaging.

    Search: with :math:`c_i = \|u_i - \bar u\|^2` and :math:`b_i = \langle u_i - \bar u, p\rangle`
    (float64, from explicit differences), :math:`\|m(\gamma) - u_i\|^2 = c_i - 2\gamma b_i +
    \gamma^2\|p\|^2`, so each bisection step costs :math:`O(n_h)`; the bound comes from the
    :math:`n_h \times n_h` squared distances (:func:`~robustfl_lib.pairwise_sq_distances`). The
    bracket starts at :math:`[0, 2D/\|p\|]`, :math:`D` the largest honest distance (the right
    end is infeasible by the triangle inequality), and is halved until its width is at most
    ``tol`` (default :math:`10^{-6}`) times its right end (:meth:`search`); the paper's search
    halves a step from :math:`\gamma = 10` to an absolute threshold of :math:`10^{-5}`. The
    constraint is a sphere around each honest update, so its feasible :math:`\gamma` form an
    interval containing 0 and bisection finds its right end. ``last_scale`` holds
    :math:`\gamma^\star`. Sample counts (``weights``) are ignored: the constraint is on
    distances, which they do not change, and the paper's :math:`\bar u` is unweighted.
    Chapter ``16_optimising_attacks``.
    """

    def _constraint(self, c, b, a, dist):
        bound = float(dist.max())
        return (lambda g: float((c - 2 * g * b + g * g * a).max())), bound, 2 * math.sqrt(bound / a)


class MinSum(_AgrAgnostic):
    r"""Min-Sum (Shejwalkar & Houmansadr 2021, "Manipulating the Byzantine: optimizing model
    poisoning attacks and defenses for federated learning", NDSS): the AGR-agnostic attack whose
    malicious update :math:`m = \bar u + \gamma^\star p` keeps its *sum* of squared distances to
    the honest updates within the largest honest one,

    .. math:: \gamma^\star = \max\Big\{\gamma \ge 0 : \sum_{i \le n_h} \|m(\gamma) - u_i\|^2
       \le \max_{i \le n_h} \sum_{j \le n_h} \|u_i - u_j\|^2\Big\},

    so that its summed squared distance to the honest updates (Krum's score, over all of them) is
    no worse than the worst honest update's. (Some of the authors' released notebooks compare with
    the *smallest* honest sum instead, a stricter constraint; this is the paper's.)
    :math:`\bar u`, :math:`p` (``direction``: ``"unit_vec"``, ``"std"`` default, ``"sign"``),
    the bisection (``tol``, :meth:`search`), ``last_scale`` and the weights are as in
    :class:`MinMax`; the constraint is :math:`\sum_i (c_i - 2\gamma b_i) + n_h\gamma^2\|p\|^2
    \le S`, whose :math:`\sum_i b_i` vanishes for the plain mean, and the bracket starts at
    :math:`[0, 2\sqrt{S/(n_h\|p\|^2)}]`. Chapter ``16_optimising_attacks``.
    """

    def _constraint(self, c, b, a, dist):
        bound = float(dist.sum(dim=1).max())
        sc, sb, n = float(c.sum()), float(b.sum()), len(c)
        return (lambda g: sc - 2 * g * sb + n * g * g * a), bound, 2 * math.sqrt(bound / (n * a))
