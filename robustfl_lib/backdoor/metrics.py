"""What a backdoor achieved and what a defense caught: :func:`attack_success_rate`,
:func:`detection_scores`, :func:`detection_over_rounds`. Chapter ``11_exercise_backdoor_detection``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .triggers import PixelTrigger

__all__ = ["attack_success_rate", "detection_scores", "detection_over_rounds"]


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
