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
    _l2_norms,
    _per_example,
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


def _eta(a: int, b: int) -> torch.Tensor:
    """The l2 Square attack's bump on an ``a x b`` rectangle, unit l2 norm: at Chebyshev distance
    ``k`` from the centre ``(a // 2, b // 2)`` the value ``sum_{j=k}^{K-1} 1 / (j + 1)^2``,
    ``K = max(a // 2, b // 2) + 1`` (Andriushchenko et al. 2020, appendix: nested rectangles)."""
    rows = (torch.arange(a, dtype=torch.float64) - a // 2).abs()
    cols = (torch.arange(b, dtype=torch.float64) - b // 2).abs()
    k = torch.maximum(rows[:, None], cols[None, :]).long()
    big = max(a // 2, b // 2) + 1
    tail = (1.0 / torch.arange(1, big + 1, dtype=torch.float64) ** 2).flip(0).cumsum(0).flip(0)  # sum_{j>=k}
    bump = tail[k.clamp(max=big - 1)]
    return bump / bump.norm().clamp_min(1e-30)


def _pseudo_gaussian(a: int, b: int) -> torch.Tensor:
    """Two bumps of opposite sign, side by side along the longer side of an ``a x b`` window (the
    rows for a square), unit l2 norm: the l2 Square attack's update pattern."""
    if b > a:
        return _pseudo_gaussian(b, a).t().contiguous()
    out = torch.zeros(a, b, dtype=torch.float64)
    if a // 2:
        out[: a // 2] = _eta(a // 2, b)
    out[a // 2 :] = -_eta(a - a // 2, b)
    return out / out.norm().clamp_min(1e-30)


def _window_tables(size: int, side: int, like: torch.Tensor) -> torch.Tensor:
    """``(size - side + 1, size)`` 0/1 rows: row ``t`` marks the positions ``t .. t + side - 1``."""
    pos = torch.arange(size, device=like.device)
    start = torch.arange(size - side + 1, device=like.device)[:, None]
    return ((pos >= start) & (pos < start + side)).to(like.dtype)


# Above this many elements (64 MiB of float32) the table of every window of one size is not built and
# each query forms its windows from the row and column tables instead.
_WINDOW_TABLE_ELEMENTS = 2**24


class _Windows:
    """The 0/1 ``sh x sw`` windows in an ``h x w`` image: called on ``(m, 2)`` top-left corners,
    ``(m, 1, h, w)``; ``positions`` holds the number of corners per axis."""

    def __init__(self, h: int, w: int, sh: int, sw: int, like: torch.Tensor) -> None:
        self.rows, self.cols = _window_tables(h, sh, like), _window_tables(w, sw, like)
        self.positions = torch.tensor([h - sh + 1, w - sw + 1], dtype=like.dtype, device=like.device)
        self.stride = torch.tensor([w - sw + 1, 1], device=like.device)
        self.every = None
        if (h - sh + 1) * (w - sw + 1) * h * w <= _WINDOW_TABLE_ELEMENTS:
            # Every window of this size as one image, so that a query indexes it once.
            self.every = (self.rows[:, None, :, None] * self.cols[None, :, None, :]).reshape(-1, 1, h, w)

    def __call__(self, at: torch.Tensor) -> torch.Tensor:
        if self.every is not None:
            return self.every[(at * self.stride).sum(1)]
        return self.rows[at[:, 0]][:, None, :, None] * self.cols[at[:, 1]][:, None, None, :]


@dataclass(frozen=True)
class Square(InputAttack):
    r"""Square attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a
    query-efficient black-box adversarial attack via random search", ECCV), linf and l2.

    Random search on the margin :math:`L(x') = z_y(x') - \max_{j \ne y} z_j(x')` (or minus the
    cross-entropy), using only the model's outputs; a candidate is kept where it lowers
    :math:`L`, and an example stops once misclassified (:math:`L < 0`). ``queries`` bounds the
    model calls per example (the start counts as one). At query :math:`i` the window side is
    :math:`s = \mathrm{round}(\sqrt{p_i H W})` (:func:`square_fraction` gives :math:`p_i`).

    * linf: the start is vertical stripes, :math:`x^{(0)} = \mathrm{clip}(x + \epsilon\,\sigma)`
      with one random sign per channel and column; a random window gets one random sign per
      channel, :math:`x' = \mathrm{clip}_{[x - \epsilon, x + \epsilon] \cap [0, 1]}(x^{(i)} + 2
      \epsilon\, \sigma_c 1_{window})`. A window that would not change an example's point gets its
      signs flipped (the paper's resampling, in one vectorized step).
    * l2: the start tiles the image with blocks of side :math:`\lfloor \min(H, W) / 5 \rfloor` (at
      least 1), each holding the pattern :math:`\eta` (two nested-rectangle bumps of opposite sign,
      :func:`_pseudo_gaussian`, randomly transposed) times a random sign per channel, scaled to
      norm :math:`\epsilon`. A query draws two windows :math:`W_1, W_2` (side :math:`s`, odd, at
      least 3): with :math:`\delta = x^{(i)} - x`, per channel the mass of :math:`W_1 \cup W_2`
      moves into :math:`W_1`, as :math:`\delta_{W_1} \leftarrow \frac{\eta \sigma_c + \delta_{W_1}
      / \|\delta_{W_1}\|}{\|\cdot\|} \sqrt{\max(\epsilon^2 - \|\delta\|^2, 0) / C +
      \|\delta_{W_1 \cup W_2}\|^2}` and :math:`\delta_{W_2 \setminus W_1} \leftarrow 0`; then
      :math:`x' = \mathrm{clip}_{[0, 1]}(x + \epsilon \delta / \|\delta\|)`.

    Unlike the reference, which draws one window for the whole batch per query, every example draws
    its own. Inputs ``(N, C, H, W)``; ``(N, H, W)`` is one channel; any other shape ``(N, d)`` is a
    row of ``d`` pixels with windows of :math:`\mathrm{round}(p d)` of them. The model runs under
    ``torch.no_grad()``: the attack takes no gradient (channels-last on a CPU for a convolutional
    model, as the other attacks). ``seed`` (default 0) or ``generator`` as for the other attacks.
    Taught in chapter ``01_adversarial_examples``.
    """

    eps: float
    norm: str = "linf"
    queries: int = 5000
    p_init: float = 0.8
    loss: str = "margin"
    seed: int | None = 0
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    bounds: tuple[float, float] = (0.0, 1.0)
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        _check_norm(self.norm)
        _check_bounds(self.bounds)
        _check_channels_last(self.channels_last)
        _check_int("queries", self.queries, 1)
        _check_seed(self.seed, self.generator)
        if not (isinstance(self.p_init, (int, float)) and 0 < self.p_init <= 1):
            raise ValueError(f"p_init must be in (0, 1], got {self.p_init!r}")
        if self.loss not in SQUARE_LOSSES:
            raise ValueError(f"unknown Square loss {self.loss!r}; choose one of {SQUARE_LOSSES}")

    def scaled(self, factor: float) -> Square:
        return replace(self, eps=self.eps * factor)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return super()._perturb(model, x, y)

    def _attack(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._search(forward, x, y)

    def _scores(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(x)
        margin = -logit_margin(logits, y)
        loss = margin if self.loss == "margin" else -F.cross_entropy(logits, y, reduction="none")
        return margin, loss

    def _window(self, p: float, h: int, w: int) -> tuple[int, int]:
        """The window's height and width at share ``p``: a square where it fits, else a strip of the
        same area (rows of pixels, thin images)."""
        side = max(int(round(math.sqrt(p * h * w))), 1)
        if self.norm == "l2":
            side = max(side, 3)
            side += 1 - side % 2  # odd, so the bumps have a centre
        if side <= min(h, w):
            return side, side
        sh = min(h, side)
        return sh, min(w, max(int(round(p * h * w / sh)), 1))

    def _start(self, xv: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        n, c, h, w = xv.shape
        if self.norm == "linf":
            signs = _draw("uniform", (n, c, 1, w), xv, gen).lt_(0.5).to(xv.dtype).mul_(2).sub_(1)
            return (xv + self.eps * signs).clamp_(lo, hi)
        side = max(min(h, w) // 5, 1)
        blocks_h, blocks_w = h // side, w // side
        top, left = (h - 5 * side) // 2 if h >= 5 * side else 0, (w - 5 * side) // 2 if w >= 5 * side else 0
        u = _draw("uniform", (n, c + 1, blocks_h, blocks_w), xv, gen)
        sign = u[:, :c].lt(0.5).to(xv.dtype).mul_(2).sub_(1)  # per example, channel and block
        pattern = _pseudo_gaussian(side, side).to(xv)
        patterns = torch.stack([pattern, pattern.t()]).flatten(1)  # (2, side * side): random transposition
        r = torch.arange(h, device=xv.device) - top
        q = torch.arange(w, device=xv.device) - left
        br, bc = r.div(side, rounding_mode="floor"), q.div(side, rounding_mode="floor")
        inside = ((r >= 0) & (br < blocks_h))[:, None] & ((q >= 0) & (bc < blocks_w))[None, :]
        br, bc = br.clamp(0, blocks_h - 1), bc.clamp(0, blocks_w - 1)
        local = (r.remainder(side)[:, None] * side + q.remainder(side)[None, :])  # (h, w)
        flip = (u[:, c] < 0.5).long()[:, br[:, None], bc[None, :]]  # (n, h, w)
        values = patterns[flip, local[None].expand(n, -1, -1)] * inside
        delta = sign[:, :, br[:, None], bc[None, :]] * values[:, None]
        return (xv + self.eps * delta / _per_example(_l2_norms(delta).clamp_min(1e-12), delta)).clamp_(*self.bounds)

    def _search(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = _generator(self.seed, self.generator)
        n = x.shape[0]
        if x.ndim == 4:
            view = x.shape
        elif x.ndim == 3:
            view = (n, 1, *x.shape[1:])
        else:
            view = (n, 1, 1, x[0].numel())
        _, c, h, w = view
        linf, eps = self.norm == "linf", self.eps
        xv = x.reshape(view)
        if linf:
            lo, hi = (t.reshape(view) for t in linf_bounds(x, eps, self.bounds))
        else:
            lo = hi = xv  # for l2 the rows carry x itself
        out = self._start(xv, lo, hi, gen)
        margin, loss = self._scores(forward, out.view(x.shape), y)
        # The rows still to attack, compacted: one copy when an example leaves, none per query.
        idx = (margin > 0).nonzero().squeeze(1)
        best, lo, hi, yy, loss = out[idx], lo[idx], hi[idx], y[idx], loss[idx]
        tables: dict[tuple[int, int], _Windows] = {}
        for i in range(1, self.queries):
            m = idx.numel()
            if m == 0:
                break
            sh, sw = self._window(square_fraction(i, self.queries, self.p_init), h, w)
            if (sh, sw) not in tables:
                tables[sh, sw] = _Windows(h, w, sh, sw, xv)
            windows = tables[sh, sw]
            if linf:
                u = _draw("uniform", (m, 2 + c), xv, gen)
                at = (u[:, :2] * windows.positions).long()
                # +2 eps where the draw is below 1/2, as (1 * 4 eps - 2 eps), exactly.
                step = torch.where(u[:, 2:, None, None] < 0.5, 2 * eps, -2 * eps).to(xv.dtype) * windows(at)
                cand = (best + step).clamp_(lo, hi)
                same = (cand == best).flatten(1).all(1)
                if bool(same.any()):
                    cand = torch.where(same[:, None, None, None], (best - step).clamp_(lo, hi), cand)
            else:
                cand = self._l2_candidate(best, lo, m, c, sh, sw, windows, gen)
            cand_margin, cand_loss = self._scores(forward, cand.view(m, *x.shape[1:]), yy)
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

    def _l2_candidate(
        self, best: torch.Tensor, xr: torch.Tensor, m: int, c: int, sh: int, sw: int, windows: _Windows,
        gen: torch.Generator | None,
    ) -> torch.Tensor:
        """One l2 proposal per row: window 1 takes the mass of both windows and a fresh bump."""
        eps = self.eps
        u = _draw("uniform", (m, 5 + c), best, gen)
        at1, at2 = (u[:, :2] * windows.positions).long(), (u[:, 2:4] * windows.positions).long()
        w1, w2 = windows(at1), windows(at2)  # (m, 1, h, w)
        both = torch.maximum(w1, w2)
        delta = best - xr
        sq = delta * delta
        norm_w1 = (sq * w1).sum((2, 3)).sqrt_()  # (m, c)
        norm_both = (sq * both).sum((2, 3))
        norm_image = sq.flatten(1).sum(1)
        # The bump placed on window 1: its (row, column) inside the window, read off a table.
        pattern = _pseudo_gaussian(sh, sw).to(best)
        patterns = torch.stack([pattern, pattern.t()]).flatten(1) if sh == sw else pattern.flatten()[None]
        h, w = best.shape[2:]
        local_r = (torch.arange(h, device=best.device)[None] - at1[:, :1]).clamp_(0, sh - 1)
        local_c = (torch.arange(w, device=best.device)[None] - at1[:, 1:2]).clamp_(0, sw - 1)
        flip = (u[:, 4] < 0.5).long() if sh == sw else torch.zeros(m, dtype=torch.long, device=best.device)
        local = flip[:, None, None] * (sh * sw) + local_r[:, :, None] * sw + local_c[:, None, :]
        bump = patterns.flatten()[local][:, None] * w1  # (m, 1, h, w)
        sign = torch.where(u[:, 5:] < 0.5, -1.0, 1.0).to(best)[:, :, None, None]
        new = (bump * sign + delta * w1 / norm_w1.clamp_min(1e-12)[:, :, None, None])
        scale = ((eps * eps - norm_image).clamp_min(0)[:, None] / c + norm_both).sqrt_()
        new = new * (scale / (new * new).sum((2, 3)).sqrt_().clamp_min(1e-12))[:, :, None, None]
        delta = delta * (1 - both) + new
        delta = delta * (eps / _l2_norms(delta).clamp_min(1e-12))[:, None, None, None]
        return (xr + delta).clamp_(*self.bounds)
