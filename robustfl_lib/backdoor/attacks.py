"""Backdoors that shape their update: :func:`stealthy_norm` and :class:`ConstrainAndScale` adapt it to a
norm detector (chapter ``12_exercise_adaptive_attacks``); :class:`Neurotoxin` confines it to the
coordinates that honest training changes least, so that it lasts (chapter ``11_exercise_backdoor_detection``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..robust_stats import compute_dtype
from .detectors import Detector, NormZScore
from .triggers import BackdoorPoisoning, PixelTrigger

__all__ = ["stealthy_norm", "ConstrainAndScale", "Neurotoxin"]


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


class Neurotoxin(BackdoorPoisoning):
    r"""Neurotoxin (Zhang, Panda, Song, Yang, Mahoney, Gonzalez, Ramchandran & Mittal 2022,
    "Neurotoxin: Durable Backdoors in Federated Learning", ICML): the backdoor update is confined
    to the coordinates that the honest clients change least, so that later honest rounds, which
    move other coordinates, do not wash it out.

    The clients train on poisoned data as for :class:`BackdoorPoisoning`; then each attacker's
    update :math:`u` (times ``boost`` :math:`\gamma`, 1 by default: the paper does not boost) is
    projected onto the complement of the top-:math:`k` coordinates of a benign reference
    :math:`g`:

    .. math:: \tilde u = \gamma\, u \odot (1 - m), \qquad m_j = 1 \iff |g_j|
        \text{ is among the } \operatorname{round}(k\, d) \text{ largest of } |g|,

    so :math:`\tilde u` is exactly zero on those coordinates and :math:`\gamma u` elsewhere.
    ``top_k`` :math:`= k = 0.05` by default: the mask ratio of the authors' released image-task
    runs (their ``gradmask_ratio 0.95`` keeps the bottom 95% of coordinates); the paper also
    reports 1% and 3%. Ties at the cut are broken by ``torch.topk``.

    **The reference.** In the paper the attacker takes :math:`g` from the previous round's
    global update (the difference of the two global models it downloaded), a stand-in for the
    benign gradient. :func:`~robustfl_lib.run_federated` passes that update to :meth:`rescale` as
    ``previous_step`` (the aggregate applied in the previous round), and ``reference="previous"``
    (default) then masks exactly as the paper does. Called without it (in the first round, or by a
    loop that does not pass it), ``"previous"`` falls back to the mean of the previous round's
    honest updates, which an omniscient attacker sees (as for :class:`ConstrainAndScale`), and in
    the very first round to this round's; ``reference="current"`` always uses the mean of this
    round's honest updates.
    :meth:`project` takes any reference (e.g. the true previous aggregate, in a loop of one's own).

    The paper projects every local gradient step; here the finished update is projected once
    (the same for one local step; with several, the unmasked coordinates can differ). The FL
    loop calls :meth:`rescale` on the attackers' updates in place of multiplying by ``boost``;
    ``last_mask`` holds the last mask (``None`` when there was no reference: no honest update).
    Stateful (the previous honest mean): ``reset``, ``get_state``, ``set_state``. Chapter
    ``11_exercise_backdoor_detection`` (durability: :func:`~robustfl_lib.backdoor.backdoor_durability`).
    """

    def __init__(self, trigger: PixelTrigger, fraction: float = 0.5, boost: float = 1.0, top_k: float = 0.05,
                 reference: str = "previous", seed: int = 0):
        super().__init__(trigger, fraction, boost, seed)
        if not (isinstance(top_k, (int, float)) and 0.0 < top_k < 1.0):
            raise ValueError(f"top_k (the fraction of coordinates masked) must be in (0, 1), got {top_k!r}")
        if reference not in ("previous", "current"):
            raise ValueError(f"reference must be 'previous' or 'current', got {reference!r}")
        self.top_k, self.reference = float(top_k), reference
        self.reset()

    def reset(self) -> None:
        self._previous: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None

    def get_state(self) -> dict[str, Any]:
        return {"previous": self._previous if self._previous is not None else torch.empty(0)}

    def set_state(self, state: dict[str, Any]) -> None:
        previous = state["previous"]
        self._previous = previous.clone() if previous.numel() else None

    def mask(self, reference: torch.Tensor) -> torch.Tensor:
        """``(d,)`` bool, ``True`` on the ``round(top_k * d)`` coordinates of largest ``|reference|``."""
        if reference.ndim != 1 or reference.numel() == 0:
            raise ValueError(f"reference must be a non-empty 1-D tensor, got shape {tuple(reference.shape)}")
        if not bool(torch.isfinite(reference).all()):
            raise ValueError("reference has non-finite entries")
        m = torch.zeros(reference.shape, dtype=torch.bool, device=reference.device)
        k = int(round(self.top_k * reference.numel()))
        if k > 0:
            m[torch.topk(reference.abs(), k, sorted=False).indices] = True
        return m

    def project(self, update: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """``update`` (``(d,)`` or ``(b, d)``) with the top-k coordinates of ``|reference|`` set to zero."""
        if update.shape[-1] != reference.shape[-1]:
            raise ValueError(f"update has {update.shape[-1]} coordinates, reference {reference.shape[-1]}")
        m = self.mask(reference.to(update.device))
        self.last_mask = m
        return update.masked_fill(m, 0.0)

    def rescale(self, own: torch.Tensor, honest: torch.Tensor, previous_step: torch.Tensor | None = None) -> torch.Tensor:
        """The attackers' updates ``own`` ``(b, d)``, boosted and projected (see the class docstring);
        ``previous_step`` ``(d,)``: the global update of the previous round, the paper's reference."""
        if own.ndim != 2 or honest.ndim != 2 or (len(honest) and own.shape[1] != honest.shape[1]):
            raise ValueError(f"own and honest must be (b, d) and (h, d), got {tuple(own.shape)}, {tuple(honest.shape)}")
        if previous_step is not None and (previous_step.ndim != 1 or previous_step.shape[0] != own.shape[1]):
            raise ValueError(f"previous_step must be ({own.shape[1]},), got {tuple(previous_step.shape)}")
        x = own.to(compute_dtype(own.dtype)) * self.boost
        current = honest.to(x.dtype).mean(dim=0) if len(honest) else None
        if self.reference == "previous" and previous_step is not None:
            ref = previous_step.to(x.dtype)
        else:
            ref = self._previous if self.reference == "previous" and self._previous is not None else current
        if current is not None:
            self._previous = current.detach().clone()
        if ref is None:
            self.last_mask = None
            return x.to(own.dtype)
        return self.project(x, ref.to(x.device)).to(own.dtype)

    def __repr__(self) -> str:
        return (f"Neurotoxin(trigger={self.trigger!r}, fraction={self.fraction}, boost={self.boost}, "
                f"top_k={self.top_k}, reference={self.reference!r}, seed={self.seed})")
