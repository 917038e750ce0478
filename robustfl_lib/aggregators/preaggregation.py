"""Pre-aggregation: maps ``(n, d)`` client updates to ``(n, d)`` before an aggregator runs.

* :class:`NNM`: nearest-neighbour mixing (Allouah et al. 2023);
* :class:`Clipping`: norm clipping of each update.

Compose them with any aggregator through :class:`robustfl_lib.aggregators.Pipeline`
(``Pipeline(NNM(f), Krum(f))``, or ``get_aggregator("nnm+krum", f=f)``). Taught in
chapter ``08_stronger_aggregators``.
"""

from __future__ import annotations

import torch

from ..robust_stats import check_updates, compute_dtype, finite_rows, pairwise_sq_distances

__all__ = ["PreAggregator", "NNM", "Clipping", "PRE_AGGREGATORS", "check_f"]


def check_f(f: int) -> int:
    """``f`` (the number of Byzantine clients to tolerate) as an int, or ``ValueError``."""
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f (the number of Byzantine clients to tolerate) must be an integer >= 0, got {f!r}")
    return f


class PreAggregator:
    """Base class: ``pre(updates) -> (n, d)``, rows in the same client order.

    Called on its own it refuses non-finite rows (``ValueError``); inside a
    :class:`~robustfl_lib.aggregators.Pipeline` those rows have already been
    dropped. Subclasses implement :meth:`transform` and, if they take ``f``,
    :meth:`requirement`.
    """

    f: int = 0

    def __call__(self, updates: torch.Tensor) -> torch.Tensor:
        check_updates(updates)
        bad = ~finite_rows(updates)
        if bad.any():
            raise ValueError(
                f"non-finite update in row(s) {bad.nonzero().flatten().tolist()}; "
                f"use {type(self).__name__} inside a Pipeline, which drops them"
            )
        self.requirement(updates.shape[0], self.f)
        return self.transform(updates, dropped=0)

    def requirement(self, n: int, f: int) -> None:
        """Raise ``ValueError`` stating the requirement on ``n`` and ``f`` if unmet."""

    def transform(self, updates: torch.Tensor, dropped: int) -> torch.Tensor:
        """The pre-aggregated rows; ``dropped`` non-finite rows were already removed
        (each is certainly Byzantine, so ``f`` shrinks by that many)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith(("_", "last_")))
        return f"{type(self).__name__}({args})"


class NNM(PreAggregator):
    r"""Nearest-neighbour mixing (Allouah et al. 2023, "Fixing by Mixing").

    Each update is replaced by the mean of its :math:`n - f` nearest updates,
    itself included:

    .. math:: y_i = \frac{1}{n-f} \sum_{j \in N_i} x_j,\quad N_i = \text{the } n-f
        \text{ rows closest to } x_i.

    Mixing pulls the honest updates together (their spread shrinks) while a
    Byzantine row can only move as far as honest neighbours let it, so an
    aggregator that needs honest updates to be alike (Krum, the median) works
    again under non-IID data. Requires :math:`n > 2f`. Distances come from one
    centered Gram matrix and the mixing is one ``(n, n) @ (n, d)`` product:
    :math:`O(n d)` memory, never an ``(n, n, d)`` array. Chapter
    ``08_stronger_aggregators``.
    """

    def __init__(self, f: int):
        self.f = check_f(f)

    def requirement(self, n: int, f: int) -> None:
        if not n > 2 * f:
            raise ValueError(f"NNM(f={f}) needs n > 2f = {2 * f} updates, got n={n}")

    def transform(self, updates: torch.Tensor, dropped: int) -> torch.Tensor:
        n = updates.shape[0]
        k = n - max(self.f - dropped, 0)
        dist = pairwise_sq_distances(updates)
        dist.fill_diagonal_(-torch.inf)  # a row is always its own neighbour, even among duplicates
        nearest = dist.topk(k, dim=1, largest=False).indices
        ct = compute_dtype(updates.dtype)
        mix = torch.zeros(n, n, dtype=ct, device=updates.device).scatter_(1, nearest, 1.0 / k)
        return (mix @ updates.to(ct)).to(updates.dtype)


class Clipping(PreAggregator):
    r"""Norm clipping: :math:`y_i = x_i \min(1, \tau / \|x_i\|)`.

    Bounds how far one client can move any average to :math:`\tau / n`, at the
    price of shrinking honest updates longer than :math:`\tau`. ``tau=None``
    uses the median of the updates' norms in each call, which is scale-free and
    cannot be set by fewer than half the clients. Chapter ``08_stronger_aggregators``.
    """

    def __init__(self, tau: float | None = None):
        if tau is not None and not tau > 0:
            raise ValueError(f"tau must be > 0 (or None for the median norm), got {tau!r}")
        self.tau = tau

    def transform(self, updates: torch.Tensor, dropped: int) -> torch.Tensor:
        norms = torch.linalg.vector_norm(updates, dim=1).double()
        over = torch.isinf(norms)
        if over.any():  # a huge finite row overflowed its norm: rescale it by its largest entry first
            big = updates[over].double()
            peak = big.abs().amax(dim=1, keepdim=True)
            norms[over] = peak[:, 0] * torch.linalg.vector_norm(big / peak, dim=1)
        tau = norms.median() if self.tau is None else torch.tensor(float(self.tau), dtype=torch.float64, device=norms.device)
        scale = torch.where(norms > tau, tau / norms, torch.ones_like(norms))
        return (updates * scale.to(compute_dtype(updates.dtype))[:, None]).to(updates.dtype)


#: Names accepted before ``+`` in :func:`robustfl_lib.aggregators.get_aggregator` ("nnm+krum").
PRE_AGGREGATORS: dict[str, type[PreAggregator]] = {"nnm": NNM, "clipping": Clipping}
