"""The server's side of a round: who takes part, the Byzantine clients' forged updates, aggregation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..aggregators import Aggregator
from ..byzantine import ADAPTIVE_ATTACKS, ATTACKS, ByzantineAttack, DataPoisoning, ScaleSearch, get_attack
from ..checkpoint import isolated_copy
from .config import FLConfig
from .hooks import accepts_keyword

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
    aggregator: Aggregator, updates: torch.Tensor, counts: torch.Tensor | None, participants: np.ndarray | list[int],
    global_model: torch.Tensor | None = None, reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The aggregate update and a JSON-friendly record of what the aggregator kept,
    by client id: ``"selected"`` (clients a selection rule kept), ``"dropped"``
    (clients whose non-finite update was dropped), and per participant, in
    ``participants`` order, ``"kept_fraction"`` / ``"weights"`` / ``"trust"`` when the rule
    reports them; ``"iterations"`` for iterative rules; ``"zero_trust"`` when a trust-based
    rule trusted nobody.

    The aggregator is called as ``aggregator(updates, weights=counts)``, plus each keyword its
    ``__call__`` accepts (:func:`~robustfl_lib.federated.hooks.accepts_keyword`):
    ``client_ids`` (the participants' ids in row order: :class:`~robustfl_lib.backdoor.FoolsGold`),
    ``global_model`` (the flat global weights the updates start from, when given:
    :class:`~robustfl_lib.backdoor.FLAME`) and ``reference`` (the server's own update, when
    given: :class:`~robustfl_lib.aggregators.FLTrust`)."""
    ids = [int(c) for c in participants]
    extra: dict[str, Any] = {}
    if accepts_keyword(aggregator, "client_ids"):
        extra["client_ids"] = ids
    if global_model is not None and accepts_keyword(aggregator, "global_model"):
        extra["global_model"] = global_model
    if reference is not None and accepts_keyword(aggregator, "reference"):
        extra["reference"] = reference
    step = aggregator(updates, weights=counts, **extra)
    info = getattr(aggregator, "last_info", {}) or {}
    record: dict[str, Any] = {}
    if "selected" in info:
        record["selected"] = [ids[i] for i in torch.as_tensor(info["selected"]).reshape(-1).tolist()]
    if "dropped" in info:
        record["dropped"] = [ids[i] for i in info["dropped"]]
    for key in ("kept_fraction", "weights", "trust"):
        if key in info:
            record[key] = [round(float(v), 6) for v in torch.as_tensor(info[key]).tolist()]
    if "iterations" in info:
        record["iterations"] = int(info["iterations"])
    if info.get("zero_trust"):
        record["zero_trust"] = True
    return step, record


def _make_attack(config: FLConfig, aggregator: Aggregator) -> ByzantineAttack | DataPoisoning | None:
    """The config's attack; an attack that searches its scale against the rule in use
    (:class:`~robustfl_lib.byzantine.ScaleSearch`: ``"optimal_alie"``, ``"optimal_ipm"``,
    ``"adaptive_scaling"``) named without an ``aggregator`` in ``attack_kwargs`` is built against an
    isolated copy of the run's own ``aggregator`` (as the run built it, before its first round),
    so ``FLConfig(byzantine_attack="optimal_alie")`` attacks whatever rule the run uses."""
    spec, kwargs = config.byzantine_attack, dict(config.attack_kwargs)
    if spec is None:
        return None
    cls = {**ATTACKS, **ADAPTIVE_ATTACKS}.get(spec) if isinstance(spec, str) else None
    if isinstance(cls, type) and issubclass(cls, ScaleSearch) and "aggregator" not in kwargs:
        kwargs["aggregator"] = isolated_copy(aggregator)
    return get_attack(spec, **kwargs)


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


