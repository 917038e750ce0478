"""Attacks that optimise their scale against the aggregator in use (AGR-tailored attacks).

:class:`ScaleSearch` holds the one search routine: the Byzantine update is a point on a line,
:math:`u(s) = b + s\\,v`, and the scale :math:`s` is the one (of a grid, refined) whose
aggregate lies farthest from the honest mean. Its subclasses are parametrisations of that line:

* :class:`AdaptiveScaling`: the honest mean moved along a unit direction (sign, mean or std),
  in units of the median honest norm (Fang et al. 2020; Shejwalkar & Houmansadr 2021);
* :class:`OptimalALIE`: ALIE's :math:`\\mu - z\\sigma` with :math:`z` searched (ByzFL's
  ``Optimal_ALittleIsEnough``; Allouah et al. 2023);
* :class:`OptimalIPM`: IPM's :math:`-\\epsilon\\bar u` with :math:`\\epsilon` searched (ByzFL's
  ``Optimal_InnerProductManipulation``).

Chapters ``12_exercise_adaptive_attacks`` (the tuned attack) and ``16_optimising_attacks`` (optimal ALIE).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from ..robust_stats import check_updates, compute_dtype
from .base import ByzantineAttack, _check_finite, _check_weights, _repeat, _weighted_mean
from .statistical import alie_z

__all__ = ["ScaleSearch", "AdaptiveScaling", "OptimalALIE", "OptimalIPM"]


def _std(h: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise standard deviation as ALIE takes it (unbiased; 0 for a single row)."""
    return h.std(dim=0, correction=1 if h.shape[0] > 1 else 0)


