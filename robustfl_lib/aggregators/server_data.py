"""Filters that need server data: rules that judge the clients against an update the server computes
itself, on a small clean dataset it holds (:class:`FLTrust`).

Every other rule in :mod:`robustfl_lib.aggregators` sees only the clients' updates and must find the
honest ones among them, which needs an honest majority. A server with data of its own can do without
that majority: it trains its own update each round and trusts each client as far as the client agrees
with it. The protocol changes (the server trains too), so the FL loop gives such a rule the server's
update: :func:`~robustfl_lib.federated.run_federated` with ``FLConfig.server_root_size > 0`` holds that
many training samples out for the server and passes its update as ``reference=`` to a rule whose
``needs_server_update`` is ``True``. Taught in chapter ``16_optimising_attacks``, section "FLTrust: the server's
own data as the root of trust".
"""

from __future__ import annotations

from typing import Any

import torch

from ..robust_stats import check_updates, compute_dtype, finite_rows
from .base import Aggregator

__all__ = ["FLTrust"]


def _unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_i / ||x_i||, ||x_i|| > 0)`` per row, in float64. Each row is divided by its largest
    magnitude first, so that the norm of a huge (or tiny) finite row neither overflows nor underflows."""
    x = x.double()
    peak = x.abs().amax(dim=1, keepdim=True)
    nonzero = peak.squeeze(1) > 0
    scaled = x / torch.where(peak > 0, peak, torch.ones_like(peak))
    norms = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    return scaled / torch.where(norms > 0, norms, torch.ones_like(norms)), nonzero


class FLTrust(Aggregator):
    r"""FLTrust (Cao, Fang, Liu & Gong 2021, "FLTrust: Byzantine-robust Federated Learning via Trust
    Bootstrapping", NDSS): trust each client by the cosine of its update to the server's own.

    The server holds a small clean root dataset and computes its own update :math:`g_0` each round,
    by the clients' local training from the global model. With the clients' updates
    :math:`g_1, \dots, g_n`,

    .. math::
        TS_i = \mathrm{ReLU}\big(\cos(g_i, g_0)\big), \qquad
        \bar g_i = \frac{\lVert g_0 \rVert}{\lVert g_i \rVert}\, g_i, \qquad
        \mathrm{FLTrust}(g_1, \dots, g_n; g_0) = \frac{\sum_i TS_i\, \bar g_i}{\sum_i TS_i}.

    A client pointing away from the server's direction (:math:`\cos \le 0`) gets no weight at all;
    each trusted update is rescaled to the server's norm, so no client moves the model further than
    the server itself would, however large its update. No honest majority is needed: the guarantee
    rests on the root data being clean and representative.

    **Conventions.** A non-finite row, or a zero row (its cosine is undefined), gets trust 0 and is
    listed in ``last_info["dropped"]`` (non-finite) or has trust 0 (zero). If every trust score is 0
    (every client disagrees with the server, or :math:`g_0 = 0`), the output is the zero vector, the
    paper's behaviour (the global model stays), and ``last_info["zero_trust"]`` is ``True``. Cosines,
    norms and the weights are computed in float64 on rows divided by their largest magnitude (so
    huge finite rows do not overflow), the output is returned in the input dtype. Sample counts
    (``weights``) are not used: a Byzantine client could claim any number.

    **Call.** ``FLTrust()(updates, reference=g0)``: ``updates`` ``(n, d)``, ``reference`` ``(d,)``, a
    finite tensor (``ValueError`` without it: the server's update is part of the protocol).
    ``needs_server_update = True`` tells the FL loop to compute it; set
    ``FLConfig(aggregator="fltrust", server_root_size=100)`` (the paper's root dataset has 100
    samples). It cannot be the last step of a :class:`~robustfl_lib.aggregators.Pipeline` (which
    cannot pass the reference on). ``last_info``: ``"trust"`` (:math:`TS_i`), ``"weights"`` (each
    row's factor in the output, :math:`TS_i \lVert g_0\rVert / (\lVert g_i\rVert \sum_j TS_j)`),
    ``"selected"`` (rows with positive trust), ``"dropped"``, ``"zero_trust"``,
    ``"reference_norm"``. No requirement on ``n`` and ``f`` beyond ``n >= 1``. Config name
    ``"fltrust"``. Chapter ``16_optimising_attacks``, section "FLTrust: the server's own data as the root of trust".
    """

    robust = True
    #: The FL loop computes the server's own update each round and passes it as ``reference``.
    needs_server_update = True

    def __init__(self) -> None:
        self.f = 0

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor | None = None,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
        check_updates(updates)
        if reference is None:
            raise ValueError("FLTrust needs the server's own update: call it with reference=<(d,) tensor>; in "
                             "run_federated set FLConfig.server_root_size > 0 so that the server holds root data")
        if not isinstance(reference, torch.Tensor) or not torch.is_floating_point(reference):
            raise TypeError(f"reference must be a floating-point torch.Tensor, got {type(reference).__name__}")
        if reference.shape != (updates.shape[1],):
            raise ValueError(f"reference must have shape ({updates.shape[1]},) to match updates, "
                             f"got {tuple(reference.shape)}")
        if not bool(torch.isfinite(reference).all()):
            raise ValueError("reference (the server's update) has non-finite entries")
        if weights is not None:
            weights = torch.as_tensor(weights)
            if weights.shape != (updates.shape[0],):
                raise ValueError(f"weights must have shape ({updates.shape[0]},) to match updates, "
                                 f"got {tuple(weights.shape)}")
        self.last_info: dict[str, Any] = {}
        return self._aggregate(updates, reference.to(updates.device))

    def _aggregate(self, updates: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        n, d = updates.shape
        finite = finite_rows(updates)
        x = torch.where(finite[:, None], updates, torch.zeros((), dtype=updates.dtype, device=updates.device))
        unit, nonzero = _unit_rows(x)
        ref_unit, ref_nonzero = _unit_rows(reference[None, :])
        trust = (unit @ ref_unit[0]).clamp(min=0.0) * (finite & nonzero).double()
        ref_norm = float(torch.linalg.vector_norm(reference.double()))
        total = trust.sum()
        zero_trust = not bool(total > 0) or not bool(ref_nonzero[0])
        norms = torch.linalg.vector_norm(x.double(), dim=1)
        if zero_trust:
            out = torch.zeros(d, dtype=updates.dtype, device=updates.device)
            row_weights = torch.zeros(n, dtype=torch.float64, device=updates.device)
        else:
            share = trust / total
            # sum_i TS_i ||g0|| g_i / ||g_i|| / sum TS = ||g0|| sum_i share_i unit_i: no division by a huge norm.
            out = (ref_norm * (share @ unit)).to(compute_dtype(updates.dtype)).to(updates.dtype)
            row_weights = torch.where(share > 0, share * ref_norm / norms.clamp_min(1e-300), torch.zeros_like(share))
        self.last_info = {
            "trust": trust,
            "weights": row_weights,
            "selected": (trust > 0).nonzero().flatten(),
            "dropped": (~finite).nonzero().flatten().tolist(),
            "zero_trust": zero_trust,
            "reference_norm": ref_norm,
        }
        return out

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        raise ValueError("FLTrust needs the server's own update (reference=) and cannot be reached through "
                         "Aggregator.aggregate or a Pipeline; call FLTrust()(updates, reference=g0)")

    def aggregate_finite(self, updates, weights, dropped):
        raise ValueError("FLTrust needs the server's own update (reference=) and cannot be the last step of a "
                         "Pipeline; use it on its own (aggregator='fltrust' with FLConfig.server_root_size > 0)")

    def __repr__(self) -> str:
        return "FLTrust()"
