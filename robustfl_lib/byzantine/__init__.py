"""Byzantine clients: attacks on the updates the server receives, and label flipping.

An update attack is an object configured once and called by an *omniscient*
attacker who sees this round's honest updates (deltas: local minus global
weights):

    ``attack(honest, num_byzantine, generator=None, weights=None, byzantine_weights=None) -> (num_byzantine, d)``

``honest`` is ``(n_h, d)``; the output has the same dtype and device. Attacks
that are random draw from ``generator`` (a ``torch.Generator``), so the same
seed gives the same updates. ``weights`` / ``byzantine_weights`` are the
aggregation weights the server gives the honest rows (in ``honest``'s row
order) and the Byzantine ones: :func:`~robustfl_lib.run_federated` passes the
clients' sample counts, by which :class:`~robustfl_lib.Mean` (FedAvg) weights.
Only the attacks that reason about what the server averages use them
(:class:`ModelReplacement`, :class:`AdaptiveScaling`); the others are defined,
as in their papers, on the plain (unweighted) mean and spread of the honest
updates. :class:`Mimic` keeps state across rounds (``reset``, ``get_state``,
``set_state``). Label flipping is different: it is data poisoning,
applied to a Byzantine client's training labels before honest local training
(:class:`LabelFlip`). :func:`get_attack` builds any of them by its config name.
Taught in chapter ``03_byzantine_threats``; each defence's chapter (``04`` to
``08``) runs every attack against it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import torch

from ..robust_stats import check_updates, compute_dtype

__all__ = [
    "ByzantineAttack",
    "SignFlip",
    "Scaling",
    "GaussianNoise",
    "ModelReplacement",
    "ALIE",
    "IPM",
    "Mimic",
    "NonFinite",
    "AdaptiveScaling",
    "DataPoisoning",
    "LabelFlip",
    "ATTACKS",
    "get_attack",
    "alie_z",
]


class ByzantineAttack:
    """Base class of the update attacks: checks the input, then calls :meth:`forge`.

    ``weights`` (``(n_h,)``) and ``byzantine_weights`` (``(num_byzantine,)``) come
    together or not at all (``None``: every row weighs the same); they must be
    finite and non-negative, the honest ones not all zero. A subclass that sets
    ``uses_weights = True`` receives them in :meth:`forge` as keyword arguments
    (as tensors of the compute dtype); the others never see them.

    A stateful attack overrides :meth:`reset` (forget everything: the FL engine
    calls it when a run starts), :meth:`get_state` (a dict of plain values and
    tensors, for checkpoints) and :meth:`set_state`. The base class is stateless:
    ``reset`` does nothing, ``get_state`` returns ``{}``, ``set_state`` accepts ``{}``.
    """

    uses_weights = False

    def __call__(
        self,
        honest: torch.Tensor,
        num_byzantine: int,
        generator: torch.Generator | None = None,
        weights: torch.Tensor | None = None,
        byzantine_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_updates(honest, "honest updates")
        if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 0:
            raise ValueError(f"num_byzantine must be an integer >= 0, got {num_byzantine!r}")
        weights, byzantine_weights = _check_weights(honest, num_byzantine, weights, byzantine_weights)
        if num_byzantine == 0:
            return honest.new_empty((0, honest.shape[1]))
        if self.uses_weights:
            out = self.forge(honest, num_byzantine, generator, weights=weights, byzantine_weights=byzantine_weights)
        else:
            out = self.forge(honest, num_byzantine, generator)
        return out.to(dtype=honest.dtype, device=honest.device)

    def forge(self, honest: torch.Tensor, num_byzantine: int, generator: torch.Generator | None) -> torch.Tensor:
        """The ``(num_byzantine, d)`` malicious updates."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what earlier rounds taught the attack (nothing, for a stateless one)."""

    def get_state(self) -> dict:
        """The attack's state across rounds, for checkpoints (``{}`` for a stateless one)."""
        return {}

    def set_state(self, state: dict) -> None:
        """Restore :meth:`get_state`'s result."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless; got state with keys {sorted(state)}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _check_weights(
    honest: torch.Tensor, num_byzantine: int, weights, byzantine_weights
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate the server's weights of the honest and Byzantine rows; as compute-dtype tensors."""
    if weights is None and byzantine_weights is None:
        return None, None
    if weights is None or byzantine_weights is None:
        raise ValueError("weights (of the honest rows) and byzantine_weights (of the Byzantine rows) go together")
    ct = compute_dtype(honest.dtype)
    out = []
    pairs = (("weights", "honest", weights, honest.shape[0]),
             ("byzantine_weights", "Byzantine", byzantine_weights, num_byzantine))
    for name, kind, w, n in pairs:
        w = torch.as_tensor(w, device=honest.device).to(ct)
        if w.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), one per {kind} row, got {tuple(w.shape)}")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"{name} must be finite and non-negative")
        out.append(w)
    if out[0].sum() <= 0:
        raise ValueError("weights of the honest rows must not all be zero")
    return out[0], out[1]


