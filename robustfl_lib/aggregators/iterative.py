"""Iterative rules: a centre refined by iterations, each a weighted (affine) combination of the rows
computed from their pairwise distances only (the geometric median, centered clipping).
Chapter ``08_stronger_aggregators``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..robust_stats import compute_dtype, coordinate_median, pairwise_sq_distances, sq_distances_to
from .base import RobustAggregator

__all__ = ["GeometricMedian", "CenteredClipping", "spread_radius"]


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
