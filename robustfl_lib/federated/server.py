"""The server's side of a round: who takes part, the Byzantine clients' forged updates, aggregation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..aggregators import Aggregator
from ..byzantine import ByzantineAttack
from .config import FLConfig

__all__ = ["byzantine_clients", "select_participants", "apply_byzantine_attack", "aggregate_round"]


def byzantine_clients(num_clients: int, num_byzantine: int, seed: int) -> np.ndarray:
    """The sorted ids of the Byzantine clients: a seeded random subset, fixed for a run.

    Drawn from its own stream (``default_rng([seed, 1])``) so that adding
    Byzantine clients does not change which clients participate each round.
    """
    if not 0 <= num_byzantine <= num_clients:
        raise ValueError(f"num_byzantine must be in [0, {num_clients}], got {num_byzantine}")
    return np.sort(np.random.default_rng([seed, 1]).choice(num_clients, size=num_byzantine, replace=False))


def select_participants(rng: np.random.Generator, config: FLConfig) -> np.ndarray:
    """This round's participating client ids (sorted), drawn from ``rng``."""
    return np.sort(rng.choice(config.num_clients, size=config.participants_per_round, replace=False))


def apply_byzantine_attack(
    updates: torch.Tensor, is_byzantine: np.ndarray, attack: ByzantineAttack, generator: torch.Generator,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace the Byzantine rows of ``updates`` by ``attack(honest rows, #Byzantine)``.

    The attacker is omniscient: it sees every honest participant's update of
    this round, and ``counts`` (per row, the sample counts the server weights by)
    as ``weights`` of the honest rows and ``byzantine_weights`` of its own.
    With no honest participant it has nothing to imitate and sends zeros.
    """
    byz = torch.as_tensor(is_byzantine, dtype=torch.bool, device=updates.device)
    num_byz = int(byz.sum())
    if num_byz == 0:
        return updates
    out = updates.clone()
    honest = updates[~byz]
    weighting = {} if counts is None else {"weights": counts[~byz], "byzantine_weights": counts[byz]}
    out[byz] = attack(honest, num_byz, generator=generator, **weighting) if len(honest) else 0.0
    return out


def aggregate_round(
    aggregator: Aggregator, updates: torch.Tensor, counts: torch.Tensor, participants: np.ndarray
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The aggregate update and a JSON-friendly record of what the aggregator kept,
    by client id: ``"selected"`` (clients a selection rule kept), ``"dropped"``
    (clients whose non-finite update was dropped), and per participant, in
    ``participants`` order, ``"kept_fraction"`` / ``"weights"`` when the rule
    reports them; ``"iterations"`` for iterative rules."""
    step = aggregator(updates, weights=counts)
    info = getattr(aggregator, "last_info", {}) or {}
    ids = [int(c) for c in participants]
    record: dict[str, Any] = {}
    if "selected" in info:
        record["selected"] = [ids[i] for i in torch.as_tensor(info["selected"]).reshape(-1).tolist()]
    if "dropped" in info:
        record["dropped"] = [ids[i] for i in info["dropped"]]
    for key in ("kept_fraction", "weights"):
        if key in info:
            record[key] = [round(float(v), 6) for v in info[key].tolist()]
    if "iterations" in info:
        record["iterations"] = int(info["iterations"])
    return step, record


def _quorum_error(aggregator: Aggregator, answered: int) -> str | None:
    """Why ``answered`` updates are too few to aggregate this round, or ``None``."""
    if answered == 0:
        return "no participant answered"
    if hasattr(aggregator, "requirement"):
        try:
            aggregator.requirement(answered, aggregator.f)
        except ValueError as err:
            return f"only {answered} participant(s) answered: {err}"
    return None


