"""Worker (client) momentum: what an honest client sends when it remembers its past updates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["WorkerMomentum"]


class WorkerMomentum:
    r"""Heavy-ball momentum kept by every client, sent instead of its update
    (Karimireddy, He & Jaggi 2021, "Learning from History for Byzantine Robust
    Optimization", ICML).

    Client :math:`i` keeps :math:`m_i`. In a round where it trains and its update is
    :math:`g_i^t` (a delta, local weights minus global weights) it sends

    .. math:: m_i^t = \beta\, m_i^{t-1} + (1 - \beta)\, g_i^t ,

    the paper's convention, with :math:`(1 - \beta)` on the new update so that
    :math:`m_i` is an average of past updates on their own scale. A client that does
    not train in a round (not sampled, dropped out) keeps its :math:`m_i` unchanged.
    Averaging over about :math:`1 / (1 - \beta)` rounds shrinks the honest vectors'
    spread (their noise) while their mean follows the gradient, so an attack that
    hides inside that spread (ALIE) or biases it a little every round (time-coupled
    attacks) has less room; the paper pairs it with centered clipping around the
    previous aggregate (:class:`~robustfl_lib.aggregators.CenteredClipping` with
    ``init="previous"``).

    The start: ``init="zero"`` takes :math:`m_i^0 = 0`, so the first message is
    :math:`(1 - \beta) g_i^1`, as ByzFL does (its ``Client`` starts the momentum at
    zeros); ``init="first"`` takes :math:`m_i^1 = g_i^1` for a client's first message, as the
    authors' code does (``WorkerWithMomentum`` in epfml/byzantine-robust-optimizer
    starts its buffer at the first gradient; that code then accumulates without the
    :math:`(1 - \beta)` factor, which only rescales the messages by :math:`1/(1-\beta)`
    in the steady state; here the factor is always applied).

    Configure with ``beta``, the number of clients and ``init``; call on a round's
    updates ``(k, d)`` and the ids of the ``k`` clients that produced them; returns the
    ``(k, d)`` messages. The momenta are one ``(num_clients, d)`` tensor on the updates'
    device and dtype, updated for all ``k`` rows at once. ``get_state`` / ``set_state``
    / ``reset`` carry them through checkpoints (:mod:`robustfl_lib.checkpoint`).
    ``beta = 0`` returns the updates themselves. Used by
    :func:`~robustfl_lib.federated.run_federated` when ``FLConfig.client_momentum > 0``;
    chapter ``15_heterogeneity_and_its_fixes`` (``08_stronger_aggregators`` states the guarantee).
    """

    def __init__(self, beta: float, num_clients: int, init: str = "zero"):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
        if init not in ("zero", "first"):
            raise ValueError(f"init must be 'zero' (m_i^0 = 0) or 'first' (m_i^1 = g_i^1), got {init!r}")
        self.beta, self.num_clients, self.init = float(beta), int(num_clients), init
        self._momenta: torch.Tensor | None = None  # (num_clients, d), allocated at the first call
        self._started: torch.Tensor | None = None  # (num_clients,) bool: has client i sent yet

    @property
    def momenta(self) -> torch.Tensor | None:
        """The ``(num_clients, d)`` momenta (zero rows for clients that never sent), or ``None`` before the first call."""
        return self._momenta

    @property
    def started(self) -> torch.Tensor | None:
        """Which clients have sent at least once (``(num_clients,)`` bool), or ``None`` before the first call."""
        return self._started

    def reset(self) -> None:
        self._momenta, self._started = None, None

    def get_state(self) -> dict[str, Any]:
        return {"momenta": self._momenta, "started": self._started}

    def set_state(self, state: dict[str, Any]) -> None:
        self._momenta, self._started = state.get("momenta"), state.get("started")

    def __call__(self, updates: torch.Tensor, clients: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        if not isinstance(updates, torch.Tensor) or updates.ndim != 2:
            raise ValueError(f"updates must be a 2-D tensor (clients x parameters), got "
                             f"{tuple(updates.shape) if isinstance(updates, torch.Tensor) else type(updates).__name__}")
        ids = torch.as_tensor(np.asarray(clients, dtype=np.int64) if not isinstance(clients, torch.Tensor) else clients)
        ids = ids.to(device=updates.device, dtype=torch.long).reshape(-1)
        if ids.numel() != updates.shape[0]:
            raise ValueError(f"{updates.shape[0]} updates but {ids.numel()} client ids")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_clients):
            raise ValueError(f"client ids must be in [0, {self.num_clients}), got {ids.tolist()}")
        if ids.unique().numel() != ids.numel():
            raise ValueError(f"each client sends once per round; repeated ids in {ids.tolist()}")
        if self.beta == 0.0:
            return updates
        d = updates.shape[1]
        if self._momenta is None:
            self._momenta = torch.zeros(self.num_clients, d, dtype=updates.dtype, device=updates.device)
            self._started = torch.zeros(self.num_clients, dtype=torch.bool, device=updates.device)
        if self._momenta.shape != (self.num_clients, d):
            raise ValueError(f"the momenta have shape {tuple(self._momenta.shape)} but the updates d={d}; reset()")
        if self._momenta.device != updates.device or self._momenta.dtype != updates.dtype:
            self._momenta = self._momenta.to(device=updates.device, dtype=updates.dtype)
            self._started = self._started.to(updates.device)
        sent = self.beta * self._momenta[ids] + (1.0 - self.beta) * updates
        if self.init == "first":
            sent = torch.where(self._started[ids].unsqueeze(1), sent, updates)
        self._momenta[ids] = sent
        self._started[ids] = True
        return sent
