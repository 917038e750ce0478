"""FAB, the Fast Adaptive Boundary attack (Croce & Hein 2020b): minimally distorted adversarial examples.

Taught in chapter ``01_adversarial_examples`` (the distance to the decision boundary) and run by
:class:`robustfl_lib.attacks.autoattack.AutoAttack` as FAB-T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .apgd import _ROW_ELEMENTS
from .base import (
    Forward,
    InputAttack,
    _check_bounds,
    _check_channels_last,
    _check_eps,
    _check_int,
    _check_norm,
    _check_seed,
    _draw,
    _one_per_point,
    _generator,
    _per_example,
    _project_l2,
    linf_bounds,
)

__all__ = ["FAB", "hyperplane_projection"]


def hyperplane_projection(
    w: torch.Tensor, c: torch.Tensor, up: torch.Tensor, down: torch.Tensor, norm: str = "linf"
) -> torch.Tensor:
    r"""Per row, the smallest step :math:`\delta` (linf or l2 norm) with :math:`w^\top \delta = c` and
    :math:`-\mathrm{down} \le \delta \le \mathrm{up}` (the box seen from the current point).

    Flipping signs so that :math:`c \ge 0`, the optimum moves each coordinate towards
    :math:`\mathrm{sign}(w_i)` by :math:`m_i(s) = \min(s, u_i)` (linf) or :math:`\min(s |w_i|, u_i)`
    (l2, the KKT form of the projection), with :math:`u_i` the room in that direction, for the
    smallest :math:`s` with :math:`H(s) = \sum_i |w_i| m_i(s) = c`. :math:`H` is piecewise linear and
    nondecreasing; sorting its breakpoints gives :math:`s` exactly, vectorized over rows (FAB's
    projection step, Croce & Hein 2020b). Where the box does not allow :math:`w^\top \delta = c`
    the full room is used (the box corner closest to the hyperplane). ``w``, ``up``, ``down``:
    ``(N, d)``; ``c``: ``(N,)``.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"unknown norm {norm!r}; choose 'linf' or 'l2'")
    flip = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w = w * flip[:, None]
    c = c * flip
    a = w.abs()
    room = torch.where(w > 0, up, down).clamp_min(0)
    rate = a if norm == "linf" else a * a
    breaks = room if norm == "linf" else room / a.clamp_min(1e-30)
    breaks = torch.where(a > 0, breaks, torch.full_like(breaks, math.inf))
    order = breaks.argsort(dim=1)
    b = breaks.gather(1, order)
    saturated = (a * room).gather(1, order).cumsum(1)  # sum of a_i u_i over the first k breakpoints
    spent_rate = rate.gather(1, order).cumsum(1)
    total_rate = spent_rate[:, -1:]
    h = torch.where(torch.isinf(b), math.inf, saturated + b.nan_to_num(posinf=0.0) * (total_rate - spent_rate))
    k = (h < c[:, None]).sum(1, keepdim=True)  # breakpoints passed before H reaches c
    pad = torch.zeros_like(c[:, None])
    sat_before = torch.cat([pad, saturated], 1).gather(1, k)
    rate_left = total_rate - torch.cat([pad, spent_rate], 1).gather(1, k)
    s = ((c[:, None] - sat_before) / rate_left.clamp_min(1e-30)).squeeze(1)
    feasible = (a * room).sum(1) >= c
    s = torch.where(feasible, s, torch.full_like(s, math.inf))[:, None]
    move = torch.minimum(s, room) if norm == "linf" else torch.minimum(s * a, room)
    return move * w.sign()  # w is already flipped to c >= 0


def _norms(t: torch.Tensor, norm: str) -> torch.Tensor:
    return t.abs().amax(1) if norm == "linf" else t.norm(dim=1)


