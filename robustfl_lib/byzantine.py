"""Byzantine clients: attacks on the updates the server receives, and label flipping.

An update attack is an object configured once and called by an *omniscient*
attacker who sees this round's honest updates (deltas: local minus global
weights):

    ``attack(honest, num_byzantine, generator=None) -> (num_byzantine, d)``

``honest`` is ``(n_h, d)``; the output has the same dtype and device. Attacks
that are random draw from ``generator`` (a ``torch.Generator``), so the same
seed gives the same updates. Label flipping is different: it is data poisoning,
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

from .robust_stats import check_updates, compute_dtype

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
    """Base class of the update attacks: checks the input, then calls :meth:`forge`."""

    def __call__(
        self, honest: torch.Tensor, num_byzantine: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        check_updates(honest, "honest updates")
        if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 0:
            raise ValueError(f"num_byzantine must be an integer >= 0, got {num_byzantine!r}")
        if num_byzantine == 0:
            return honest.new_empty((0, honest.shape[1]))
        out = self.forge(honest, num_byzantine, generator)
        return out.to(dtype=honest.dtype, device=honest.device)

    def forge(self, honest: torch.Tensor, num_byzantine: int, generator: torch.Generator | None) -> torch.Tensor:
        """The ``(num_byzantine, d)`` malicious updates."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _mean(honest: torch.Tensor) -> torch.Tensor:
    return honest.to(compute_dtype(honest.dtype)).mean(dim=0)


