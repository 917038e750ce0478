"""Flags for gradient masking: signs that an attack's robust accuracy says little about robustness.

Athalye, Carlini & Wagner (2018, "Obfuscated gradients give a false sense of security", ICML) and
Croce & Hein (2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML) list the symptoms checked here. Taught in chapter
``01_adversarial_examples``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .apgd import APGD
from .base import _check_eps, _check_int, _check_norm, attack_mode
from .square import Square

__all__ = ["MaskingFlag", "MaskingReport", "masking_report"]


@dataclass(frozen=True)
class MaskingFlag:
    """One check: its ``name``, whether it ``fired`` (a sign of masking), a ``reason`` in words and
    the measured ``value`` behind it."""

    name: str
    fired: bool
    reason: str
    value: float

    def __bool__(self) -> bool:
        return self.fired


@dataclass(frozen=True)
class MaskingReport:
    """The flags of :func:`masking_report`; ``report["zero_gradients"]`` gives one, ``report.fired``
    the names of those that fired, ``print(report)`` a table."""

    flags: tuple[MaskingFlag, ...]

    def __getitem__(self, name: str) -> MaskingFlag:
        for flag in self.flags:
            if flag.name == name:
                return flag
        raise KeyError(f"no flag {name!r}; flags are {[f.name for f in self.flags]}")

    @property
    def fired(self) -> list[str]:
        return [f.name for f in self.flags if f.fired]

    def __str__(self) -> str:
        width = max(len(f.name) for f in self.flags)
        lines = [f"{'flag':<{width}}  fired  reason", f"{'-' * width}  -----  ------"]
        lines += [f"{f.name:<{width}}  {'YES' if f.fired else 'no':<5}  {f.reason}" for f in self.flags]
        return "\n".join(lines)


def _robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())


def masking_report(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    steps: int = 50,
    queries: int = 1000,
    seed: int = 0,
    gradient_share: float = 0.1,
    tolerance: float = 0.02,
) -> MaskingReport:
    r"""Run the checks AutoAttack's authors document for gradient masking and return named flags.

    * ``randomness``: two forward passes in eval mode on the same inputs differ (randomized
      defenses need EOT attacks; a deterministic attack's robust accuracy is noise).
    * ``probability_outputs``: the outputs are non-negative with rows summing to 1, i.e. softmax
      probabilities rather than logits (cross-entropy on them saturates; attack the logits).
    * ``zero_gradients``: at least ``gradient_share`` of the points have an input gradient of the
      cross-entropy with norm below :math:`10^{-8}` (a step function or a saturated layer).
    * ``black_box_beats_white_box``: Square (``queries``, no gradients) leaves fewer points robust
      than APGD-CE followed by APGD-T (``steps``): the gradients mislead.
    * ``accuracy_not_falling``: APGD-CE's robust accuracy at :math:`\epsilon \cdot (0, 1/4, 1/2,
      1, 2, 4)` (capped at the box's width for linf) rises somewhere by more than ``tolerance``,
      or does not fall at all from 0 to :math:`4\epsilon`.
    * ``unbounded_not_zero``: with an unbounded budget (linf: the whole box; l2: the box's
      diameter) APGD-CE leaves more than ``tolerance`` of the points robust.

    A flag that fires is a reason to distrust the attacks, not a proof of masking; no flag is no
    proof of robustness either. ``x``, ``y``, ``eps`` and ``norm`` as for the attacks; seeded.
    Taught in chapter ``01_adversarial_examples``.
    """
    _check_eps(eps)
    _check_norm(norm)
    _check_int("steps", steps, 1)
    _check_int("queries", queries, 1)
    if eps == 0:
        raise ValueError("masking_report needs eps > 0")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.ndim < 1 or len(x) != len(y) or not len(x):
        raise ValueError("x (N, ...) and y (N,) must be non-empty tensors of the same length")
    if not (0 < gradient_share <= 1 and 0 <= tolerance < 1):
        raise ValueError(f"gradient_share must be in (0, 1] and tolerance in [0, 1), got {gradient_share}, {tolerance}")
    n = len(x)
    y = y.to(x.device).long()
    flags: list[MaskingFlag] = []

    with attack_mode(model), torch.no_grad():
        first, second = model(x), model(x)
    diff = float((first - second).abs().max())
    scale = float(first.abs().max()) or 1.0
    flags.append(MaskingFlag(
        "randomness", diff > 1e-5 * scale,
        f"two forward passes differ by up to {diff:.3g}" if diff > 1e-5 * scale else "two forward passes agree",
        diff,
    ))

    rows = first.sum(1)
    probs = bool((first >= 0).all()) and bool(((rows - 1).abs() < 1e-4).all())
    flags.append(MaskingFlag(
        "probability_outputs", probs,
        "outputs are non-negative and sum to 1 per row (probabilities, not logits)" if probs
        else "outputs are not probabilities",
        float((rows - 1).abs().max()),
    ))

    with attack_mode(model), torch.enable_grad():
        point = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(point), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, point)
    share = float((grad.flatten(1).norm(dim=1) < 1e-8).double().mean())
    flags.append(MaskingFlag(
        "zero_gradients", share >= gradient_share,
        f"{share:.0%} of the points have a zero input gradient", share,
    ))

    clean = _robust(model, x, y)
    white = APGD(eps, norm=norm, steps=steps, seed=seed)
    x_white = white(model, x, y)
    with torch.no_grad():
        still = model(x_white).argmax(1) == y
    if bool(still.any()):
        idx = still.nonzero().squeeze(1)
        targeted = APGD(eps, norm=norm, steps=steps, targeted=True, seed=seed)
        x_t = targeted(model, x[idx], y[idx]) if first.shape[1] >= 4 else x[idx]  # APGD-T needs 4 classes
        with torch.no_grad():
            still[idx] = model(x_t).argmax(1) == y[idx]
    white_robust = int(still.sum())
    black_robust = _robust(model, Square(eps, norm=norm, queries=queries, seed=seed)(model, x, y), y)
    flags.append(MaskingFlag(
        "black_box_beats_white_box", black_robust < white_robust,
        f"robust points: Square {black_robust}, APGD-CE + APGD-T {white_robust} of {n}",
        (white_robust - black_robust) / n,
    ))

    width = 1.0  # the attacks' default box [0, 1]
    grid = [f * eps for f in (0.25, 0.5, 1.0, 2.0, 4.0)]
    if norm == "linf":
        grid = [min(e, width) for e in grid]
    accs = [clean] + [_robust(model, APGD(e, norm=norm, steps=steps, seed=seed)(model, x, y), y) for e in grid]
    slack = tolerance * n
    rise = max(b - a for a, b in zip(accs, accs[1:]))
    no_fall = clean > 0 and accs[-1] >= clean - slack
    flags.append(MaskingFlag(
        "accuracy_not_falling", rise > slack or no_fall,
        "robust points at eps x (0, 1/4, 1/2, 1, 2, 4): " + ", ".join(map(str, accs)),
        float(rise) / n,
    ))

    big = width if norm == "linf" else width * math.sqrt(x[0].numel())
    left = _robust(model, APGD(big, norm=norm, steps=steps, seed=seed)(model, x, y), y)
    flags.append(MaskingFlag(
        "unbounded_not_zero", left > slack,
        f"{left} of {n} points stay robust at eps = {big:.3g} (the whole box)", left / n,
    ))
    return MaskingReport(tuple(flags))
