r"""Certified training: the IBP and CROWN-IBP losses and their eps / kappa / beta ramps.

The loss of one batch (Gowal et al. 2018, "On the effectiveness of interval bound propagation for
training verifiably robust models"; Zhang et al. 2020 ICLR, "Towards stable and efficient training
of verifiably robust neural networks") is

.. math::  \kappa\, \mathrm{CE}(z(x), y) + (1 - \kappa)\, \mathrm{CE}(-\underline m, y),
           \qquad \underline m = (1 - \beta)\, \underline m_{IBP} + \beta\, \underline m_{CROWN-IBP},

with :math:`\underline m_j` the lower bound of the margin :math:`z_y - z_j` over the eps-box
(:func:`~robustfl_lib.certified.margin_bounds`, :math:`\underline m_y = 0`): :math:`-\underline m` is the
worst-case logit vector, whose cross-entropy bounds the worst-case cross-entropy from above.
``method="ibp"`` is :math:`\beta = 0` (Gowal et al.); ``"crown-ibp"`` mixes in CROWN-IBP's bound with
weight :math:`\beta` (the paper ramps it from 1 to 0 with eps). A large eps from the first step
stalls training, so eps is ramped linearly from 0 after a warm-up, and :math:`\kappa` from 1 down to
its final value (0.5 in Gowal et al.): :class:`LinearRamp`, :func:`gowal_schedules`.
:class:`CertifiedLoss` plugs into :func:`robustfl_lib.training.train`'s ``loss_fn`` hook and counts
its own steps; the federated clients ramp by round (``FLConfig.cert_*``). Taught in chapter
``19_certified_linf_robustness``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bounds import Layers, Params, _check_method, _margins, bound_layers

__all__ = ["LinearRamp", "gowal_schedules", "CertifiedLoss", "certified_loss", "certified_sample_loss",
           "worst_case_cross_entropy"]

Schedule = Callable[[int], float]


@dataclass(frozen=True)
class LinearRamp:
    """A schedule over steps ``t = 0, 1, ...``: ``start`` for ``t < warmup``, then linear from
    ``start`` to ``end`` over ``ramp`` steps, then ``end`` (Gowal et al. 2018's eps and kappa
    schedules). ``ramp=0`` jumps to ``end`` at ``t = warmup``."""

    start: float
    end: float
    warmup: int = 0
    ramp: int = 0

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        for name in ("warmup", "ramp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return float(self.start)
        if self.ramp == 0:
            return float(self.end)
        frac = min((step - self.warmup) / self.ramp, 1.0)
        return float(self.start + (self.end - self.start) * frac)


def gowal_schedules(eps: float, warmup: int, ramp: int, kappa_end: float = 0.5) -> tuple[LinearRamp, LinearRamp]:
    """Gowal et al. 2018's schedules: eps from 0 to ``eps`` and kappa from 1 to ``kappa_end``, both
    held for ``warmup`` steps and ramped linearly over the next ``ramp``."""
    return LinearRamp(0.0, eps, warmup, ramp), LinearRamp(1.0, kappa_end, warmup, ramp)


def worst_case_cross_entropy(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample :math:`\\mathrm{CE}(-\\underline m, y)` for margin lower bounds (N, K) with
    :math:`\\underline m_y = 0`: an upper bound of the cross-entropy anywhere in the box."""
    return F.cross_entropy(-margins, y, reduction="none")