@dataclass(frozen=True)
class FAB(InputAttack):
    r"""Fast Adaptive Boundary attack (Croce & Hein 2020b, "Minimally distorted adversarial examples
    with a fast adaptive boundary attack", ICML), linf or l2; FAB-T with ``targeted=True``.

    At the iterate :math:`x^{(k)}` the classifier is linearized: for the target class :math:`t`
    (FAB-T: the 2nd, 3rd, ... most likely class on the clean input, ``n_target_classes`` of them) or,
    untargeted, the class :math:`j \ne y` whose linearized boundary is closest
    (:math:`|f_j - f_y| / \|\nabla (f_j - f_y)\|_*`), the boundary becomes the hyperplane
    :math:`\pi = \{z : f(x^{(k)}) + \nabla f^\top (z - x^{(k)}) = 0\}` with :math:`f = f_t - f_y`.
    With :math:`\delta^{(k)}` and :math:`\delta_0` the smallest steps from :math:`x^{(k)}` and from
    the original :math:`x` onto :math:`\pi` within the box (:func:`hyperplane_projection`),

    .. math::

        \alpha = \min\Big(\frac{\|\delta^{(k)}\|}{\|\delta^{(k)}\| + \|\delta_0\|}, \alpha_{max}\Big),
        \qquad x^{(k+1)} = \mathrm{clip}\big((1 - \alpha)(x^{(k)} + \eta \delta^{(k)})
        + \alpha (x + \eta \delta_0)\big),

    a step that stays close to :math:`x` (:math:`\alpha_{max} = 0.1`, overshoot :math:`\eta = 1.05`).
    When :math:`x^{(k+1)}` is misclassified it is kept if it is the closest so far and the iterate
    goes back towards :math:`x`: :math:`x^{(k+1)} \leftarrow x + \beta (x^{(k+1)} - x)`,
    :math:`\beta = 0.9`. The first run starts at :math:`x`, later restarts at a random point at
    half the smaller of the best distance and ``eps``.

    FAB minimizes the distance; the call returns, per example, the closest adversarial point found
    if it lies within ``eps`` (clipped into the ball exactly), else ``x``. ``early_stop`` (default,
    as AutoAttack needs it) lets a point leave once it has one within ``eps``; with
    ``early_stop=False`` every run keeps minimizing, so a large ``eps`` gives the minimal
    perturbation found. ``seed``/``generator`` as for :class:`~robustfl_lib.attacks.apgd.APGD`.

    FAB-T's targets run together as one batch of (points x targets) rows, ``target_batch`` at a
    time (default: as APGD's); with early stopping a point's rows leave once one of them has a
    point within ``eps``. A run's iterates do not depend on the best point found so far, so with one
    restart the points found within ``eps`` are those of the sequential schedule
    (``target_batch=1``), and without early stopping so is the closest point (ties: the first
    target). Restarts run one after another, each over all targets, from random points at half the
    best distance over all earlier runs (the reference runs a target's restarts before the next
    target), drawn as APGD's.
    Taught in chapter ``01_adversarial_examples``.
    """

    eps: float
    norm: str = "linf"
    targeted: bool = True
    steps: int = 100
    restarts: int = 1
    n_target_classes: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    early_stop: bool = True
    seed: int | None = 0
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    bounds: tuple[float, float] = (0.0, 1.0)
    channels_last: bool | None = None
    target_batch: int | None = None

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        _check_norm(self.norm)
        _check_bounds(self.bounds)
        _check_channels_last(self.channels_last)
        _check_int("steps", self.steps, 1)
        _check_int("restarts", self.restarts, 1)
        _check_int("n_target_classes", self.n_target_classes, 1)
        if self.target_batch is not None:
            _check_int("target_batch", self.target_batch, 1)
        _check_seed(self.seed, self.generator)
        for name in ("targeted", "early_stop"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not 0 <= self.alpha_max <= 1:
            raise ValueError(f"alpha_max must be in [0, 1], got {self.alpha_max!r}")
        if not self.eta >= 1:
            raise ValueError(f"eta (the overshoot) must be >= 1, got {self.eta!r}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {self.beta!r}")

    def scaled(self, factor: float) -> FAB:
        return replace(self, eps=self.eps * factor)

    def _boundary(
        self, forward: Forward, point: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f = z_t - z_y`` at ``point`` and its input gradient, flattened; untargeted, for the class
        whose linearized boundary is closest."""
        point = point.detach().requires_grad_(True)
        logits = forward(point)
        rows = torch.arange(len(y), device=y.device)
        if target is not None:
            f = logits[rows, target] - logits[rows, y]
            (g,) = torch.autograd.grad(f.sum(), point)
            return f.detach(), g.flatten(1)
        classes = logits.shape[1]
        # One backward per class (the Jacobian), batched through vmap where the model allows it.
        outputs = torch.eye(classes, dtype=logits.dtype, device=logits.device)[:, None, :].expand(-1, len(y), -1)
        try:
            (jac,) = torch.autograd.grad(logits, point, outputs, is_grads_batched=True)
        except RuntimeError:
            jac = torch.stack([torch.autograd.grad(logits[:, j].sum(), point, retain_graph=True)[0] for j in range(classes)])
        jac = jac.flatten(2).transpose(0, 1)  # (N, C, d)
        f = (logits - logits[rows, y][:, None]).detach()
        g = jac - jac[rows, y][:, None]
        dual = g.abs().sum(2) if self.norm == "linf" else g.norm(dim=2)
        dist = (f.abs() / (dual + 1e-12)).scatter(1, y[:, None], math.inf)
        j = dist.argmin(1)
        return f[rows, j], g[rows, j]

    def _run(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
        start: torch.Tensor, point: torch.Tensor, rank: torch.Tensor, best: torch.Tensor, best_norm: torch.Tensor,
        shape: tuple[int, ...],
    ) -> None:
        """One FAB run from ``start`` for every row (a point with one target each, ``x`` and ``start``
        flattened). In place, per point: ``best``/``best_norm`` take the closest misclassified iterate of
        its rows where it is closer (ties: the lowest rank)."""
        low, high = self.bounds
        shape = (-1, *shape)
        n_points = best_norm.shape[0]
        s = {"x0": x, "x1": start.clone(), "y": y, "target": target, "point": point, "rank": rank}
        for _ in range(self.steps):
            if s["point"].numel() == 0:
                break
            x0, x1 = s["x0"], s["x1"]
            m = x0.shape[0]
            f, g = self._boundary(forward, x1.view(shape), s["y"], s["target"])
            with torch.no_grad():
                points = torch.cat([x1, x0])
                c = torch.cat([-f, -f - (g * (x0 - x1)).sum(1)])
                w = torch.cat([g, g])
                delta = hyperplane_projection(w, c, high - points, points - low, self.norm)
                d1, d0 = delta[:m], delta[m:]
                n1, n0 = _norms(d1, self.norm), _norms(d0, self.norm)
                alpha = (n1 / (n1 + n0).clamp_min(1e-12)).clamp(0.0, self.alpha_max)[:, None]
                x1 = ((1 - alpha) * (x1 + self.eta * d1) + alpha * (x0 + self.eta * d0)).clamp_(low, high)
                adv = forward(x1.view(shape)).argmax(1) != s["y"]
                dist = _norms(x1 - x0, self.norm)
                closer = adv & (dist < best_norm[s["point"]])
                if bool(closer.any()):
                    rows = closer.nonzero().squeeze(1)
                    pts = s["point"][rows]
                    rows = rows[_one_per_point(dist[rows], pts, s["rank"][rows], n_points, largest=False)]
                    best[s["point"][rows]] = x1[rows]
                    best_norm[s["point"][rows]] = dist[rows]
                x1 = torch.where(adv[:, None], x0 + self.beta * (x1 - x0), x1)
                s["x1"] = x1
                if self.early_stop:
                    keep = ~(best_norm[s["point"]] <= self.eps)
                    if not bool(keep.all()):
                        for key, v in s.items():
                            if v is not None:
                                s[key] = v[keep]

    def _attack(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = _generator(self.seed, self.generator)
        with torch.no_grad():
            logits = forward(x)
        n, classes = logits.shape
        correct = logits.argmax(1) == y
        flat = x.flatten(1)
        best = flat.clone()
        best_norm = torch.where(correct, math.inf, 0.0).to(x.dtype)
        k = min(self.n_target_classes, classes - 1) if self.targeted else 1
        # targets[r, i]: the (r + 2)-th most likely clean class of point i.
        targets = logits.argsort(dim=1, descending=True)[:, 1 : k + 1].t() if self.targeted else None
        # Restarts' random starts are drawn per (restart, target) for the points correct now, in a fixed
        # order, so that batching targets together changes no draw.
        first_todo = correct.nonzero().squeeze(1)
        position = torch.full((n,), -1, dtype=torch.long, device=x.device)
        position[first_todo] = torch.arange(first_todo.numel(), device=x.device)
        noise_shape = (first_todo.numel(), flat.shape[1])
        row_cap = max(n, _ROW_ELEMENTS // max(flat.shape[1], 1))
        for restart in range(self.restarts):
            r = 0
            while r < k:
                todo = (correct & (best_norm > self.eps)) if self.early_stop else correct
                todo = todo.nonzero().squeeze(1)
                m = todo.numel()
                if m == 0:
                    break
                g = min(self.target_batch or max(1, row_cap // m), k - r)
                point = todo.repeat(g)
                rank = torch.arange(r, r + g, device=x.device).repeat_interleave(m)
                xs = flat[point]
                start = xs
                if restart > 0:
                    kind = "uniform" if self.norm == "linf" else "normal"
                    t = torch.cat([_draw(kind, noise_shape, x, gen)[position[todo]] for _ in range(g)])
                    if self.norm == "linf":
                        t = t.mul_(2).sub_(1)
                        t /= t.abs().amax(1, keepdim=True).clamp_min(1e-12)
                    else:
                        t /= t.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    radius = 0.5 * best_norm[point].clamp(max=self.eps)
                    start = (xs + radius[:, None] * t).clamp_(*self.bounds)
                target = None if targets is None else targets[rank, point]
                self._run(forward, xs, y[point], target, start, point, rank, best, best_norm, tuple(x.shape[1:]))
                r += g
        best = best.view(x.shape)
        found = _per_example(best_norm <= self.eps, x)
        if self.norm == "linf":
            lo, hi = linf_bounds(x, self.eps, self.bounds)
            inside = best.clamp(lo, hi)
        else:
            inside = _project_l2(best.clone(), x, self.eps, self.bounds)
        return torch.where(found, inside, x)
