r"""Backdoors: a trigger planted through poisoned updates, and the defenses that look for it.

* :class:`PixelTrigger` stamps a small square of bright pixels in a corner; a
  backdoored model maps any stamped input to the attacker's ``target`` class while
  staying accurate on clean inputs.
* :func:`poison` is the backdoor client's data poisoning; the client then *boosts*
  its update by a factor :math:`\gamma` (model replacement, Bagdasaryan et al. 2020)
  so that it survives averaging with the honest updates.
* :func:`attack_success_rate` is the fraction of triggered test inputs *of other
  classes* classified as the target; :func:`detection_scores` gives a detector's
  precision and recall against the known malicious clients.
* Detectors return one boolean per update, ``True`` = flagged malicious:
  :class:`NormZScore` (robust z-score of update norms), :class:`CosineSimilarity`
  (FoolsGold-style, Fung et al. 2020: sybils that push the same direction are too
  similar), :class:`Clustering` (FLAME-style, Nguyen et al. 2022: HDBSCAN on cosine
  distances, keep the majority cluster). :class:`Detect` turns a detector into an
  aggregator (aggregate only the unflagged updates); :class:`NormClipNoise` is the
  norm-clipping + Gaussian-noise defense of Sun et al. (2019).

Taught in chapter ``11_exercise_backdoor_detection``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..aggregators import Aggregator, Mean, RobustAggregator
from ..byzantine import DataPoisoning
from ..robust_stats import compute_dtype
from ..runtime import make_generator

__all__ = [
    "PixelTrigger",
    "poison",
    "BackdoorPoisoning",
    "ConstrainAndScale",
    "stealthy_norm",
    "attack_success_rate",
    "detection_scores",
    "detection_over_rounds",
    "Detector",
    "NormZScore",
    "CosineSimilarity",
    "Clustering",
    "Detect",
    "NormClipNoise",
]


class PixelTrigger:
    """A ``size`` x ``size`` square of value ``value`` in the bottom-right corner (inset by ``margin``).

    ``trigger(x)`` stamps a batch ``(N, C, H, W)`` (a copy; ``x`` is unchanged).
    """

    def __init__(self, target: int = 0, size: int = 2, value: float = 1.0, margin: int = 0):
        if size < 1 or margin < 0:
            raise ValueError(f"need size >= 1 and margin >= 0, got {size}, {margin}")
        self.target, self.size, self.value, self.margin = int(target), int(size), float(value), int(margin)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"PixelTrigger expects (N, C, H, W) images, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.size + self.margin > min(h, w):
            raise ValueError(f"a {self.size}-pixel trigger with margin {self.margin} does not fit {h}x{w} images")
        out = x.clone()
        r0, c0 = h - self.margin - self.size, w - self.margin - self.size
        out[..., r0 : r0 + self.size, c0 : c0 + self.size] = self.value
        return out

    def __repr__(self) -> str:
        return f"PixelTrigger(target={self.target}, size={self.size}, value={self.value}, margin={self.margin})"


def poison(
    x: torch.Tensor, y: torch.Tensor, trigger: PixelTrigger, fraction: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A backdoor client's training set: ``fraction`` of its samples stamped and relabelled ``trigger.target``.

    The rest stay clean, so the poisoned model keeps its main-task accuracy,
    which is what makes a backdoor hard to notice.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = int(round(fraction * len(x)))
    idx = torch.randperm(len(x), generator=generator)[:k].to(x.device)
    x, y = x.clone(), y.clone()
    x[idx] = trigger(x[idx])
    y[idx] = trigger.target
    return x, y


class BackdoorPoisoning(DataPoisoning):
    r"""Backdoor clients for the FL loop: ``FLConfig(byzantine_attack=BackdoorPoisoning(trigger, fraction, boost))``.

    Each Byzantine client trains honestly on its data with ``fraction`` of it
    stamped by ``trigger`` and relabelled ``trigger.target`` (:func:`poison`),
    then the FL loop multiplies its update :math:`u` by ``boost`` :math:`\gamma`
    before sending it: model replacement (Bagdasaryan et al. 2020). With
    :math:`b` attackers among :math:`n` clients averaged by the mean,
    :math:`\gamma \approx n / b` makes the attackers' share of the aggregate as
    large as the whole honest step, so the backdoor is planted in few rounds.
    ``boost=1`` is plain data poisoning. The samples to poison are drawn from a
    generator seeded by ``seed``, so the same client data is poisoned the same
    way in every round and every run. Chapter ``11_exercise_backdoor_detection``.
    """

    def __init__(self, trigger: PixelTrigger, fraction: float = 0.5, boost: float = 1.0, seed: int = 0):
        if not isinstance(trigger, PixelTrigger):
            raise ValueError(f"trigger must be a PixelTrigger, got {type(trigger).__name__}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if not (math.isfinite(boost) and boost > 0):
            raise ValueError(f"boost must be a finite number > 0, got {boost}")
        self.trigger, self.fraction, self.boost, self.seed = trigger, float(fraction), float(boost), int(seed)

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= self.trigger.target < num_classes:
            raise ValueError(f"trigger target {self.trigger.target} is not a class of a {num_classes}-class task")
        return poison(x, y, self.trigger, self.fraction, make_generator(self.seed))


@torch.no_grad()
def attack_success_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: PixelTrigger) -> float:
    """Fraction of stamped test inputs whose true class is *not* the target that the model
    classifies as the target."""
    keep = y != trigger.target
    if not bool(keep.any()):
        raise ValueError("no test input outside the target class")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds = model(trigger(x[keep]).to(device)).argmax(dim=1)
    model.train(was_training)
    return float((preds == trigger.target).float().mean())


def detection_scores(flagged, malicious) -> dict[str, float]:
    """Precision and recall of a detector's flags against the truly malicious rows.

    Precision is 1.0 when nothing is flagged (no false alarm was raised) and
    recall is 1.0 when nothing was malicious.
    """
    f, m = np.asarray(flagged, dtype=bool), np.asarray(malicious, dtype=bool)
    if f.shape != m.shape:
        raise ValueError(f"flagged {f.shape} and malicious {m.shape} must have the same shape")
    tp = int((f & m).sum())
    return {
        "precision": tp / int(f.sum()) if f.any() else 1.0,
        "recall": tp / int(m.sum()) if m.any() else 1.0,
    }


def detection_over_rounds(history: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-round precision and recall of what the server *rejected*, from an FL history.

    A participant counts as flagged in a round when the aggregator left it out
    of ``aggregation["selected"]`` (a :class:`Detect` aggregator selects exactly
    the unflagged updates; Krum-like rules select their winners), malicious when
    it is in ``"byzantine"``; the scores are :func:`detection_scores`'. Returns
    arrays ``"round"``, ``"precision"``, ``"recall"`` and ``"flagged"`` (how many
    were flagged); rounds that were skipped for lack of a quorum are NaN. Chapter
    ``11_exercise_backdoor_detection``.
    """
    if not history:
        raise ValueError("the history is empty")
    rounds, precision, recall, flagged = [], [], [], []
    for rec in history:
        agg = rec.get("aggregation", {})
        rounds.append(rec["round"])
        if "skipped" in agg:
            precision.append(np.nan), recall.append(np.nan), flagged.append(np.nan)
            continue
        if "selected" not in agg:
            raise ValueError(f"round {rec['round']} records no selection: the aggregator flags no one "
                             "(use Detect(detector) or a selection rule such as Krum)")
        participants = np.asarray(rec["participants"])
        flags = ~np.isin(participants, agg["selected"])
        scores = detection_scores(flags, np.isin(participants, rec["byzantine"]))
        precision.append(scores["precision"]), recall.append(scores["recall"]), flagged.append(int(flags.sum()))
    return {"round": np.asarray(rounds), "precision": np.asarray(precision, dtype=float),
            "recall": np.asarray(recall, dtype=float), "flagged": np.asarray(flagged, dtype=float)}


