"""Attacks that optimise their scale against the aggregator in use: :class:`AdaptiveScaling`.
Chapter ``12_exercise_adaptive_attacks``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from ..robust_stats import check_updates, compute_dtype
from .base import ByzantineAttack, _check_weights, _repeat, _weighted_mean

__all__ = ["AdaptiveScaling"]


class AdaptiveScaling(ByzantineAttack):
    r"""An attack tuned against a known aggregator (Fang et al. 2020; Shejwalkar & Houmansadr 2021).

    Every Byzantine client sends :math:`u(\lambda) = \bar u + \lambda\, r\, p / \|p\|`:
    the honest mean :math:`\bar u` moved along a malicious direction :math:`p`
    by :math:`\lambda` times :math:`r`, the median norm of the honest updates. The
    attacker knows the server's rule :math:`A` and picks the :math:`\lambda` that
    pushes the aggregate farthest from the honest mean,

    .. math:: \lambda^\star = \arg\max_{\lambda} \big\|A\big(u_1, \dots, u_{n_h}, u(\lambda), \dots, u(\lambda)\big) - \bar u\big\|,

    Shejwalkar & Houmansadr's "AGR-tailored" objective. Too small a
    :math:`\lambda` does nothing; too large a one is discarded by the rule (Krum
    stops selecting it, the trimmed mean trims it, a detector flags it), so the
    search finds the largest step the rule still lets through. Directions
    :math:`p` (``direction``): ``"sign"`` :math:`-\operatorname{sign}(\bar u)`, Fang
    et al.'s "directed deviation"; ``"mean"`` :math:`-\bar u` (IPM-like); ``"std"``
    :math:`-\sigma`, the coordinate-wise standard deviation, which makes this
    ALIE with its :math:`z` tuned against :math:`A` instead of taken from
    :func:`alie_z`. ``aggregator`` is an aggregator object (or a config name, with
    ``f``); it is copied before each trial, so a stateful rule is not disturbed.
    The search (:meth:`search`) treats :math:`A` as a black box: it evaluates the
    objective on ``scales`` (default :math:`2^{-6}, 2^{-5}, \dots, 2^{6}`), then
    ``refine`` times around the best one at half the previous spacing (in
    :math:`\log_2`), one aggregation per candidate (13 + 2 ``refine`` in all).
    ``last_scale`` holds the chosen :math:`\lambda`.

    With the server's weights (``weights`` of the honest rows, ``byzantine_weights``
    of the Byzantine ones, as :func:`~robustfl_lib.run_federated` passes them) the
    attacker reasons about what the server computes: :math:`\bar u` is the weighted
    honest mean :math:`\sum_i w_i u_i / \sum_i w_i` (what FedAvg of the honest clients
    would give), in the objective, in :math:`u(\lambda)` and in the ``"sign"`` and
    ``"mean"`` directions, and each trial calls :math:`A` with the weights of all
    rows; :math:`\sigma` (``"std"``) and :math:`r` stay unweighted, as the spread and
    length of a typical honest update. Without weights every row counts the same.
    Chapter ``12_exercise_adaptive_attacks``.
    """

    uses_weights = True

    def __init__(
        self,
        aggregator,
        direction: str = "sign",
        scales: Sequence[float] | None = None,
        refine: int = 2,
        f: int | None = None,
    ):
        if direction not in ("sign", "mean", "std"):
            raise ValueError(f"direction must be 'sign', 'mean' or 'std', got {direction!r}")
        if isinstance(aggregator, str):
            from ..aggregators import get_aggregator  # late import: aggregators is the defender's module

            if f is None:
                raise ValueError("an aggregator given by name needs the f it is configured with")
            aggregator = get_aggregator(aggregator, f=f)
        if not callable(aggregator):
            raise ValueError(f"aggregator must be an aggregator object or name, got {aggregator!r}")
        scales = tuple(float(s) for s in (scales if scales is not None else 2.0 ** torch.arange(-6.0, 7.0)))
        if not scales or any(not (math.isfinite(s) and s >= 0) for s in scales):
            raise ValueError("scales must be a non-empty sequence of finite numbers >= 0")
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
            raise ValueError(f"refine must be an integer >= 0, got {refine!r}")
        self.aggregator, self.direction, self.scales, self.refine = aggregator, direction, scales, refine
        self.last_scale: float | None = None

    def perturbation(self, honest: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        r"""The unit malicious direction :math:`p / \|p\|` (zero if :math:`p = 0`); ``weights``
        of the honest rows weight :math:`\bar u` (``None``: the plain mean)."""
        h = honest.to(compute_dtype(honest.dtype))
        mu = _weighted_mean(h, None if weights is None else torch.as_tensor(weights, device=h.device).to(h.dtype))
        if self.direction == "sign":
            p = -torch.sign(mu)
        elif self.direction == "mean":
            p = -mu
        else:
            p = -h.std(dim=0, correction=1 if h.shape[0] > 1 else 0)
        return p / p.norm().clamp_min(1e-30)

    def damages(
        self,
        honest: torch.Tensor,
        num_byzantine: int,
        scales: Sequence[float] | None = None,
        weights: torch.Tensor | None = None,
        byzantine_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""The objective :math:`\|A(\dots) - \bar u\|` at each of ``scales`` (default: the coarse grid),
        with the server's weights if given (see the class)."""
        check_updates(honest, "honest updates")
        if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 1:
            raise ValueError(f"num_byzantine must be an integer >= 1, got {num_byzantine!r}")
        weights, byzantine_weights = _check_weights(honest, num_byzantine, weights, byzantine_weights)
        h = honest.to(compute_dtype(honest.dtype))
        mu = _weighted_mean(h, weights)
        all_weights = None if weights is None else torch.cat([weights, byzantine_weights])
        step = h.norm(dim=1).median() * self.perturbation(h, weights)
        scales = self.scales if scales is None else scales
        out = torch.empty(len(scales), dtype=mu.dtype)
        for i, lam in enumerate(scales):  # one aggregation per candidate: the rule is a black box here
            candidate = torch.cat([h, _repeat(mu + float(lam) * step, num_byzantine)]).to(honest.dtype)
            rule = copy.deepcopy(self.aggregator)
            agg = rule(candidate) if all_weights is None else rule(candidate, weights=all_weights)
            out[i] = (agg.to(mu.dtype) - mu).norm()
        return out

    def search(
        self,
        honest: torch.Tensor,
        num_byzantine: int,
        weights: torch.Tensor | None = None,
        byzantine_weights: torch.Tensor | None = None,
    ) -> float:
        r""":math:`\lambda^\star`: the best of ``scales``, then ``refine`` rounds that try it times
        :math:`2^{\pm 1/2}`, :math:`2^{\pm 1/4}`, ... and keep the best (ties go to the first tried)."""
        weighting = {"weights": weights, "byzantine_weights": byzantine_weights}
        damage = self.damages(honest, num_byzantine, **weighting)
        i = int(torch.argmax(damage))
        best, best_damage = self.scales[i], float(damage[i])
        for k in range(1, self.refine + 1):
            if best == 0.0:
                break
            near = [best * 2.0 ** (-(0.5**k)), best * 2.0 ** (0.5**k)]
            d = self.damages(honest, num_byzantine, near, **weighting)
            j = int(torch.argmax(d))
            if float(d[j]) > best_damage:
                best, best_damage = near[j], float(d[j])
        return best

    def forge(self, honest, num_byzantine, generator, weights=None, byzantine_weights=None):
        h = honest.to(compute_dtype(honest.dtype))
        best = self.search(honest, num_byzantine, weights, byzantine_weights)
        self.last_scale = best
        mu = _weighted_mean(h, weights)
        return _repeat(mu + best * h.norm(dim=1).median() * self.perturbation(h, weights), num_byzantine)

    def __repr__(self) -> str:
        return (f"AdaptiveScaling(aggregator={self.aggregator!r}, direction={self.direction!r}, "
                f"{len(self.scales)} scales, refine={self.refine})")