def _mean(honest: torch.Tensor) -> torch.Tensor:
    return honest.to(compute_dtype(honest.dtype)).mean(dim=0)


def _weighted_mean(h: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``sum_i w_i h_i / sum_i w_i`` (the plain mean for ``None``), as FedAvg computes it."""
    return h.mean(dim=0) if weights is None else (weights / weights.sum()) @ h


def _repeat(row: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    return row[None].expand(num_byzantine, -1).clone()


class SignFlip(ByzantineAttack):
    r"""Every Byzantine client sends :math:`-\lambda\,\bar u`, the (unweighted) mean of
    the honest updates reversed: ByzFL's ``SignFlipping``, which credits Allen-Zhu et
    al. ("Byzantine-resilient non-convex stochastic gradient descent", ICLR 2021).
    ``scale`` = :math:`\lambda` (default 1). Against the plain mean, ``f`` such clients
    shrink the step by :math:`(1+\lambda) f/n`.

    It is *not* the "bit flipping" of Karimireddy, He & Jaggi 2021, where each
    Byzantine worker sends its own honest gradient negated, :math:`-u_j`: in this
    engine Byzantine clients do not train, so they have no update of their own
    to negate; all of them send the same omniscient :math:`-\bar u`, which on
    IID data is close to the average of what bit flippers would send, with none
    of their spread. Chapter ``03_byzantine_threats``."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def forge(self, honest, num_byzantine, generator):
        return _repeat(-self.scale * _mean(honest), num_byzantine)


class Scaling(ByzantineAttack):
    r"""Every Byzantine client sends :math:`\lambda\,\bar u`, the (unweighted) honest mean scaled by a
    large factor (default 10; "boosting", Bhagoji et al. 2019): a plausible
    direction with an implausible length, which makes the mean overshoot.
    Chapter ``03_byzantine_threats``."""

    def __init__(self, factor: float = 10.0):
        self.factor = factor

    def forge(self, honest, num_byzantine, generator):
        return _repeat(self.factor * _mean(honest), num_byzantine)


class GaussianNoise(ByzantineAttack):
    r"""Every Byzantine client sends :math:`\mathcal N(0, \sigma^2 I)` noise (``std`` =
    :math:`\sigma`, default 1), independent across clients; the random-update
    attack of Blanchard et al. 2017. Chapter ``03_byzantine_threats``."""

    def __init__(self, std: float = 1.0):
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.std = std

    def forge(self, honest, num_byzantine, generator):
        gen_device = generator.device if generator is not None else honest.device
        noise = torch.randn(
            num_byzantine, honest.shape[1], generator=generator, device=gen_device, dtype=compute_dtype(honest.dtype)
        )
        return self.std * noise


class ModelReplacement(ByzantineAttack):
    r"""Model replacement (Bagdasaryan et al. 2020): the attacker makes what the
    server averages, the weighted mean of all ``n = n_h + b`` updates, equal its
    target :math:`t`. With weights :math:`w_i` of the honest rows and
    :math:`w_j` of the Byzantine ones (``weights``, ``byzantine_weights``: the
    sample counts by which FedAvg weights; equal when not given), every
    Byzantine client sends

    .. math:: u_{\mathrm{byz}} = \frac{W\,t - \sum_{i \le n_h} w_i u_i}{W_{\mathrm{byz}}},
       \qquad W_{\mathrm{byz}} = \sum_j w_j,\quad W = \sum_i w_i + W_{\mathrm{byz}},

    so that :math:`(\sum_i w_i u_i + W_{\mathrm{byz}} u_{\mathrm{byz}}) / W = t`;
    with equal weights, :math:`u_{\mathrm{byz}} = (n\,t - \sum_i u_i)/b`.
    Bagdasaryan et al. scale :math:`t` by :math:`\gamma = n/\eta` (the server's
    weighting and learning rate) and assume the honest updates cancel; the
    omniscient attacker here subtracts them exactly, so the server's mean *is*
    :math:`t`. ``target``: a ``(d,)`` tensor or a function of the honest updates;
    ``None`` (default) reverses and amplifies the honest mean, :math:`t =
    -\lambda \bar u_w` with :math:`\bar u_w` the weighted honest mean and
    ``target_scale`` = :math:`\lambda` (default 5), which undoes training.
    Byzantine weights summing to zero raise ``ValueError`` (they cannot move the
    mean). Chapter ``03_byzantine_threats``.
    """

    uses_weights = True

    def __init__(
        self,
        target: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
        target_scale: float = 5.0,
    ):
        self.target = target
        self.target_scale = target_scale

    def forge(self, honest, num_byzantine, generator, weights=None, byzantine_weights=None):
        ct = compute_dtype(honest.dtype)
        h = honest.to(ct)
        if weights is None:  # kept apart so that equal weights give the same numbers as before
            honest_sum, honest_mean = h.sum(dim=0), h.mean(dim=0)
            total, byz_total = h.shape[0] + num_byzantine, num_byzantine
        else:
            byz_total = byzantine_weights.sum()
            if byz_total <= 0:
                raise ValueError("byzantine_weights sum to 0: clients the server ignores cannot replace the model")
            honest_sum = weights @ h
            honest_mean, total = honest_sum / weights.sum(), weights.sum() + byz_total
        if self.target is None:
            target = -self.target_scale * honest_mean
        elif callable(self.target):
            target = self.target(honest)
        else:
            target = self.target
        target = torch.as_tensor(target, device=honest.device).to(ct)
        if target.shape != (honest.shape[1],):
            raise ValueError(f"target must have shape ({honest.shape[1]},), got {tuple(target.shape)}")
        return _repeat((total * target - honest_sum) / byz_total, num_byzantine)


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


class NonFinite(ByzantineAttack):
    """Every Byzantine client sends an update full of ``value`` (``"nan"``,
    ``"inf"`` or ``"-inf"``): a crashed or malicious client. The mean becomes
    non-finite; robust rules must drop it. Chapter ``03_byzantine_threats``."""

    def __init__(self, value: str = "nan"):
        if value not in ("nan", "inf", "-inf"):
            raise ValueError(f"value must be 'nan', 'inf' or '-inf', got {value!r}")
        self.value = value

    def forge(self, honest, num_byzantine, generator):
        return torch.full((num_byzantine, honest.shape[1]), float(self.value), dtype=honest.dtype, device=honest.device)


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


class DataPoisoning:
    """Base class of attacks on a Byzantine client's training data (not on its update):
    ``attack.poison(x, y, num_classes) -> (x, y)``, after which the client trains
    honestly on the poisoned data."""

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} poisons a client's training data; call .poison(x, y, num_classes), "
            "or pass it to FLConfig(byzantine_attack=...)"
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class LabelFlip(DataPoisoning):
    r"""Label flipping (Tolpegin et al. 2020; Fang et al. 2020): a Byzantine client
    trains on labels :math:`y \mapsto C - 1 - y` (``mapping="reverse"``, default)
    or :math:`y \mapsto (y + 1) \bmod C` (``"shift"``), then sends its honest
    update of that poisoned model. Weaker than update attacks (the update still
    looks like training), and the only attack here that needs no knowledge of
    the other clients. Chapter ``03_byzantine_threats``."""

    def __init__(self, mapping: str = "reverse"):
        if mapping not in ("reverse", "shift"):
            raise ValueError(f"mapping must be 'reverse' or 'shift', got {mapping!r}")
        self.mapping = mapping

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
        flipped = num_classes - 1 - y if self.mapping == "reverse" else (y + 1) % num_classes
        return x, flipped


#: Config names accepted by :func:`get_attack` (and ``FLConfig.byzantine_attack``).
ATTACKS: dict[str, type] = {
    "sign_flip": SignFlip,
    "scaling": Scaling,
    "gaussian": GaussianNoise,
    "model_replacement": ModelReplacement,
    "alie": ALIE,
    "ipm": IPM,
    "mimic": Mimic,
    "nonfinite": NonFinite,
    "label_flip": LabelFlip,
}


def get_attack(spec: str | ByzantineAttack | DataPoisoning, **kwargs) -> ByzantineAttack | DataPoisoning:
    """An attack from its config name (``"alie"``, ...; ``kwargs`` go to its
    constructor) or the object itself (returned unchanged)."""
    if isinstance(spec, (ByzantineAttack, DataPoisoning)):
        if kwargs:
            raise ValueError("keyword arguments are only used with an attack name, not an attack object")
        return spec
    if not isinstance(spec, str) or spec not in ATTACKS:
        raise ValueError(f"unknown attack {spec!r}; choose one of {sorted(ATTACKS)}")
    return ATTACKS[spec](**kwargs)
