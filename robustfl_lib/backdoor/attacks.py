"""Backdoors that adapt to the defense: :func:`stealthy_norm`, :class:`ConstrainAndScale`.
Chapter ``12_exercise_adaptive_attacks``.
"""

from __future__ import annotations

import torch

from ..robust_stats import compute_dtype
from .detectors import Detector, NormZScore
from .triggers import BackdoorPoisoning, PixelTrigger

__all__ = ["stealthy_norm", "ConstrainAndScale"]


def stealthy_norm(
    honest_norms: torch.Tensor, max_norms: torch.Tensor, detector: Detector, iterations: int = 60
) -> float:
    r"""The largest norm :math:`N` that attackers can give their updates without ``detector`` flagging any.

    The attackers' norms are :math:`\min(N, m_i)` (``max_norms`` = :math:`m_i`, each
    attacker's norm at its largest allowed boost); ``detector`` is a norm-based
    detector (it is run on the 1-D "updates" holding the norms, e.g.
    :class:`NormZScore`), and :math:`N` is found by bisection, up to a relative
    ``2**-iterations``. Because the attackers' own norms enter the median and MAD that
    :class:`NormZScore` measures them against, the answer depends on how many
    attackers there are, and is computed with all of them present. Returns
    ``inf`` when no norm is flagged (no attacker needs to hold back), ``0.0`` when
    even zero is. Chapter ``12_exercise_adaptive_attacks``.
    """
    h = torch.as_tensor(honest_norms).detach().double().flatten()
    m = torch.as_tensor(max_norms).detach().double().flatten().to(h.device)
    if len(h) == 0 or len(m) == 0:
        raise ValueError("stealthy_norm needs at least one honest and one attacker norm")
    if not (torch.isfinite(h).all() and torch.isfinite(m).all() and (h >= 0).all() and (m >= 0).all()):
        raise ValueError("norms must be finite and >= 0")

    def flagged(n: float) -> bool:
        norms = torch.cat([h, torch.clamp(m, max=n)])
        return bool(detector(norms[:, None])[len(h):].any())

    if not flagged(float(m.max())):
        return float("inf")
    if flagged(0.0):
        return 0.0
    lo, hi = 0.0, float(m.max())  # lo passes, hi is flagged
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if flagged(mid) else (mid, hi)
    return lo


class ConstrainAndScale(BackdoorPoisoning):
    r"""A backdoor that knows the norm detector: boost as much as the detector lets pass (Bagdasaryan et al. 2020).

    Like :class:`BackdoorPoisoning`, the clients train on poisoned data; then, in
    each round, every attacker's update :math:`u_i` is scaled to

    .. math:: \gamma_i u_i, \qquad \gamma_i = \min\Big(\gamma_{\max}, \frac{c\,N}{\|u_i\|}\Big),

    where :math:`N` is the largest norm that ``detector`` (a norm-based
    detector such as :class:`NormZScore`, with the server's threshold) would not
    flag given this round's honest updates (:func:`stealthy_norm`), :math:`c` =
    ``margin`` a safety factor and :math:`\gamma_{\max}` = ``boost``. The
    attacker is omniscient, as the update attacks of chapter
    ``03_byzantine_threats`` are: it sees the honest updates of the round. This is
    the "scale" half of constrain-and-scale, with the constraint put on the only
    statistic the norm detector looks at; :math:`\gamma_i < 1` (shrinking) happens
    when poisoned training alone makes an update too long. The FL loop calls
    :meth:`rescale` in place of multiplying by ``boost``; ``last_boost`` holds
    the latest :math:`\gamma_i`. Chapter ``12_exercise_adaptive_attacks``.
    """

    def __init__(
        self,
        trigger: PixelTrigger,
        fraction: float = 0.5,
        boost: float = 5.0,
        detector: Detector | None = None,
        margin: float = 0.98,
        seed: int = 0,
    ):
        super().__init__(trigger, fraction, boost, seed)
        if not 0 < margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {margin}")
        self.detector = detector if detector is not None else NormZScore()
        self.margin = float(margin)
        self.last_boost: torch.Tensor | None = None

    def rescale(self, own: torch.Tensor, honest: torch.Tensor) -> torch.Tensor:
        """The attackers' updates ``own`` ``(b, d)`` scaled to pass ``detector`` next to ``honest`` ``(h, d)``."""
        if own.ndim != 2 or honest.ndim != 2 or (len(honest) and own.shape[1] != honest.shape[1]):
            raise ValueError(f"own and honest must be (b, d) and (h, d), got {tuple(own.shape)}, {tuple(honest.shape)}")
        if len(own) == 0:
            return own
        x = own.to(compute_dtype(own.dtype))
        norms = x.norm(dim=1)
        if len(honest) == 0:
            gamma = torch.full_like(norms, self.boost)
        else:
            h = honest.to(compute_dtype(honest.dtype)).norm(dim=1)
            safe = stealthy_norm(h, self.boost * norms, self.detector) * self.margin
            gamma = torch.clamp(safe / norms.clamp_min(1e-30), max=self.boost)
        self.last_boost = gamma.detach().cpu()
        return (x * gamma[:, None]).to(own.dtype)

    def __repr__(self) -> str:
        return (f"ConstrainAndScale(trigger={self.trigger!r}, fraction={self.fraction}, boost={self.boost}, "
                f"detector={self.detector!r}, margin={self.margin}, seed={self.seed})")