class ScaleSearch(ByzantineAttack):
    r"""Base of the attacks that search one scale against a known aggregator :math:`A`.

    Every Byzantine client sends :math:`u(s) = b + s\,v`, a point of a line that a subclass
    defines from the honest updates (:meth:`line` returns :math:`(b, v)`). The attacker picks

    .. math:: s^\star = \arg\max_{s} \big\|A\big(u_1, \dots, u_{n_h}, u(s), \dots, u(s)\big) - \bar u\big\|,

    the distance of the aggregate from the honest mean :math:`\bar u` (Shejwalkar &
    Houmansadr 2021's "AGR-tailored" objective, and ByzFL's for its optimal ALIE/IPM). The
    search (:meth:`search`) treats :math:`A` as a black box: it evaluates the objective on a
    grid (:meth:`grid`: ``scales``, default :math:`2^{-6}, 2^{-5}, \dots, 2^{6}`, plus what a
    subclass adds), then ``refine`` times around the best one at half the previous spacing
    (in :math:`\log_2`), keeping a candidate only if it is strictly better (ties go to the
    first tried), one aggregation per candidate. ``last_scale`` holds :math:`s^\star`; the
    update sent is exactly the candidate that was evaluated.

    ``aggregator`` is an aggregator object (or a config name, with ``f``); it is copied
    before each trial, so a stateful rule is not disturbed. With the server's weights
    (``weights``, ``byzantine_weights``) :math:`\bar u` is the weighted honest mean (what
    FedAvg of the honest clients would give) and each trial calls :math:`A` with the weights
    of all rows; without them every row counts the same. Honest updates must be finite.
    Chapter ``12_exercise_adaptive_attacks``.
    """

    uses_weights = True

    def __init__(
        self,
        aggregator=None,
        scales: Sequence[float] | None = None,
        refine: int = 2,
        f: int | None = None,
    ):
        if aggregator is None:
            raise ValueError(f"{type(self).__name__} needs the aggregator it attacks: aggregator=<object>, "
                             "or a name with f=, e.g. aggregator='median', f=2")
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
        self.aggregator, self.scales, self.refine = aggregator, scales, refine
        self.last_scale: float | None = None

    def line(self, h: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, v)``: the Byzantine update at scale ``s`` is ``b + s * v`` (``h`` and ``weights`` in
        the compute dtype; ``weights`` ``None`` without the server's weights)."""
        raise NotImplementedError

    def grid(self, num_honest: int, num_byzantine: int) -> tuple[float, ...]:
        """The coarse candidates: ``scales`` (a subclass may add its method's default scale)."""
        return self.scales

    def damages(
        self,
        honest: torch.Tensor,
        num_byzantine: int,
        scales: Sequence[float] | None = None,
        weights: torch.Tensor | None = None,
        byzantine_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""The objective :math:`\|A(\dots) - \bar u\|` at each of ``scales`` (default: :meth:`grid`),
        with the server's weights if given (see the class)."""
        check_updates(honest, "honest updates")
        if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 1:
            raise ValueError(f"num_byzantine must be an integer >= 1, got {num_byzantine!r}")
        _check_finite(honest)
        weights, byzantine_weights = _check_weights(honest, num_byzantine, weights, byzantine_weights)
        h = honest.to(compute_dtype(honest.dtype))
        mu = _weighted_mean(h, weights)
        all_weights = None if weights is None else torch.cat([weights, byzantine_weights])
        base, step = self.line(h, weights)
        scales = self.grid(honest.shape[0], num_byzantine) if scales is None else scales
        out = torch.empty(len(scales), dtype=mu.dtype)
        for i, lam in enumerate(scales):  # one aggregation per candidate: the rule is a black box here
            candidate = torch.cat([h, _repeat(base + float(lam) * step, num_byzantine)]).to(honest.dtype)
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
        r""":math:`s^\star`: the best of :meth:`grid`, then ``refine`` rounds that try it times
        :math:`2^{\pm 1/2}`, :math:`2^{\pm 1/4}`, ... and keep the best (ties go to the first tried)."""
        weighting = {"weights": weights, "byzantine_weights": byzantine_weights}
        grid = self.grid(honest.shape[0], num_byzantine)
        damage = self.damages(honest, num_byzantine, grid, **weighting)
        i = int(torch.argmax(damage))
        best, best_damage = grid[i], float(damage[i])
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
        best = self.search(honest, num_byzantine, weights, byzantine_weights)
        self.last_scale = best
        base, step = self.line(honest.to(compute_dtype(honest.dtype)), weights)
        return _repeat(base + float(best) * step, num_byzantine)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(aggregator={self.aggregator!r}, {len(self.scales)} scales, refine={self.refine})"


class AdaptiveScaling(ScaleSearch):
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
    The search is :class:`ScaleSearch`'s on the line :math:`b = \bar u`,
    :math:`v = r\,p/\|p\|`: ``scales`` (default :math:`2^{-6}, 2^{-5}, \dots, 2^{6}`), then
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

    def __init__(
        self,
        aggregator=None,
        direction: str = "sign",
        scales: Sequence[float] | None = None,
        refine: int = 2,
        f: int | None = None,
    ):
        if direction not in ("sign", "mean", "std"):
            raise ValueError(f"direction must be 'sign', 'mean' or 'std', got {direction!r}")
        super().__init__(aggregator, scales, refine, f)
        self.direction = direction

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
            p = -_std(h)
        return p / p.norm().clamp_min(1e-30)

    def line(self, h, weights):
        return _weighted_mean(h, weights), h.norm(dim=1).median() * self.perturbation(h, weights)

    def forge(self, honest, num_byzantine, generator, weights=None, byzantine_weights=None):
        # The sent update keeps the association of the first release, (lambda * r) * p, so that
        # results stay bitwise what they were; the search evaluates lambda * (r * p), which can
        # differ from it in the last bit.
        h = honest.to(compute_dtype(honest.dtype))
        best = self.search(honest, num_byzantine, weights, byzantine_weights)
        self.last_scale = best
        mu = _weighted_mean(h, weights)
        return _repeat(mu + best * h.norm(dim=1).median() * self.perturbation(h, weights), num_byzantine)

    def __repr__(self) -> str:
        return (f"AdaptiveScaling(aggregator={self.aggregator!r}, direction={self.direction!r}, "
                f"{len(self.scales)} scales, refine={self.refine})")


class OptimalALIE(ScaleSearch):
    r"""ALIE with its :math:`z` searched against the aggregator in use: ByzFL's
    ``Optimal_ALittleIsEnough`` (used by Allouah et al. 2023, "Fixing by mixing: a recipe for
    optimal Byzantine ML under heterogeneity", AISTATS), after Baruch et al. 2019. Every
    Byzantine client sends

    .. math:: u(z) = \bar u - z\,\sigma, \qquad
       z^\star = \arg\max_{z} \big\|A\big(u_1, \dots, u_{n_h}, u(z), \dots, u(z)\big) - \bar u\big\|,

    :class:`ALIE`'s update (:math:`\sigma` the unbiased coordinate-wise standard deviation) with
    the :math:`z` that pushes the rule's aggregate farthest from the honest mean instead of
    :func:`alie_z`'s :math:`z_{\max}`. The search is :class:`ScaleSearch`'s over ``scales``
    (default :math:`2^{-6}, \dots, 2^{6}`) **plus** :func:`alie_z` of :math:`n = n_h + b`,
    :math:`f = b`, then ``refine`` rounds; so the chosen :math:`z` does at least as much damage
    as plain ALIE and as every grid point. ByzFL searches :math:`\tau` in
    :math:`\bar u + \tau\sigma` by a step-doubling then contracting line search from 0; here
    the grid is logarithmic (``z`` spans four orders of magnitude between Krum, which wants it
    small, and the mean, which wants it large) and the sign is ALIE's. Without the server's
    weights, :math:`u(z^\star)` is bitwise ``ALIE(z=last_scale)``'s; with them :math:`\bar u` is
    the weighted honest mean (see :class:`ScaleSearch`) and :math:`\sigma` stays unweighted.
    Chapter ``16_optimising_attacks``.
    """

    def grid(self, num_honest, num_byzantine):
        return (*self.scales, alie_z(num_honest + num_byzantine, num_byzantine))

    def line(self, h, weights):
        return _weighted_mean(h, weights), -_std(h)


class OptimalIPM(ScaleSearch):
    r"""Inner-product manipulation with its :math:`\epsilon` searched against the aggregator in
    use: ByzFL's ``Optimal_InnerProductManipulation`` (used by Allouah et al. 2023), after Xie,
    Koyejo & Gupta 2019 ("Fall of empires"). Every Byzantine client sends

    .. math:: u(\epsilon) = -\epsilon\,\bar u, \qquad
       \epsilon^\star = \arg\max_{\epsilon} \big\|A\big(u_1, \dots, u_{n_h}, u(\epsilon), \dots,
       u(\epsilon)\big) - \bar u\big\|,

    with :class:`ScaleSearch`'s search over ``scales`` (default :math:`2^{-6}, \dots, 2^{6}`,
    which holds :class:`IPM`'s default 0.5 and sign flip's 1), then ``refine`` rounds; ByzFL
    searches the same objective by a step-doubling then contracting line search from 0.
    Without the server's weights :math:`u(\epsilon^\star)` equals ``IPM(epsilon=last_scale)``'s
    update; with them :math:`\bar u` is the weighted honest mean (see :class:`ScaleSearch`).
    Chapter ``16_optimising_attacks``.
    """

    def line(self, h, weights):
        mu = _weighted_mean(h, weights)
        return torch.zeros_like(mu), -mu
