"""Pre-aggregation: maps ``(n, d)`` client updates to ``(n, d)`` before an aggregator runs.

* :class:`NNM`: nearest-neighbour mixing (Allouah et al. 2023);
* :class:`Clipping`: norm clipping of each update;
* :class:`ARC`: adaptive robust clipping of the largest norms (Allouah et al. 2024);
* :class:`Bucketing`: means of random buckets of ``s`` updates (Karimireddy et al. 2022), which maps
  ``(n, d)`` to ``(ceil(n/s), d)``: the one step whose rows are no longer clients.

Compose them with any aggregator through :class:`robustfl_lib.aggregators.Pipeline`
(``Pipeline(NNM(f), Krum(f))``, or ``get_aggregator("nnm+krum", f=f)``, ``"bucketing+cc"``,
``"arc+nnm+trimmed_mean"``). NNM and Clipping are taught in chapter ``08_stronger_aggregators``;
ARC and Bucketing in chapter ``15_heterogeneity_and_its_fixes``.
"""

from __future__ import annotations

import torch

from ..robust_stats import check_updates, compute_dtype, finite_rows, pairwise_sq_distances

__all__ = ["PreAggregator", "NNM", "Clipping", "ARC", "Bucketing", "PRE_AGGREGATORS", "check_f"]


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
    #: Whether :meth:`transform` regroups rows (``(n, d)`` to ``(m, d)``, rows no longer clients);
    #: such a step also implements ``transform_with_mixing`` (see :class:`Bucketing`).
    regroups: bool = False

    def __call__(self, updates: torch.Tensor) -> torch.Tensor:
        check_updates(updates)
        bad = ~finite_rows(updates)
        if bad.any():
            raise ValueError(
                f"non-finite update in row(s) {bad.nonzero().flatten().tolist()}; "
                f"use {type(self).__name__} inside a Pipeline, which drops them"
            )
        self.requirement(updates.shape[0], self.f)
        self.last_info = {}
        return self.transform(updates, dropped=0)

    def requirement(self, n: int, f: int) -> None:
        """Raise ``ValueError`` stating the requirement on ``n`` and ``f`` if unmet."""

    def rows_out(self, n: int) -> int:
        """How many rows :meth:`transform` returns for ``n`` rows (``n`` unless it regroups them)."""
        return n

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
        norms = _row_norms(updates)
        tau = norms.median() if self.tau is None else torch.tensor(float(self.tau), dtype=torch.float64, device=norms.device)
        scale = torch.where(norms > tau, tau / norms, torch.ones_like(norms))
        return (updates * scale.to(compute_dtype(updates.dtype))[:, None]).to(updates.dtype)


