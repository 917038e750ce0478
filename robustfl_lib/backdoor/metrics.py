"""What a backdoor achieved and what a defense caught: :func:`attack_success_rate`,
:func:`detection_scores`, :func:`detection_over_rounds`, and how long the backdoor outlives its
planters (:func:`backdoor_durability`). Chapter ``11_exercise_backdoor_detection``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .triggers import PixelTrigger

__all__ = ["attack_success_rate", "detection_scores", "detection_over_rounds", "backdoor_durability"]


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


def backdoor_durability(
    asr: Sequence[float | None] | Sequence[Mapping[str, Any]],
    stop_round: int,
    threshold: float,
    rounds: Sequence[int] | None = None,
    key: str = "attack_success_rate",
) -> float:
    r"""How many rounds a backdoor survives after its planters stop: durability as Zhang et al. 2022
    ("Neurotoxin: Durable Backdoors in Federated Learning", ICML) report it, the rounds from the
    attackers' last until attack success falls below a threshold.

    With :math:`a_r` the attack success rate after round :math:`r` and :math:`T` the round after
    which the attackers stop (``stop_round``: the last round in which they attacked),

    .. math:: \mathrm{durability} = \min\{\, r - T : r > T,\ a_r < \tau \,\},

    the number of rounds after :math:`T` at which attack success is first below the threshold
    :math:`\tau` (``threshold``): 1 when it is already below one round after the attackers' last,
    ``inf`` when it never falls below :math:`\tau` within the run (the backdoor outlived the run;
    a lower bound on durability is then the run's last round minus :math:`T`).

    ``asr`` is either the per-round attack success rates (numbers in :math:`[0, 1]`; ``None`` or
    NaN for a round that was not measured, which can never count as the fall) or an FL history,
    a list of records holding ``"round"`` and ``key`` (e.g. filled in by a ``callback`` that
    measures :func:`attack_success_rate`). ``rounds`` gives the round of each entry of a plain
    sequence (default ``1, 2, ...``); they must increase. ``ValueError`` for rates outside
    :math:`[0, 1]`, a threshold outside :math:`(0, 1]`, or no measured round after ``stop_round``.
    Chapter ``11_exercise_backdoor_detection``.
    """
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if isinstance(stop_round, bool) or not isinstance(stop_round, (int, np.integer)):
        raise ValueError(f"stop_round must be an integer round number, got {stop_round!r}")
    entries = list(asr)
    if not entries:
        raise ValueError("the attack success sequence is empty")
    if isinstance(entries[0], Mapping):
        if rounds is not None:
            raise ValueError("rounds is taken from the history's records; do not pass it too")
        missing = [i for i, rec in enumerate(entries) if "round" not in rec or key not in rec]
        if missing:
            raise ValueError(f"history records {missing[:5]} lack 'round' or {key!r}")
        rounds = [rec["round"] for rec in entries]
        entries = [rec[key] for rec in entries]
    elif rounds is None:
        rounds = list(range(1, len(entries) + 1))
    r = np.asarray(rounds, dtype=float)
    if r.shape != (len(entries),):
        raise ValueError(f"rounds must give one round per entry: {len(entries)} entries, shape {r.shape}")
    if (np.diff(r) <= 0).any():
        raise ValueError("rounds must increase")
    a = np.array([np.nan if v is None else float(v) for v in entries])
    measured = ~np.isnan(a)
    if ((a[measured] < 0) | (a[measured] > 1)).any():
        raise ValueError("attack success rates must lie in [0, 1]")
    after = measured & (r > stop_round)
    if not after.any():
        raise ValueError(f"no measured round after stop_round={stop_round}: durability is undetermined")
    fallen = after & (a < threshold)
    if not fallen.any():
        return math.inf
    return float(r[fallen.argmax()] - stop_round)