class Detector:
    """``detector(updates (n, d)) -> flagged (n,) bool``, ``True`` = looks malicious."""

    def __call__(self, updates: torch.Tensor) -> torch.Tensor:
        if updates.ndim != 2 or updates.shape[0] < 2:
            raise ValueError(f"a detector needs a 2-D tensor of at least 2 updates, got shape {tuple(updates.shape)}")
        bad = ~torch.isfinite(updates).all(dim=1)
        flagged = torch.zeros(updates.shape[0], dtype=torch.bool, device=updates.device)
        flagged[bad] = True  # a non-finite update is malicious by definition
        good = (~bad).nonzero().flatten()
        if len(good) >= 2:
            flagged[good] = self.flag(updates[good].to(compute_dtype(updates.dtype)))
        return flagged

    def flag(self, updates: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class NormZScore(Detector):
    r"""Flag updates whose norm is an outlier: :math:`z_i = (\|u_i\| - \mathrm{med}) / (1.4826\,\mathrm{MAD}) > t`.

    Median and MAD instead of mean and standard deviation, so that the boosted
    update cannot inflate the spread it is measured against. Only unusually *large*
    norms are flagged: a model-replacement update is boosted, never shrunk.
    """

    def __init__(self, threshold: float = 3.0):
        self.threshold = float(threshold)

    def flag(self, updates):
        norms = updates.norm(dim=1)
        med = norms.median()
        mad = (norms - med).abs().median().clamp_min(1e-12 * med.abs().clamp_min(1e-30))
        return (norms - med) / (1.4826 * mad) > self.threshold


class CosineSimilarity(Detector):
    r"""FoolsGold-style (Fung et al. 2020): flag clients whose update is too similar to another's.

    Honest clients with different data disagree; sybils that share one goal (the
    same trigger) push the same direction. Client :math:`i` is flagged when
    :math:`\max_{j \ne i} \cos(u_i, u_j) > t`.
    """

    def __init__(self, threshold: float = 0.9):
        self.threshold = float(threshold)

    def flag(self, updates):
        unit = updates / updates.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cs = unit @ unit.T
        cs.fill_diagonal_(-1.0)
        return cs.max(dim=1).values > self.threshold


class Clustering(Detector):
    r"""FLAME-style (Nguyen et al. 2022): HDBSCAN on pairwise cosine distances with
    ``min_cluster_size = n // 2 + 1``; updates outside the majority cluster are flagged.

    HDBSCAN may also call some honest updates noise: like FLAME, this trades a few
    honest updates for safety. If no cluster holds a majority (HDBSCAN calls
    everything noise), nothing is flagged.
    """

    def flag(self, updates):
        from sklearn.cluster import HDBSCAN

        n = updates.shape[0]
        unit = updates / updates.norm(dim=1, keepdim=True).clamp_min(1e-30)
        dist = (1.0 - unit @ unit.T).clamp_min(0.0).cpu().double().numpy()
        # A float32 matmul is not exactly symmetric, and HDBSCAN refuses an asymmetric matrix.
        dist = 0.5 * (dist + dist.T)
        np.fill_diagonal(dist, 0.0)
        labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed", allow_single_cluster=True,
                         copy=True).fit_predict(dist)
        if (labels < 0).all():
            return torch.zeros(n, dtype=torch.bool, device=updates.device)
        majority = np.bincount(labels[labels >= 0]).argmax()
        return torch.from_numpy(labels != majority).to(updates.device)


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