def _repeat(row: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    return row[None].expand(num_byzantine, -1).clone()


class SignFlip(ByzantineAttack):
    r"""Every Byzantine client sends :math:`-\lambda\,\bar u`, the honest mean reversed
    ("bit flipping" in Karimireddy, He & Jaggi 2021).
    ``scale`` = :math:`\lambda` (default 1). Against the mean, ``f`` such clients
    shrink the step by :math:`(1+\lambda) f/n`. Chapter ``03_byzantine_threats``."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def forge(self, honest, num_byzantine, generator):
        return _repeat(-self.scale * _mean(honest), num_byzantine)


class Scaling(ByzantineAttack):
    r"""Every Byzantine client sends :math:`\lambda\,\bar u`, the honest mean scaled by a
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
    r"""Model replacement (Bagdasaryan et al. 2020): the attacker makes the mean of
    all ``n = n_h + b`` updates equal its target :math:`t` by sending

    .. math:: u_{\mathrm{byz}} = \frac{n\,t - \sum_{i \le n_h} u_i}{b}.

    Bagdasaryan et al. scale :math:`t` by :math:`n/\eta` and assume the honest
    updates cancel; the omniscient attacker here subtracts them exactly, so the
    (unweighted) mean *is* :math:`t`. ``target``: a ``(d,)`` tensor or a
    function of the honest updates; ``None`` (default) reverses and amplifies
    the honest mean, :math:`t = -\lambda \bar u` with ``target_scale`` =
    :math:`\lambda` (default 5), which undoes training. Chapter ``03_byzantine_threats``.
    """

    def __init__(
        self,
        target: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
        target_scale: float = 5.0,
    ):
        self.target = target
        self.target_scale = target_scale

    def forge(self, honest, num_byzantine, generator):
        ct = compute_dtype(honest.dtype)
        if self.target is None:
            target = -self.target_scale * _mean(honest)
        elif callable(self.target):
            target = self.target(honest)
        else:
            target = self.target
        target = torch.as_tensor(target, device=honest.device).to(ct)
        if target.shape != (honest.shape[1],):
            raise ValueError(f"target must have shape ({honest.shape[1]},), got {tuple(target.shape)}")
        n = honest.shape[0] + num_byzantine
        return _repeat((n * target - honest.to(ct).sum(dim=0)) / num_byzantine, num_byzantine)


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
    the honest updates. The shift stays within the honest spread in every
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
    every Byzantine client sends :math:`-\epsilon \bar u`. A small
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
    r"""Mimic (Karimireddy, He & Jaggi 2022): every Byzantine client copies one honest
    update, over-representing that client. Harmless to a mean on IID data; under
    non-IID data it tilts the model towards one client's classes, and robust
    rules that look for a majority cluster follow the copies. ``target=None``
    copies the honest update that lies farthest along the honest updates' first
    principal direction (the most extreme honest client); an int copies that row.
    Chapter ``03_byzantine_threats``."""

    def __init__(self, target: int | None = None):
        self.target = target

    def forge(self, honest, num_byzantine, generator):
        if self.target is not None:
            if not 0 <= self.target < honest.shape[0]:
                raise ValueError(f"target row {self.target} out of range for {honest.shape[0]} honest updates")
            return _repeat(honest[self.target], num_byzantine)
        h = honest.to(torch.float64)
        centered = h - h.mean(dim=0)
        # The top eigenvector of the (n_h, n_h) Gram matrix gives each client's coordinate
        # along the first principal direction, without a (d, d) covariance.
        _, vecs = torch.linalg.eigh(centered @ centered.T)
        pick = vecs[:, -1].abs().argmax()
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
    ``last_scale`` holds the chosen :math:`\lambda`. Chapter ``12_exercise_adaptive_attacks``.
    """

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
            from .aggregators import get_aggregator  # late import: aggregators is the defender's module

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

    def perturbation(self, honest: torch.Tensor) -> torch.Tensor:
        r"""The unit malicious direction :math:`p / \|p\|` (zero if :math:`p = 0`)."""
        h = honest.to(compute_dtype(honest.dtype))
        mu = h.mean(dim=0)
        if self.direction == "sign":
            p = -torch.sign(mu)
        elif self.direction == "mean":
            p = -mu
        else:
            p = -h.std(dim=0, correction=1 if h.shape[0] > 1 else 0)
        return p / p.norm().clamp_min(1e-30)

    def damages(self, honest: torch.Tensor, num_byzantine: int, scales: Sequence[float] | None = None) -> torch.Tensor:
        r"""The objective :math:`\|A(\dots) - \bar u\|` at each of ``scales`` (default: the coarse grid)."""
        check_updates(honest, "honest updates")
        if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 1:
            raise ValueError(f"num_byzantine must be an integer >= 1, got {num_byzantine!r}")
        h = honest.to(compute_dtype(honest.dtype))
        mu = h.mean(dim=0)
        step = h.norm(dim=1).median() * self.perturbation(h)
        scales = self.scales if scales is None else scales
        out = torch.empty(len(scales), dtype=mu.dtype)
        for i, lam in enumerate(scales):  # one aggregation per candidate: the rule is a black box here
            candidate = torch.cat([h, _repeat(mu + float(lam) * step, num_byzantine)]).to(honest.dtype)
            out[i] = (copy.deepcopy(self.aggregator)(candidate).to(mu.dtype) - mu).norm()
        return out

    def search(self, honest: torch.Tensor, num_byzantine: int) -> float:
        r""":math:`\lambda^\star`: the best of ``scales``, then ``refine`` rounds that try it times
        :math:`2^{\pm 1/2}`, :math:`2^{\pm 1/4}`, ... and keep the best (ties go to the first tried)."""
        damage = self.damages(honest, num_byzantine)
        i = int(torch.argmax(damage))
        best, best_damage = self.scales[i], float(damage[i])
        for k in range(1, self.refine + 1):
            if best == 0.0:
                break
            near = [best * 2.0 ** (-(0.5**k)), best * 2.0 ** (0.5**k)]
            d = self.damages(honest, num_byzantine, near)
            j = int(torch.argmax(d))
            if float(d[j]) > best_damage:
                best, best_damage = near[j], float(d[j])
        return best

    def forge(self, honest, num_byzantine, generator):
        h = honest.to(compute_dtype(honest.dtype))
        best = self.search(honest, num_byzantine)
        self.last_scale = best
        return _repeat(h.mean(dim=0) + best * h.norm(dim=1).median() * self.perturbation(h), num_byzantine)

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
