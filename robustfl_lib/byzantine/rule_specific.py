"""Full-knowledge attacks crafted for one rule (Fang et al. 2020): the attack on the trimmed mean
and the median (:class:`FangTrimmedMean`) and the attack on Krum (:class:`FangKrum`). Chapter
``16_optimising_attacks``.
"""

from __future__ import annotations

import copy
import math

import torch

from ..robust_stats import compute_dtype, pairwise_sq_distances
from .base import ByzantineAttack, _check_finite, _check_int

__all__ = ["FangTrimmedMean", "FangKrum"]


def _change_direction(h: torch.Tensor) -> torch.Tensor:
    r""":math:`s_j`, the sign of the honest mean's coordinate :math:`j` (the direction in which the
    global parameter would move without attack), with a zero mean counted as :math:`+1`, so that
    every coordinate has a direction to be pushed against."""
    mu = h.mean(dim=0)
    return torch.where(mu >= 0, torch.ones_like(mu), -torch.ones_like(mu))


def _draw(shape: tuple[int, int], generator: torch.Generator | None, seed: int, dtype, device) -> torch.Tensor:
    """Uniform [0, 1) draws from ``generator``, or from a CPU generator seeded with ``seed`` (the
    same draws every call) when none is given: never the global random stream."""
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


class FangTrimmedMean(ByzantineAttack):
    r"""Fang et al. 2020 ("Local model poisoning attacks to Byzantine-robust federated learning",
    USENIX Security), the full-knowledge attack on the trimmed mean, which the paper also uses
    against the median. Per coordinate :math:`j`, with :math:`s_j` the sign of the honest mean
    (the direction the global parameter would move without attack; 0 counts as :math:`+1`) and
    :math:`w_{\max,j}`, :math:`w_{\min,j}` the largest and smallest honest values, each Byzantine
    value is drawn uniformly from

    .. math::
        s_j = -1:\ \begin{cases} [w_{\max,j},\ b\,w_{\max,j}] & w_{\max,j} > 0 \\
                                  [w_{\max,j},\ w_{\max,j}/b] & w_{\max,j} \le 0 \end{cases}
        \qquad
        s_j = +1:\ \begin{cases} [w_{\min,j}/b,\ w_{\min,j}] & w_{\min,j} > 0 \\
                                  [b\,w_{\min,j},\ w_{\min,j}] & w_{\min,j} \le 0 \end{cases}

    (:math:`b = 2`, ``b``): every Byzantine value lies beyond the honest extreme opposite to the
    honest direction, but no farther than a factor :math:`b`, so that the order statistics the
    rule keeps are dragged to the wrong side in every coordinate at once. The paper states it on
    local models; here on updates (deltas), where :math:`w` are the honest updates' coordinates.
    Draws are independent across clients and coordinates, from ``generator`` (or, without one,
    from a CPU generator seeded with ``seed``: the same draws every call). Sample counts are
    ignored: the rules it targets count every client once. Chapter ``16_optimising_attacks``.
    """

    def __init__(self, b: float = 2.0, seed: int = 0):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (math.isfinite(b) and b > 1):
            raise ValueError(f"b (how far beyond the honest extreme, as a factor) must be a finite number > 1, "
                             f"got {b!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.b, self.seed = float(b), seed

    def intervals(self, honest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``, per coordinate the interval the Byzantine values are drawn from (compute dtype)."""
        _check_finite(honest)
        h = honest.to(compute_dtype(honest.dtype))
        s = _change_direction(h)
        w_max, w_min = h.max(dim=0).values, h.min(dim=0).values
        b = self.b
        lo = torch.where(s > 0, torch.where(w_min > 0, w_min / b, b * w_min), w_max)
        hi = torch.where(s > 0, w_min, torch.where(w_max > 0, b * w_max, w_max / b))
        return lo, hi

    def forge(self, honest, num_byzantine, generator):
        lo, hi = self.intervals(honest)
        u = _draw((num_byzantine, honest.shape[1]), generator, self.seed, lo.dtype, lo.device)
        return lo + (hi - lo) * u


class FangKrum(ByzantineAttack):
    r"""Fang et al. 2020 ("Local model poisoning attacks to Byzantine-robust federated learning",
    USENIX Security), the full-knowledge attack on Krum. The first Byzantine client sends

    .. math:: w'_1 = -\lambda\, s,

    :math:`s` the sign of the honest mean per coordinate (0 counts as :math:`+1`): in update space
    the paper's :math:`w_{\mathrm{Re}} - \lambda s` with the received global model at the origin.
    The other :math:`c - 1` send points at distance :math:`\varepsilon r` from it (``epsilon``
    times the median honest norm :math:`r`, in directions drawn from ``generator``; 0 sends
    copies), so that they support :math:`w'_1` in Krum's score. :math:`\lambda` starts at the
    paper's upper bound

    .. math:: \lambda_0 = \frac{1}{(n - 2c - 1)\,\|s\|} \min_{i \le n_h}
       \sum_{l \in \tilde\Gamma_i} \|u_l - u_i\| + \frac{1}{\|s\|} \max_{i \le n_h} \|u_i\|,

    :math:`n = n_h + c`, :math:`\tilde\Gamma_i` the :math:`n - c - 2` honest updates nearest to
    :math:`u_i`, :math:`\|s\| = \sqrt d` (the paper's :math:`\sqrt d`), and is halved until the rule
    selects a crafted update, or until halving again would take it below ``threshold`` times
    :math:`\lambda_0` (then the smallest one tried is sent). The paper's threshold is an absolute
    :math:`10^{-5}` on parameters of order 1; here it is relative, so that it does not depend on
    the updates' scale, and it bounds the trials by :math:`\log_2(1/\text{threshold}) + 1` (18 at
    the default :math:`10^{-5}`). Each trial is one call of the rule: ``aggregator`` (default
    ``Krum(f)``, ``f`` defaulting to the number of Byzantine clients, as in the paper) or any rule
    that reports ``last_info["selected"]`` (Multi-Krum, Bulyan: success when a crafted row is among
    those selected). Needs
    :math:`n > 2c + 1` (``ValueError``). ``last_scale`` holds the :math:`\lambda` sent and
    ``last_selected`` whether the rule selected it. Sample counts are ignored (Krum ignores them).
    Chapter ``16_optimising_attacks``.
    """

    def __init__(self, f: int | None = None, epsilon: float = 1e-3, threshold: float = 1e-5,
                 aggregator=None, seed: int = 0):
        if f is not None:
            _check_int(f, "f", 0)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (
                math.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise ValueError(f"threshold (relative to the starting lambda) must be in (0, 1), got {threshold!r}")
        if aggregator is not None and not callable(aggregator):
            raise ValueError(f"aggregator must be an aggregator object, got {aggregator!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.f, self.epsilon, self.threshold = f, float(epsilon), float(threshold)
        self.aggregator, self.seed = aggregator, seed
        self.last_scale: float | None = None
        self.last_selected: bool | None = None

    def _rule(self, num_byzantine: int):
        if self.aggregator is not None:
            return self.aggregator
        from ..aggregators import Krum  # late import: aggregators is the defender's module

        return Krum(f=num_byzantine if self.f is None else self.f)

    def upper_bound(self, honest: torch.Tensor, num_byzantine: int) -> float:
        r""":math:`\lambda_0`, the paper's upper bound on :math:`\lambda` (see the class)."""
        n_h, d = honest.shape
        n, c = n_h + num_byzantine, num_byzantine
        if not n > 2 * c + 1:
            raise ValueError(f"Fang et al.'s Krum attack needs n > 2c + 1 = {2 * c + 1} clients, got n={n} "
                             f"({n_h} honest, {c} Byzantine)")
        h = honest.to(compute_dtype(honest.dtype))
        dist = pairwise_sq_distances(h).sqrt()
        dist.fill_diagonal_(torch.inf)
        near = dist.topk(n - c - 2, dim=1, largest=False).values.sum(dim=1)
        s_norm = math.sqrt(d)
        top = h.norm(dim=1).max().double()
        return float(near.min() / ((n - 2 * c - 1) * s_norm) + top / s_norm)

    def forge(self, honest, num_byzantine, generator):
        _check_finite(honest)
        ct = compute_dtype(honest.dtype)
        h = honest.to(ct)
        n_h, d = h.shape
        lam0 = self.upper_bound(honest, num_byzantine)
        s = _change_direction(h)
        radius = self.epsilon * float(h.norm(dim=1).median())
        offsets = torch.zeros(num_byzantine, d, dtype=ct, device=h.device)
        if num_byzantine > 1 and radius > 0:
            if generator is None:
                generator = torch.Generator().manual_seed(self.seed)
            e = torch.randn(num_byzantine - 1, d, generator=generator, device=generator.device, dtype=ct).to(h.device)
            offsets[1:] = radius * e / e.norm(dim=1, keepdim=True).clamp_min(1e-30)
        rule = copy.deepcopy(self._rule(num_byzantine))  # the caller's rule keeps its state and last_info
        lam, selected = lam0, False
        while True:  # one rule call per halving, at most log2(1 / threshold) + 1 of them
            crafted = (-lam * s)[None] + offsets
            rule(torch.cat([h, crafted]).to(honest.dtype))
            info = getattr(rule, "last_info", None) or {}
            if "selected" not in info:
                raise ValueError(f"FangKrum needs a rule that reports which rows it selected "
                                 f"(last_info['selected']: Krum, Multi-Krum, Bulyan); {type(rule).__name__} does not")
            chosen = torch.as_tensor(info["selected"]).reshape(-1)
            if bool((chosen >= n_h).any()):
                selected = True
                break
            if lam * 0.5 < self.threshold * lam0 or lam == 0.0:
                break
            lam *= 0.5
        self.last_scale, self.last_selected = lam, selected
        return crafted
