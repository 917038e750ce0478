"""The Square attack (Andriushchenko et al. 2020): a score-based black-box attack, no gradients.

Taught in chapter ``01_adversarial_examples`` (a black-box attack beating white-box ones is a
sign of gradient masking) and run by :class:`robustfl_lib.attacks.autoattack.AutoAttack`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    InputAttack,
    _check_bounds,
    _check_eps,
    _check_int,
    _check_seed,
    _draw,
    _generator,
    linf_bounds,
    logit_margin,
)

__all__ = ["Square", "square_fraction"]

SQUARE_LOSSES = ("margin", "ce")


def square_fraction(i: int, queries: int, p_init: float) -> float:
    """The share ``p`` of the pixels a window covers at query ``i`` of ``queries``: ``p_init``,
    halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 queries of a 10,000-query budget
    (rescaled to ``queries``), as in Andriushchenko et al. (2020)."""
    it = int(i / queries * 10000)
    halvings = sum(it > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


@dataclass(frozen=True)
class Square(InputAttack):
    r"""Square attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a
    query-efficient black-box adversarial attack via random search", ECCV), linf.

    Random search on the margin :math:`L(x') = z_y(x') - \max_{j \ne y} z_j(x')` (or minus the
    cross-entropy), using only the model's outputs. It starts from vertical stripes,
    :math:`x^{(0)} = \mathrm{clip}(x + \epsilon\,\sigma)` with one random sign per channel and
    column. At query :math:`i`, per example, a random square window of side
    :math:`s = \mathrm{round}(\sqrt{p_i H W})` (:func:`square_fraction` gives :math:`p_i`) gets one
    random sign per channel, :math:`x' = \mathrm{clip}_{[x - \epsilon, x + \epsilon] \cap [0, 1]}
    (x^{(i)} + 2 \epsilon\, \sigma_c 1_{window})`, and :math:`x'` is kept where it lowers
    :math:`L`. An example stops once misclassified (:math:`L < 0`); ``queries`` bounds the model
    calls per example (the stripes count as one).

    Unlike the reference, which draws one window for the whole batch per query, every example draws
    its own, and a window that would not change an example's point gets its signs flipped (the
    original paper's resampling, in one vectorized step). Inputs ``(N, C, H, W)``; ``(N, H, W)``
    is one channel; any other shape ``(N, d)`` is a row of ``d`` pixels with windows of
    :math:`\mathrm{round}(p d)` of them. The model runs under ``torch.no_grad()``: the attack takes no
    gradient. ``seed`` (default 0) or ``generator`` as for the other attacks. Taught in chapter
    ``01_adversarial_examples``.
    """

    eps: float
    norm: str = "linf"
    queries: int = 5000
    p_init: float = 0.8
    loss: str = "margin"
    seed: int | None = 0
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    bounds: tuple[float, float] = (0.0, 1.0)
    channels_last: bool | None = field(default=False, init=False)

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        _check_bounds(self.bounds)
        _check_int("queries", self.queries, 1)
        _check_seed(self.seed, self.generator)
        if self.norm != "linf":
            raise ValueError(f"Square is implemented for norm='linf' only, got {self.norm!r}")
        if not (isinstance(self.p_init, (int, float)) and 0 < self.p_init <= 1):
            raise ValueError(f"p_init must be in (0, 1], got {self.p_init!r}")
        if self.loss not in SQUARE_LOSSES:
            raise ValueError(f"unknown Square loss {self.loss!r}; choose one of {SQUARE_LOSSES}")

    def scaled(self, factor: float) -> Square:
        return replace(self, eps=self.eps * factor)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._search(model, x, y)

    def _scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        margin = -logit_margin(logits, y)
        loss = margin if self.loss == "margin" else -F.cross_entropy(logits, y, reduction="none")
        return margin, loss

    def _search(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = _generator(self.seed, self.generator)
        n = x.shape[0]
        if x.ndim == 4:
            view = x.shape
        elif x.ndim == 3:
            view = (n, 1, *x.shape[1:])
        else:
            view = (n, 1, 1, x[0].numel())
        _, c, h, w = view
        lo, hi = (t.reshape(view) for t in linf_bounds(x, self.eps, self.bounds))
        xv = x.reshape(view)
        signs = _draw("uniform", (n, c, 1, w), xv, gen).lt_(0.5).to(x.dtype).mul_(2).sub_(1)
        out = (xv + self.eps * signs).clamp_(lo, hi)
        margin, loss = self._scores(model, out.view(x.shape), y)
        rows_h = torch.arange(h, device=x.device)
        cols_w = torch.arange(w, device=x.device)
        # The rows still to attack, compacted: one copy when an example leaves, none per query.
        keep = margin > 0
        idx = keep.nonzero().squeeze(1)
        best, lo, hi, yy, loss = out[idx], lo[idx], hi[idx], y[idx], loss[idx]
        for i in range(1, self.queries):
            m = idx.numel()
            if m == 0:
                break
            p = square_fraction(i, self.queries, self.p_init)
            side = max(int(round(math.sqrt(p * h * w))), 1)
            if side <= min(h, w):
                sh = sw = side
            else:  # a row of pixels (or a thin image): a window of the same area
                sh = min(h, side)
                sw = min(w, max(int(round(p * h * w / sh)), 1))
            u = _draw("uniform", (m, 2 + c), xv, gen)
            top = (u[:, 0] * (h - sh + 1)).long().clamp_(max=h - sh)
            left = (u[:, 1] * (w - sw + 1)).long().clamp_(max=w - sw)
            window = ((rows_h >= top[:, None]) & (rows_h < (top + sh)[:, None]))[:, None, :, None] & (
                (cols_w >= left[:, None]) & (cols_w < (left + sw)[:, None])
            )[:, None, None, :]
            step = (u[:, 2:] < 0.5).to(x.dtype).mul_(4 * self.eps).sub_(2 * self.eps)[:, :, None, None] * window
            cand = (best + step).clamp_(lo, hi)
            same = (cand == best).flatten(1).all(1)
            if bool(same.any()):
                flipped = (best - step).clamp_(lo, hi)
                cand = torch.where(same[:, None, None, None], flipped, cand)
            cand_margin, cand_loss = self._scores(model, cand.view(m, *x.shape[1:]), yy)
            better = cand_loss < loss
            best = torch.where(better[:, None, None, None], cand, best)
            loss = torch.where(better, cand_loss, loss)
            done = better & (cand_margin <= 0)
            if bool(done.any()):
                out[idx[done]] = best[done]
                stay = ~done
                idx, best, lo, hi, yy, loss = idx[stay], best[stay], lo[stay], hi[stay], yy[stay], loss[stay]
        out[idx] = best
        return out.view(x.shape)