def _check_unit(name: str, v: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")


def _check_values(eps: float, kappa: float, beta: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    _check_unit("kappa", kappa)
    _check_unit("beta", beta)


def _sample_loss_core(layers: Layers, natural: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor, eps: float,
                      kappa: float, beta: float, params: Params, num_classes: int) -> torch.Tensor:
    """The per-sample loss from the natural logits and the bounds; no validation (vmap-safe)."""
    loss = 0.0
    if kappa > 0:
        loss = kappa * F.cross_entropy(natural, y, reduction="none")
    if kappa < 1:
        margins = 0.0
        if beta < 1:
            margins = (1 - beta) * _margins(layers, x, y, eps, "ibp", params, num_classes)
        if beta > 0:
            margins = margins + beta * _margins(layers, x, y, eps, "crown-ibp", params, num_classes)
        loss = loss + (1 - kappa) * worst_case_cross_entropy(margins, y)
    return loss


def certified_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, kappa: float = 0.5,
                          beta: float = 0.0, params: Params = None) -> torch.Tensor:
    """Per-sample certified loss (N,): :math:`\\kappa\\,\\mathrm{CE}(z(x), y) + (1 - \\kappa)\\,
    \\mathrm{CE}(-[(1 - \\beta)\\underline m_{IBP} + \\beta \\underline m_{CROWN-IBP}], y)` at the given
    eps, kappa, beta (the module's docstring; chapter ``19_certified_linf_robustness``). Terms whose weight
    is 0 are not computed."""
    _check_values(eps, kappa, beta)
    layers = bound_layers(model)
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("x must lie in [0, 1] (inputs scaled to [0, 1])")
    natural = torch.func.functional_call(model, dict(params), (x,)) if params is not None else model(x)
    return _sample_loss_core(layers, natural, x, y.long(), eps, kappa, beta, params, natural.shape[1])


class CertifiedLoss:
    """A ``loss_fn(model, x, y) -> scalar`` for :func:`robustfl_lib.training.train`: the certified
    loss (module docstring) at the current step's eps, kappa and beta, then the step advances.

    ``eps``, ``kappa`` and ``beta`` are numbers or schedules ``step -> value``
    (:class:`LinearRamp`, :func:`gowal_schedules`); ``method="ibp"`` fixes beta at 0 (Gowal et al.
    2018), ``"crown-ibp"`` defaults it to 1 (Zhang et al. 2020, who ramp it from 1 to 0 with eps:
    ``beta=LinearRamp(1.0, 0.0, warmup, ramp)``). ``step`` counts the calls (one per minibatch);
    :meth:`reset` sets it back to 0. Chapter ``19_certified_linf_robustness``.
    """

    def __init__(self, eps: float | Schedule, method: str = "ibp", kappa: float | Schedule = 0.5,
                 beta: float | Schedule | None = None):
        _check_method(method)
        if method == "ibp" and beta not in (None, 0, 0.0):
            raise ValueError("method='ibp' uses the IBP bound only (beta = 0); use method='crown-ibp' to mix bounds")
        self.eps, self.method, self.kappa = eps, method, kappa
        self.beta = (0.0 if method == "ibp" else 1.0) if beta is None else beta
        self.step = 0
        self.values(0)  # a bad constant fails here, not at the first batch

    def values(self, step: int) -> tuple[float, float, float]:
        """``(eps, kappa, beta)`` at ``step``, validated."""
        eps, kappa, beta = (v(step) if callable(v) else v for v in (self.eps, self.kappa, self.beta))
        _check_values(eps, kappa, beta)
        return float(eps), float(kappa), float(beta)

    def reset(self) -> None:
        self.step = 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps, kappa, beta = self.values(self.step)
        self.step += 1
        return certified_sample_loss(model, x, y, eps, kappa, beta).mean()

    def __repr__(self) -> str:
        return (f"CertifiedLoss(eps={self.eps!r}, method={self.method!r}, kappa={self.kappa!r}, "
                f"beta={self.beta!r}, step={self.step})")


def certified_loss(eps: float | Schedule, kappa: float | Schedule = 0.5, method: str = "ibp",
                   beta: float | Schedule | None = None) -> CertifiedLoss:
    """``CertifiedLoss(eps, method, kappa, beta)``: the loss callable for ``train(..., loss_fn=...)``,
    e.g. ``train(model, x, y, loss_fn=certified_loss(*gowal_schedules(0.1, 200, 800)))``."""
    return CertifiedLoss(eps, method=method, kappa=kappa, beta=beta)

