"""The update-attack protocol every attack shares, and the registry of config names.

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
Only attacks that set ``uses_weights = True`` receive them (see
:class:`ByzantineAttack`); the others are defined, as in their papers, on the
plain (unweighted) mean and spread of the honest updates and say so.
:func:`get_attack` builds any attack by its config name (:data:`ATTACKS`,
:data:`ADAPTIVE_ATTACKS`, filled by the package). Chapter ``03_byzantine_threats``.
"""

from __future__ import annotations

import torch

from ..robust_stats import check_updates, compute_dtype, finite_rows
from .poisoning import DataPoisoning

__all__ = ["ByzantineAttack", "ATTACKS", "ADAPTIVE_ATTACKS", "get_attack"]


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
        # last_* attributes record the last call (an output), not the configuration
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith(("_", "last_")))
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


def _check_finite(honest: torch.Tensor) -> None:
    """Attacks that search or measure the honest cloud need it finite (an honest client's
    training would have stopped on a NaN); say which row is not."""
    finite = finite_rows(honest)
    if not bool(finite.all()):
        raise ValueError(f"honest updates must be finite; row(s) {(~finite).nonzero().flatten().tolist()} are not")


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


#: Config names accepted by :func:`get_attack` (and ``FLConfig.byzantine_attack``): the attacks of
#: chapter ``03_byzantine_threats``, each of which builds from its name alone.
ATTACKS: dict[str, type] = {}
#: Config names of the attacks that adapt, to the rule in use (optimising attacks) or over rounds
#: (time-coupled), chapter 12; :func:`get_attack` accepts them too. Kept apart from :data:`ATTACKS`
#: because some need the aggregator they optimise against (``aggregator=``, ``f=``) to be built.
ADAPTIVE_ATTACKS: dict[str, type] = {}


def get_attack(spec: str | ByzantineAttack | DataPoisoning, **kwargs) -> ByzantineAttack | DataPoisoning:
    """An attack from its config name (a key of :data:`ATTACKS` such as ``"alie"``, or of
    :data:`ADAPTIVE_ATTACKS` such as ``"min_max"``; ``kwargs`` go to its constructor, e.g.
    ``get_attack("optimal_alie", aggregator="median", f=2)``) or the object itself (returned unchanged)."""
    if isinstance(spec, (ByzantineAttack, DataPoisoning)):
        if kwargs:
            raise ValueError("keyword arguments are only used with an attack name, not an attack object")
        return spec
    registry = {**ATTACKS, **ADAPTIVE_ATTACKS}
    if not isinstance(spec, str) or spec not in registry:
        raise ValueError(f"unknown attack {spec!r}; choose one of {sorted(registry)}")
    return registry[spec](**kwargs)
