"""Attacks coupled over rounds: a small bias in one fixed direction, hidden in each round's honest
spread, that adds up over training (:class:`TimeCoupled`). Chapter
``15_heterogeneity_and_its_fixes`` runs it against worker momentum, the defence it is meant for.
"""

from __future__ import annotations

import math

import torch

from ..robust_stats import compute_dtype, sq_distances_to
from .base import ByzantineAttack, _check_finite, _repeat

__all__ = ["TimeCoupled"]


class TimeCoupled(ByzantineAttack):
    r"""A time-coupled attack: every round, every Byzantine client sends

    .. math:: u_{\mathrm{byz}}^{(t)} = \bar u^{(t)} + \kappa\, \rho^{(t)} v, \qquad
       \rho^{(t)} = \Big(\frac{1}{n_h}\sum_{i \le n_h} \|u_i^{(t)} - \bar u^{(t)}\|^2\Big)^{1/2},

    the honest mean of round :math:`t` moved by :math:`\kappa` (``fraction``, default 0.5) times
    the honest updates' root-mean-square distance to their mean, along a unit direction :math:`v`
    **fixed across rounds**. With :math:`\kappa < 1` the Byzantine update is closer to the mean
    than a typical honest one, so within a round no rule can tell it from noise (a distance rule
    prefers it, a coordinate-wise rule keeps it), yet its bias points the same way every round
    and adds up in the model, while the honest noise averages out. This is the situation that
    Karimireddy, He & Jaggi 2021 ("Learning from history for Byzantine robust optimization",
    ICML) use to show that memoryless rules cannot be robust and that worker momentum is the fix
    (momentum shrinks the honest spread :math:`\rho`, and with it the bias hidden inside it);
    Allen-Zhu et al. 2021 ("Byzantine-resilient non-convex stochastic gradient descent", ICLR)
    likewise defend against deviations that accumulate over iterations.

    :math:`v` (``direction``) is taken from the first call whose honest mean is non-zero and then
    kept: ``"mean"`` :math:`-\bar u^{(1)}/\|\bar u^{(1)}\|` (against the first round's descent) or
    ``"sign"`` :math:`-\operatorname{sign}(\bar u^{(1)})/\sqrt{d}`; a ``(d,)`` tensor fixes
    :math:`v` (normalised) from the start. Before :math:`v` is set (all honest means zero) the
    attack sends the honest mean. :math:`\bar u`, :math:`\rho` are unweighted; sample counts are
    ignored, as in ALIE.

    State (a learned :math:`v`): :meth:`reset` forgets it (the FL engine calls it when a run
    starts), :meth:`get_state` / :meth:`set_state` save and restore it (a float64 CPU tensor or
    ``None``) for checkpoints, so a resumed run sends bitwise the same updates; :attr:`direction_vector`
    is :math:`v` (``None`` before it is set). Chapter ``15_heterogeneity_and_its_fixes``.
    """

    _STATE_KEYS = frozenset({"v"})

    def __init__(self, fraction: float = 0.5, direction: str | torch.Tensor = "mean"):
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
                math.isfinite(fraction) and fraction >= 0):
            raise ValueError(f"fraction (of the honest spread) must be a finite number >= 0, got {fraction!r}")
        if isinstance(direction, torch.Tensor):
            if direction.ndim != 1 or direction.numel() == 0 or not torch.is_floating_point(direction):
                raise ValueError(f"direction must be a non-empty 1-D floating tensor, "
                                 f"got shape {tuple(direction.shape)}")
            norm = direction.double().norm()
            if not (torch.isfinite(norm) and norm > 0):
                raise ValueError("direction must be finite and non-zero")
            direction = (direction.double() / norm).cpu()
        elif direction not in ("mean", "sign"):
            raise ValueError(f"direction must be 'mean', 'sign' or a (d,) tensor, got {direction!r}")
        self.fraction, self.direction = float(fraction), direction
        self.reset()

    def reset(self) -> None:
        self._v: torch.Tensor | None = None

    @property
    def direction_vector(self) -> torch.Tensor | None:
        """The unit direction :math:`v` in use (float64), ``None`` before it is set."""
        return self.direction if isinstance(self.direction, torch.Tensor) else self._v

    def get_state(self) -> dict:
        return {"v": None if self._v is None else self._v.detach().to("cpu", copy=True)}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != self._STATE_KEYS:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"TimeCoupled state must be a dict with keys {sorted(self._STATE_KEYS)}, got {keys}")
        v = state["v"]
        if v is not None:
            v = torch.as_tensor(v)
            if v.ndim != 1 or not torch.is_floating_point(v) or not bool(torch.isfinite(v).all()):
                raise ValueError(f"TimeCoupled state: v must be a finite 1-D floating tensor or None, got {v!r}")
            v = v.to(torch.float64, copy=True)
        if v is not None and isinstance(self.direction, torch.Tensor):
            raise ValueError("TimeCoupled with a given direction learns no v; its state must be {'v': None}")
        self._v = v

    def _learn(self, mu: torch.Tensor) -> None:
        m = mu.double()
        if not bool(m.abs().max() > 0):
            return  # no direction to be against yet
        p = -m if self.direction == "mean" else -torch.sign(m)
        self._v = p / p.norm()

    def forge(self, honest, num_byzantine, generator):
        _check_finite(honest)
        h = honest.to(compute_dtype(honest.dtype))
        d = h.shape[1]
        mu = h.mean(dim=0)
        v = self.direction_vector
        if v is not None and v.numel() != d:
            raise ValueError(f"TimeCoupled holds a direction of length {v.numel()}, got updates of length {d}"
                             + ("" if isinstance(self.direction, torch.Tensor) else "; call reset() before a new run"))
        if v is None:
            self._learn(mu)
            v = self._v
        if v is None:
            return _repeat(mu, num_byzantine)
        spread = sq_distances_to(h, mu).mean().sqrt()
        return _repeat(mu + (self.fraction * spread).to(h.dtype) * v.to(device=h.device, dtype=h.dtype), num_byzantine)