def _row_norms(updates: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of every row in float64, ``(n,)``; a huge finite row whose norm overflows
    is rescaled by its largest entry first, so no finite row gets an infinite norm."""
    norms = torch.linalg.vector_norm(updates, dim=1).double()
    over = torch.isinf(norms)
    if over.any():
        big = updates[over].double()
        peak = big.abs().amax(dim=1, keepdim=True)
        norms[over] = peak[:, 0] * torch.linalg.vector_norm(big / peak, dim=1)
    return norms


class Bucketing(PreAggregator):
    r"""Bucketing (Karimireddy, He & Jaggi 2022, "Byzantine-Robust Learning on Heterogeneous
    Datasets via Bucketing", ICLR).

    Shuffle the ``n`` updates with a random permutation :math:`\pi`, cut them into
    :math:`m = \lceil n/s \rceil` buckets of ``s`` consecutive ones (the last holds the
    :math:`n - (m-1)s` left over) and replace each bucket by its mean:

    .. math:: y_b = \frac{1}{|B_b|}\sum_{i \in B_b} x_{\pi(i)},\qquad
        B_b = \{(b-1)s + 1, \dots, \min(bs, n)\},\quad b = 1, \dots, m.

    Averaging ``s`` random updates divides the honest spread (the heterogeneity that a rule
    mistakes for an attack) by about :math:`\sqrt s`, and each Byzantine update spoils one bucket
    only. **Convention for f:** the next rule receives the :math:`m` bucket means and the same
    ``f``, as in the paper (at most ``f`` buckets hold a Byzantine update, so the Byzantine
    fraction among buckets is at most :math:`s f / n`) and in ByzFL (which passes its rule's ``f``
    unchanged); not :math:`\lceil f/s \rceil`, which would assume the Byzantine updates share
    buckets. So the rule's requirement applies to :math:`m` rows: ``"bucketing+krum"`` needs
    :math:`\lceil n/s \rceil > 2f + 2`, and :math:`s \le n/(2f+1)` roughly for rules needing
    :math:`n > 2f`. ``s=1`` only shuffles (the rule's output is unchanged for a
    permutation-invariant rule). Default ``s=2``: the smallest bucket that averages.

    **Randomness.** ``generator`` (a ``torch.Generator``) draws the permutation; ``None`` draws
    from torch's global generator. Its state is saved and restored by the FL checkpoints (as for
    every generator an aggregator holds). Costs one pass over the updates (sums by bucket).
    Returns ``(m, d)``, not ``(n, d)``: inside a :class:`~robustfl_lib.aggregators.Pipeline`, the
    rule's ``last_info`` is mapped back to clients (see there). Taught in chapter ``15_heterogeneity_and_its_fixes``.
    """

    regroups = True

    def __init__(self, s: int = 2, generator: torch.Generator | None = None):
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"s (the bucket size) must be an integer >= 1, got {s!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.s, self.generator = s, generator

    def rows_out(self, n: int) -> int:
        return -(-n // self.s)

    def mixing(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Draw the buckets: the ``(m, n)`` float64 matrix :math:`M` with :math:`y = M x`
        (row ``b`` holds :math:`1/|B_b|` at the clients of bucket ``b``). One draw per call."""
        gen_device = self.generator.device if self.generator is not None else "cpu"
        perm = torch.randperm(n, generator=self.generator, device=gen_device).to(device)
        bucket = torch.arange(n, device=device) // self.s
        size = torch.bincount(bucket).double()
        m = torch.zeros(len(size), n, dtype=torch.float64, device=device)
        return m.index_put_((bucket, perm), 1.0 / size[bucket])

    def transform(self, updates: torch.Tensor, dropped: int) -> torch.Tensor:
        return self.transform_with_mixing(updates, dropped)[0]

    def transform_with_mixing(self, updates: torch.Tensor, dropped: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The bucket means and the ``(m, n)`` matrix that made them (``y = M x``)."""
        mix = self.mixing(updates.shape[0], updates.device)
        self.last_info = {"buckets": mix.shape[0]}
        if self.s == 1:  # a permutation: gather the rows, bit for bit
            return updates.index_select(0, mix.argmax(dim=1)), mix
        ct = compute_dtype(updates.dtype)
        # Sums by index_add (one read of the updates), not the (m, n) @ (n, d) product, whose
        # multiply-adds by zero cost m times more.
        out = torch.zeros(mix.shape[0], updates.shape[1], dtype=ct, device=updates.device)
        out.index_add_(0, mix.argmax(dim=0), updates.to(ct))
        return out.mul_(mix.amax(dim=1).to(ct)[:, None]).to(updates.dtype), mix


class ARC(PreAggregator):
    r"""Adaptive robust clipping (Allouah, Guerraoui, Gupta, Jellouli, Rizk & Stephan 2024,
    "The Vital Role of Gradient Clipping in Byzantine-Resilient Distributed Learning"), as in ByzFL.

    Clip the :math:`k = \lfloor 2 f (n - f) / n \rfloor` updates of largest norm to the norm of the
    :math:`(k+1)`-th largest:

    .. math:: y_i = x_i \min\Big(1, \frac{\|x_{\pi(k+1)}\|}{\|x_i\|}\Big),\qquad
        \|x_{\pi(1)}\| \ge \dots \ge \|x_{\pi(n)}\|.

    The threshold adapts to the round (no :math:`\tau` to tune) and at most :math:`k` rows are
    shrunk, :math:`k \ge f` whenever :math:`f \le n/2`, so every Byzantine update that is longer
    than the honest ones is clipped. ``k`` is computed in integer arithmetic (ByzFL's floating
    :math:`2f/n \cdot (n-f)` can round an integer down). Norms tied with the threshold are not
    shrunk, so ties clip fewer than ``k``. ``f = 0`` is the identity. Requires :math:`n > 2f`.
    One pass for the norms, one for the scaling. Taught in chapter ``15_heterogeneity_and_its_fixes``.
    """

    def __init__(self, f: int):
        self.f = check_f(f)

    def requirement(self, n: int, f: int) -> None:
        if not n > 2 * f:
            raise ValueError(f"ARC(f={f}) needs n > 2f = {2 * f} updates, got n={n}")

    @staticmethod
    def clipped_count(n: int, f: int) -> int:
        """:math:`k = \\lfloor 2 f (n - f) / n \\rfloor`, the number of rows ARC clips."""
        return (2 * f * (n - f)) // n

    def transform(self, updates: torch.Tensor, dropped: int) -> torch.Tensor:
        n = updates.shape[0]
        k = self.clipped_count(n, max(self.f - dropped, 0))
        if k == 0:
            return updates
        norms = _row_norms(updates)
        tau = norms.topk(k + 1).values[k]
        scale = torch.where(norms > tau, tau / norms, torch.ones_like(norms))
        self.last_info = {"clipped": int((norms > tau).sum()), "threshold": float(tau)}
        return (updates * scale.to(compute_dtype(updates.dtype))[:, None]).to(updates.dtype)


#: Names accepted before ``+`` in :func:`robustfl_lib.aggregators.get_aggregator` ("nnm+krum", "bucketing+cc").
PRE_AGGREGATORS: dict[str, type[PreAggregator]] = {"nnm": NNM, "clipping": Clipping, "arc": ARC, "bucketing": Bucketing}