class Detect(RobustAggregator):
    """Aggregate with ``then`` (default :class:`Mean`) only the updates ``detector`` does not flag.

    ``last_info["flagged"]`` and ``["selected"]`` record the decision per round.
    If every update were flagged, all are kept (the detector gives no usable signal).
    """

    def __init__(self, detector: Detector, then: Aggregator | None = None):
        self.detector, self.then, self.f = detector, then if then is not None else Mean(), 0

    def aggregate_finite(self, updates, weights, dropped):
        flagged = self.detector(updates)
        keep = (~flagged).nonzero().flatten()
        if len(keep) == 0:
            keep = torch.arange(updates.shape[0], device=updates.device)
        out = self.then(updates[keep], None if weights is None else weights[keep])
        info: dict[str, Any] = {"selected": keep, "flagged": flagged.cpu().tolist()}
        return out, info


class NormClipNoise(RobustAggregator):
    r"""Sun et al. (2019): clip each update to norm :math:`M`, average, add :math:`\mathcal N(0, \sigma^2 I)`.

    .. math:: \bar u = \frac1n \sum_i u_i \min\Big(1, \frac{M}{\|u_i\|}\Big) + \mathcal N(0, \sigma^2 I)

    Clipping caps what a boosted update can contribute; the noise blurs the
    small, precise change a backdoor needs. ``threshold=None`` clips to the
    median norm of the round (FLAME's adaptive choice).
    """

    def __init__(self, threshold: float | None = None, sigma: float = 0.0, generator: torch.Generator | None = None):
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold must be > 0 or None, got {threshold}")
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.threshold, self.sigma, self.generator, self.f = threshold, float(sigma), generator, 0

    def aggregate_finite(self, updates, weights, dropped):
        x = updates.to(compute_dtype(updates.dtype))
        norms = x.norm(dim=1)
        m = norms.median() if self.threshold is None else torch.tensor(self.threshold, dtype=x.dtype)
        scale = torch.clamp(m / norms.clamp_min(1e-30), max=1.0)
        out = (x * scale.unsqueeze(1)).mean(dim=0)
        if self.sigma > 0:
            gen_device = self.generator.device if self.generator is not None else out.device
            out = out + self.sigma * torch.randn(out.shape, generator=self.generator, dtype=out.dtype,
                                                 device=gen_device).to(out.device)
        return out, {"weights": scale / len(scale), "clip_norm": float(m)}
