"""Attacks that hide in the honest cloud's statistics: ALIE (a shift of :math:`z` standard
deviations, :func:`alie_z`), inner-product manipulation, and Mimic (copies of one honest worker,
chosen by the direction of maximal variance). Chapters ``03_byzantine_threats`` and
``08_stronger_aggregators``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from ..robust_stats import compute_dtype
from .base import ByzantineAttack, _mean, _repeat

__all__ = ["alie_z", "ALIE", "IPM", "Mimic"]


def alie_z(n: int, f: int) -> float:
    r"""ALIE's :math:`z_{\max}` (Baruch et al. 2019): with
    :math:`s = \lfloor n/2 + 1 \rfloor - f` honest clients that must be fooled,
    :math:`z = \Phi^{-1}((n - s)/n)`, the largest shift (in standard deviations)
    that still leaves the Byzantine values closer to the mean than ``s`` honest
    ones. ``s`` is taken at least 1 (when ``f`` reaches a majority)."""
    if not 0 <= f <= n or n < 1:
        raise ValueError(f"need 0 <= f <= n and n >= 1, got n={n}, f={f}")
    s = max(math.floor(n / 2 + 1) - f, 1)
    return NormalDist().inv_cdf((n - s) / n)


class ALIE(ByzantineAttack):
    r""""A little is enough" (Baruch et al. 2019): every Byzantine client sends

    .. math:: u_{\mathrm{byz}} = \mu - z\,\sigma

    with :math:`\mu, \sigma` the coordinate-wise mean and standard deviation of
    the honest updates, unweighted as in the paper (the spread that order
    statistics see does not depend on sample counts; the server's weights are
    not used). The shift stays within the honest spread in every
    coordinate, so order statistics (median, trimmed mean) and distance-based
    rules (Krum) keep it, yet it biases all coordinates together. ``z=None``
    uses :func:`alie_z` of ``n = n_h + b`` and ``f = b``. Chapters
    ``03_byzantine_threats`` and ``08_stronger_aggregators``.
    """

    def __init__(self, z: float | None = None):
        if z is not None and (isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z)):
            raise ValueError(f"z must be a finite number (honest standard deviations) or None for alie_z, got {z!r}")
        self.z = z

    def forge(self, honest, num_byzantine, generator):
        h = honest.to(compute_dtype(honest.dtype))
        z = alie_z(h.shape[0] + num_byzantine, num_byzantine) if self.z is None else self.z
        std = h.std(dim=0, correction=1 if h.shape[0] > 1 else 0)
        return _repeat(h.mean(dim=0) - z * std, num_byzantine)


class IPM(ByzantineAttack):
    r"""Inner-product manipulation (Xie, Koyejo & Gupta 2019, "Fall of Empires"):
    every Byzantine client sends :math:`-\epsilon \bar u`, with :math:`\bar u` the
    plain mean of the honest updates as in the paper. A small
    :math:`\epsilon` (default 0.5) keeps the malicious updates short and close
    together, so distance-based rules prefer them, while the aggregate's inner
    product with the true descent direction turns small or negative. Chapters
    ``03_byzantine_threats`` and ``08_stronger_aggregators``."""

    def __init__(self, epsilon: float = 0.5):
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.epsilon = epsilon

    def forge(self, honest, num_byzantine, generator):
        return _repeat(-self.epsilon * _mean(honest), num_byzantine)


class Mimic(ByzantineAttack):
    r"""Mimic (Karimireddy, He & Jaggi 2022, "Byzantine-robust learning on heterogeneous
    datasets via bucketing", ICLR): every Byzantine client sends a copy of the update of
    one honest worker :math:`i^\star`, chosen once and then kept for the whole run, so
    that the aggregate is tilted towards that worker's data every round: a consistent
    bias that is harmless to a mean on IID data but, under non-IID data, pulls the model
    towards one client's classes, and which robust rules that follow a majority cluster
    amplify.

    The choice, as in the paper and its authors' code (``MimicVariantAttacker`` in
    ``epfml/byzantine-robust-noniid-optimizer``): during a warm-up of the first
    :math:`T_0` calls (``warmup``, default 1, the authors' default) the attacker
    estimates the direction of maximal variance of the honest updates :math:`x_i`
    with an online power iteration,

    .. math::
        \mu_t = \tfrac{t}{t+1}\mu_{t-1} + \tfrac{1}{t+1}\bar x^{(t)}, \qquad
        v_t = \sum_i \langle x_i - \mu_t, z_{t-1}\rangle (x_i - \mu_t), \qquad
        z_t \propto \tfrac{t}{t+1} z_{t-1} + \tfrac{1}{t+1} \frac{v_t}{\|v_t\|},

    :math:`\|z_t\| = 1`, started at :math:`t = 0` from :math:`\mu_0 = \bar x^{(0)}` and a
    standard normal :math:`z_{-1}` drawn from ``seed`` (so :math:`z_0 = v_0/\|v_0\|`),
    and picks :math:`i^\star = \arg\max_i \langle z_t, x_i\rangle` (first index on ties);
    during warm-up it copies that round's pick, and the pick of the last warm-up call is
    kept for every later call. :math:`z` is an eigenvector estimate, defined up to sign:
    :math:`i^\star` is the honest update farthest along :math:`z` (an extreme of the
    direction of maximal variance, on the side :math:`z` points to), not necessarily the
    one farthest from the mean.

    The fixed choice is a fixed *honest row index*: ``honest`` comes in participant
    order (as :func:`~robustfl_lib.run_federated` passes it), so it is one client only
    when the same clients take part every round (full participation, no dropout). With
    partial participation the index names whoever is at that position among this round's
    honest participants; in a round with fewer honest rows than the index, the row
    farthest along :math:`z` is copied instead (the stored choice is kept). The warm-up
    counts calls, i.e. rounds in which Byzantine clients send.

    State: :meth:`reset` forgets the choice and the direction (the FL engine calls it
    when a run starts; reuse for a new run without it raises when the update size
    changes), :meth:`get_state` / :meth:`set_state` save and restore it for checkpoints;
    :attr:`choice` is the fixed row (``None`` before the warm-up ends). ``target=int``
    copies that row every call and keeps no state. Chapter ``03_byzantine_threats``.
    """

    def __init__(self, target: int | None = None, warmup: int = 1, seed: int = 0):
        if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 0):
            raise ValueError(f"target must be None or a row index >= 0, got {target!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1 (calls before the choice is fixed), got {warmup!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.target, self.warmup, self.seed = target, warmup, seed
        self.reset()

    _STATE_KEYS = frozenset({"calls", "mu", "z", "choice"})

    def reset(self) -> None:
        self._calls = 0
        self._mu: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._choice: int | None = None

    @property
    def choice(self) -> int | None:
        """The honest row copied after the warm-up (``None`` before it ends or with ``target``)."""
        return self._choice

    def get_state(self) -> dict:
        def cpu(t):
            return None if t is None else t.detach().to("cpu", copy=True)

        return {"calls": self._calls, "mu": cpu(self._mu), "z": cpu(self._z), "choice": self._choice}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != self._STATE_KEYS:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"Mimic state must be a dict with keys {sorted(self._STATE_KEYS)}, got {keys}")
        calls, choice = state["calls"], state["choice"]
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"Mimic state: calls must be an integer >= 0, got {calls!r}")
        mu, z = (None if state[k] is None else torch.as_tensor(state[k]).to(torch.float64, copy=True)
                 for k in ("mu", "z"))
        if (z is None) != (calls == 0) or (mu is None) != (z is None):
            raise ValueError(f"Mimic state: mu and z are set exactly when calls > 0, got calls={calls}")
        if z is not None and (z.ndim != 1 or mu.shape != z.shape):
            raise ValueError(f"Mimic state: mu and z must be vectors of one length, "
                             f"got {tuple(mu.shape)} and {tuple(z.shape)}")
        valid_row = not isinstance(choice, bool) and isinstance(choice, int) and choice >= 0
        if (choice is None) != (calls < self.warmup) or not (choice is None or valid_row):
            raise ValueError(f"Mimic state: choice must be a row index once the warm-up of {self.warmup} calls is "
                             f"over, None before; got choice={choice!r} after {calls} calls")
        self._calls, self._choice, self._mu, self._z = calls, choice, mu, z

    def _learn_direction(self, h: torch.Tensor) -> None:
        """One step of the online power iteration above, on this call's honest updates ``h`` (float64)."""
        t = self._calls
        if t == 0:
            self._mu = h.mean(dim=0)
            start = torch.Generator().manual_seed(self.seed)  # drawn on the CPU: the same start on every device
            z = torch.randn(h.shape[1], generator=start, dtype=torch.float64).to(h.device)
        else:
            self._mu = (t * self._mu + h.mean(dim=0)) / (t + 1)
            z = self._z
        centered = h - self._mu
        v = (centered @ z) @ centered
        norm = v.norm()
        # All honest updates on the running mean carry no direction: keep the previous one.
        step = v / norm if norm > 0 else z / z.norm().clamp_min(1e-300)
        z = step if t == 0 else (t * z + step) / (t + 1)
        self._z = z / z.norm().clamp_min(1e-300)

    def forge(self, honest, num_byzantine, generator):
        if self.target is not None:
            if not self.target < honest.shape[0]:
                raise ValueError(f"target row {self.target} out of range for {honest.shape[0]} honest updates")
            return _repeat(honest[self.target], num_byzantine)
        h = honest.to(torch.float64)
        if self._z is not None:
            if self._z.numel() != h.shape[1]:
                raise ValueError(
                    f"Mimic holds a choice made on updates of length {self._z.numel()}, got {h.shape[1]}; "
                    "call reset() before a new run"
                )
            self._mu, self._z = self._mu.to(h.device), self._z.to(h.device)
        if self._calls < self.warmup:
            self._learn_direction(h)
            pick = int(torch.argmax(h @ self._z))
            if self._calls == self.warmup - 1:
                self._choice = pick
        elif self._choice < h.shape[0]:
            pick = self._choice
        else:  # fewer honest participants this round than the fixed row index
            pick = int(torch.argmax(h @ self._z))
        self._calls += 1
        return _repeat(honest[pick], num_byzantine)
