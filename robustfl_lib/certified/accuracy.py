"""Verified accuracy: the share of points whose margin lower bound is positive for every other class.

A point ``(x, y)`` is *verified* at ``eps`` when a sound lower bound of
:math:`z_y(x') - z_j(x')` over the box :math:`[\\max(x - \\epsilon, 0), \\min(x + \\epsilon, 1)]` is
``> 0`` for every :math:`j \\ne y` (:func:`~robustfl_lib.certified.margin_bounds`): then no
perturbation in the ball changes the prediction, and no attack can succeed, so verified accuracy
is at most the robust accuracy under any attack, and at ``eps = 0`` it is the clean accuracy up
to ties. Gowal et al. 2018 and Zhang et al. 2020 report it as "verified accuracy" (one minus the
verified error). Taught in chapter ``19_certified_linf_robustness``.
"""

from __future__ import annotations

import torch
from torch import nn

from .bounds import margin_bounds

__all__ = ["verified", "verified_accuracy"]


def verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "ibp",
             batch_size: int = 1024) -> torch.Tensor:
    """Per point (N,) bool: the margin lower bound (``method="ibp"`` or ``"crown-ibp"``) is > 0 for
    every other class. Runs the model in eval mode (restored after), without gradients, in
    batches of ``batch_size`` on the model's device."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or len(x) != len(y):
        raise ValueError("x and y must be tensors with one label per input")
    device = next((p.device for p in model.parameters()), x.device)
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
                m = margin_bounds(model, xb, yb, eps, method)
                # The true class's own entry is 0 by construction; it must not veto the point.
                m = m.scatter(1, yb.long()[:, None], float("inf"))
                out.append((m > 0).all(dim=1))
    finally:
        for mod, flag in was_training:
            mod.training = flag
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=device)


def verified_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "ibp",
                      batch_size: int = 1024) -> float:
    """Share of ``(x, y)`` verified at ``eps`` (:func:`verified`): IBP (Gowal et al. 2018) or
    CROWN-IBP (Zhang et al. 2020) bounds. Chapter ``19_certified_linf_robustness``."""
    if len(x) == 0:
        raise ValueError("x and y are empty")
    return float(verified(model, x, y, eps, method, batch_size).float().mean())
