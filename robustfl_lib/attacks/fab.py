"""FAB, the Fast Adaptive Boundary attack (Croce & Hein 2020b): minimally distorted adversarial examples.

Taught in chapter ``01_adversarial_examples`` (the distance to the decision boundary) and run by
:class:`robustfl_lib.attacks.autoattack.AutoAttack` as FAB-T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

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

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        _check_norm(self.norm)
        _check_bounds(self.bounds)
        _check_channels_last(self.channels_last)
        _check_int("steps", self.steps, 1)
        _check_int("restarts", self.restarts, 1)
        _check_int("n_target_classes", self.n_target_classes, 1)
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
        start: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One FAB run from ``start``; returns the closest misclassified points (``x`` where none) and
        their distances (``inf`` where none)."""
        low, high = self.bounds
        n = x.shape[0]
        shape = x.shape
        best = x.flatten(1).clone()
        best_norm = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        s = {"x0": x.flatten(1), "x1": start.flatten(1).clone(), "y": y, "target": target,
             "idx": torch.arange(n, device=x.device)}
        for _ in range(self.steps):
            if s["idx"].numel() == 0:
                break
            x0, x1 = s["x0"], s["x1"]
            m = x0.shape[0]
            f, g = self._boundary(forward, x1.view(m, *shape[1:]), s["y"], s["target"])
            with torch.no_grad():
                points = torch.cat([x1, x0])
                c = torch.cat([-f, -f - (g * (x0 - x1)).sum(1)])
                w = torch.cat([g, g])
                delta = hyperplane_projection(w, c, high - points, points - low, self.norm)
                d1, d0 = delta[:m], delta[m:]
                n1, n0 = _norms(d1, self.norm), _norms(d0, self.norm)
                alpha = (n1 / (n1 + n0).clamp_min(1e-12)).clamp(0.0, self.alpha_max)[:, None]
                x1 = ((1 - alpha) * (x1 + self.eta * d1) + alpha * (x0 + self.eta * d0)).clamp_(low, high)
                adv = forward(x1.view(m, *shape[1:])).argmax(1) != s["y"]
                dist = _norms(x1 - x0, self.norm)
                closer = adv & (dist < best_norm[s["idx"]])
                best[s["idx"][closer]] = x1[closer]
                best_norm[s["idx"][closer]] = dist[closer]
                x1 = torch.where(adv[:, None], x0 + self.beta * (x1 - x0), x1)
                s["x1"] = x1
                if self.early_stop:
                    keep = ~(best_norm[s["idx"]] <= self.eps)
                    if not bool(keep.all()):
                        for key, v in s.items():
                            if v is not None:
                                s[key] = v[keep]
        return best.view(shape), best_norm

    def _attack(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = _generator(self.seed, self.generator)
        with torch.no_grad():
            logits = forward(x)
        correct = logits.argmax(1) == y
        best = x.clone()
        best_norm = torch.where(correct, math.inf, 0.0).to(x.dtype)
        targets: list[torch.Tensor | None] = [None]
        if self.targeted:
            ranked = logits.argsort(dim=1, descending=True)
            targets = [ranked[:, r] for r in range(1, min(self.n_target_classes, logits.shape[1] - 1) + 1)]
        for target in targets:
            for restart in range(self.restarts):
                todo = correct & (best_norm > self.eps) if self.early_stop else correct
                todo = todo.nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                xs = x[todo]
                start = xs
                if restart > 0:
                    radius = 0.5 * best_norm[todo].clamp(max=self.eps)
                    if self.norm == "linf":
                        t = _draw("uniform", xs.shape, xs, gen).mul_(2).sub_(1)
                        t /= _per_example(t.flatten(1).abs().amax(1).clamp_min(1e-12), t)
                    else:
                        t = _draw("normal", xs.shape, xs, gen)
                        t /= _per_example(t.flatten(1).norm(dim=1).clamp_min(1e-12), t)
                    start = (xs + _per_example(radius, xs) * t).clamp_(*self.bounds)
                cand, cand_norm = self._run(forward, xs, y[todo], None if target is None else target[todo], start)
                closer = cand_norm < best_norm[todo]
                best[todo[closer]] = cand[closer]
                best_norm[todo[closer]] = cand_norm[closer]
        found = _per_example(best_norm <= self.eps, x)
        if self.norm == "linf":
            lo, hi = linf_bounds(x, self.eps, self.bounds)
            inside = best.clamp(lo, hi)
        else:
            inside = _project_l2(best.clone(), x, self.eps, self.bounds)
        return torch.where(found, inside, x)
