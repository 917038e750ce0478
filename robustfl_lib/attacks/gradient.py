"""Gradient attacks: :class:`FGSM` (Goodfellow et al. 2015) and :class:`PGD` (Madry et al. 2018).

Both follow the contract of :mod:`robustfl_lib.attacks.base`. Taught in chapters
``01_adversarial_examples`` and ``02_adversarial_training``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .base import (
    ATTACK_LOSSES,
    Forward,
    InputAttack,
    _check_bounds,
    _check_channels_last,
    _check_eps,
    _check_norm,
    _input_grad,
    _keep_worst,
    _l2_norms,
    _per_example,
    linf_bounds,
    logit_margin,
)

__all__ = ["FGSM", "PGD"]


# --------------------------------------------------------------------------- FGSM


@dataclass(frozen=True)
class FGSM(InputAttack):
    """Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy 2015), an linf attack.

    ``x_adv = clip_[lo,hi](x + eps * sign(grad_x L(f(x), y)))``: one step to the corner of the
    linf ball that a linear model of the loss says is worst, with ``[lo, hi]`` the ball
    intersected with ``[0, 1]`` as :func:`linf_bounds` computes it, so that rounding of
    ``x + eps`` never leaves the ball (not even by one ulp). Chapter ``01_adversarial_examples``
    shows that it underestimates what an iterative attack (:class:`PGD`) finds.
    ``channels_last`` is as for :class:`PGD`.
    """

    eps: float
    loss: str = "ce"
    bounds: tuple[float, float] = (0.0, 1.0)
    channels_last: bool | None = None
    norm: str = field(default="linf", init=False)

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        _check_bounds(self.bounds)
        _check_channels_last(self.channels_last)
        if self.loss not in ATTACK_LOSSES:
            raise ValueError(f"unknown attack loss {self.loss!r}; choose one of {ATTACK_LOSSES}")

    def _attack(self, model: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x.clone().requires_grad_(True)
        grad = _input_grad(model, x_adv, y, self.loss)
        lo, hi = linf_bounds(x, self.eps, self.bounds)
        return (x + self.eps * grad.sign()).clamp_(lo, hi)

    def scaled(self, factor: float) -> FGSM:
        return replace(self, eps=self.eps * factor)


# --------------------------------------------------------------------------- PGD


@dataclass(frozen=True)
class PGD(InputAttack):
    """Projected Gradient Descent (Madry et al. 2018): iterated, projected steepest ascent.

    From ``x_0 = x`` (or a uniform random point of the ball when ``random_start``), repeat
    ``steps`` times

    * linf: ``x_{t+1} = Proj(x_t + alpha * sign(g_t))``,
    * l2:   ``x_{t+1} = Proj(x_t + alpha * g_t / ||g_t||_2)``,

    with ``g_t = grad_x L(f(x_t), y)`` and ``Proj`` the projection onto the eps-ball around ``x``
    followed by clipping to ``bounds``. For linf the two are one clamp to
    ``[max(x - eps, 0), min(x + eps, 1)]``, the exact projection onto their intersection
    (with the ball's ends rounded inwards, :func:`linf_bounds`); for
    l2 clipping after the ball projection only moves coordinates towards ``x``, so the result
    stays in the ball. ``alpha`` defaults to ``2.5 * eps / steps`` (Madry et al.), enough to
    cross the ball from any start.

    ``loss`` is ``"ce"``, ``"cw"`` or ``"dlr"`` (see :func:`attack_loss`). With
    ``restarts > 1`` the first run is the same as with one restart; each further random start
    attacks only the examples not yet misclassified, and per example the point with the
    largest :func:`logit_margin` is kept, so more restarts never make the attack weaker.

    ``channels_last``: ``None`` (default) runs image batches ``(N, C, H, W)`` through a model
    with 2-D convolutions on a CPU with channels-last copies of its convolution weights, which
    makes each step about 1.6x faster there (``benchmarks/attacks.py``); the model is not
    modified, and one that cannot take channels-last activations is run as it is. ``True``
    forces it (errors propagate), ``False`` turns it off. The two layouts round differently,
    so the adversarial examples can differ where a gradient coordinate is almost zero.

    Randomness: ``seed`` draws each call's random start from a fresh generator seeded with it
    (same call, same output); ``generator`` draws from that (advancing) generator; with
    neither the global torch RNG is used. Taught in chapters ``01_adversarial_examples``
    (attack) and ``02_adversarial_training`` (the inner maximization of adversarial training).
    """

    eps: float
    alpha: float | None = None
    steps: int = 10
    random_start: bool = True
    norm: str = "linf"
    restarts: int = 1
    loss: str = "ce"
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    bounds: tuple[float, float] = (0.0, 1.0)
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        _check_norm(self.norm)
        _check_bounds(self.bounds)
        _check_channels_last(self.channels_last)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise ValueError(f"restarts must be an integer >= 1, got {self.restarts!r}")
        if self.loss not in ATTACK_LOSSES:
            raise ValueError(f"unknown attack loss {self.loss!r}; choose one of {ATTACK_LOSSES}")
        if self.seed is not None and self.generator is not None:
            raise ValueError("give either seed or generator, not both")
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2.5 * self.eps / self.steps)
        elif not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha (the step size) must be > 0, got {self.alpha!r}")

    def scaled(self, factor: float) -> PGD:
        return replace(self, eps=self.eps * factor, alpha=self.alpha * factor)

    # -- random start
    def _generator(self) -> torch.Generator | None:
        if self.seed is not None:
            return torch.Generator().manual_seed(int(self.seed))
        return self.generator

    def _rand(self, kind: str, shape: tuple[int, ...], like: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        # Draw on the generator's device (CPU by default) and move: the same seed gives the
        # same start on every device.
        device = gen.device if gen is not None else like.device
        draw = torch.rand if kind == "uniform" else torch.randn
        return draw(shape, generator=gen, device=device, dtype=like.dtype).to(like.device)

    def _start(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if self.norm == "linf":
            noise = self._rand("uniform", x.shape, x, gen).mul_(2 * self.eps).sub_(self.eps)
        else:
            # Uniform in the l2 ball: a uniform direction times radius eps * U^(1/d).
            direction = self._rand("normal", x.shape, x, gen)
            direction /= _per_example(_l2_norms(direction).clamp_min(1e-12), x)
            radius = self.eps * self._rand("uniform", (x.shape[0],), x, gen).pow(1.0 / x[0].numel())
            noise = direction.mul_(_per_example(radius, x))
        return noise.add_(x)

    # -- one run
    def _run(self, model: Forward, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        lo_b, hi_b = self.bounds
        if self.norm == "linf":
            # Ball and box in one clamp, with bounds rounded inwards (see linf_bounds).
            lo, hi = linf_bounds(x, self.eps, self.bounds)
            x_adv = self._start(x, gen).clamp_(lo, hi) if self.random_start else x.clone()
            x_adv.requires_grad_(True)
            for _ in range(self.steps):
                grad = _input_grad(model, x_adv, y, self.loss)
                with torch.no_grad():
                    x_adv.add_(grad.sign_(), alpha=self.alpha).clamp_(lo, hi)
            return x_adv.detach()

        x_adv = self._start(x, gen).clamp_(lo_b, hi_b) if self.random_start else x.clone()
        x_adv.requires_grad_(True)
        for _ in range(self.steps):
            grad = _input_grad(model, x_adv, y, self.loss)
            with torch.no_grad():
                grad /= _per_example(_l2_norms(grad).clamp_min(1e-12), grad)
                x_adv.add_(grad, alpha=self.alpha)
                delta = x_adv.sub_(x)  # x_adv now holds the perturbation
                delta.mul_(_per_example((self.eps / _l2_norms(delta).clamp_min(1e-12)).clamp_(max=1.0), delta))
                x_adv.add_(x).clamp_(lo_b, hi_b)
        return x_adv.detach()

    def _attack(self, model: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = self._generator()
        best = self._run(model, x, y, gen)
        if self.restarts == 1:
            return best
        with torch.no_grad():
            best_margin = logit_margin(model(best), y)
        for _ in range(self.restarts - 1):
            todo = (best_margin <= 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            _keep_worst(model, best, best_margin, todo, self._run(model, x[todo], y[todo], gen), y)
        return best
