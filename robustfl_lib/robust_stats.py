"""Vectorized statistics that the robust aggregators are built from.

Every function takes a 2-D tensor of flattened client updates ``(n, d)`` and
works on its device, with no Python loop over clients or coordinates:

* :func:`check_updates`: the input checks every aggregator shares;
* :func:`sort_columns`, :func:`coordinate_median`: order statistics per coordinate
  (chapters ``04_median`` and ``05_trimmed_mean``);
* :func:`pairwise_sq_distances`: all squared Euclidean distances ``||x_i - x_j||^2``
  from one Gram matrix of *centered* updates, so that a large common offset (raw
  weights instead of deltas) does not cancel the digits that decide Krum's choice
  (chapters ``06_krum`` to ``08_stronger_aggregators``).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["check_updates", "finite_rows", "sort_columns", "coordinate_median", "pairwise_sq_distances", "sq_distances_to",
           "compute_dtype"]

# Columns per block of the Gram accumulation: about 4 MiB of float32 per block keeps
# the block in cache while it is centered and multiplied.
_BLOCK_ELEMENTS = 1 << 20
# A centre this many times farther from the rows than the rows are from each other
# means an outlier dragged the mean; distances are then recomputed around the median.
_RECENTER_RATIO = 16.0


def check_updates(updates: torch.Tensor, what: str = "updates") -> torch.Tensor:
    """Raise unless ``updates`` is a non-empty 2-D floating tensor ``(n, d)``; return it."""
    if not isinstance(updates, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(updates).__name__}")
    if updates.ndim != 2 or updates.shape[0] == 0 or updates.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D tensor (n, d), got shape {tuple(updates.shape)}")
    if not torch.is_floating_point(updates):
        raise ValueError(f"{what} must be a floating-point tensor, got {updates.dtype}")
    return updates


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Which rows of ``x`` hold only finite values, as a ``(n,)`` bool tensor.

    A NaN or an infinity makes its row's sum non-finite, so one reduction finds the
    suspects and only they are checked entry by entry (a huge finite row can overflow
    its sum, hence the check). The sum stays in ``x``'s dtype: asking for float64
    would materialize a float64 copy of ``x``.
    """
    finite = torch.isfinite(x.sum(dim=1))
    if not bool(finite.all()):
        suspects = (~finite).nonzero().flatten()
        finite[suspects] = torch.isfinite(x[suspects]).all(dim=1)
    return finite


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float16 and bfloat16 are computed in float32 (their range
    overflows on squared distances), float32 stays float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sort_columns(x: torch.Tensor) -> torch.Tensor:
    """``x`` sorted along dim 0 (each coordinate's ``n`` values in increasing order).

    On CPU, float32/float64 columns are sorted by NumPy, whose SIMD sort
    (x86-simd-sort) is several times faster than ``torch.sort`` along a dimension
    on the same core; elsewhere (CUDA, other dtypes) ``torch.sort`` is used.
    Non-finite values must have been removed by the caller (NaN has no order).
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        return torch.from_numpy(np.sort(x.numpy(), axis=0))
    return torch.sort(x, dim=0).values


def coordinate_median(x: torch.Tensor, sorted_x: torch.Tensor | None = None) -> torch.Tensor:
    r"""The coordinate-wise median (Yin et al. 2018): per coordinate the middle value,
    and for even ``n`` the mean of the two middle values :math:`(x_{(n/2)} + x_{(n/2+1)})/2`
    (not ``torch.median``'s lower one). Taught in chapter ``04_median``."""
    s = sort_columns(x) if sorted_x is None else sorted_x
    n = s.shape[0]
    if n % 2:
        return s[n // 2].clone()
    # Average in float64 when the dtype is narrower so that two large values cannot overflow.
    lo, hi = s[n // 2 - 1], s[n // 2]
    return lo + (hi - lo) / 2 if x.dtype == torch.float64 else ((lo.double() + hi.double()) / 2).to(x.dtype)


def _block_gram(x: torch.Tensor, center: torch.Tensor | str | None) -> torch.Tensor:
    """Gram matrix of the rows of ``x - center`` in float64, accumulated over column
    blocks; ``center="block mean"`` centers each block at its own column means."""
    n, d = x.shape
    ct = compute_dtype(x.dtype)
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    block = max(1024, _BLOCK_ELEMENTS // n)
    # On CPU, NumPy recognizes ``a @ a.T`` and calls BLAS syrk, which computes one triangle
    # of the symmetric product: half the multiply-adds of torch's general matmul.
    # Only for large blocks: for small ones NumPy's BLAS thread pool start-up costs far more than
    # it saves (0.4 s per Krum call on (20, 17k) updates on a busy 2-core machine, against 1 ms).
    on_cpu = x.device.type == "cpu" and n * d >= 1 << 24
    # A loop over column blocks, not coordinates: each block is one vectorized matmul, and
    # centering a cache-sized block costs nothing next to centering the whole (n, d) tensor.
    for start in range(0, d, block):
        xb = x[:, start : start + block].to(ct)
        if isinstance(center, str):
            xb = xb - xb.mean(dim=0)
        elif center is not None:
            xb = xb - center[start : start + block].to(ct)
        if on_cpu:
            a = np.ascontiguousarray(xb.numpy())
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow means "infinitely far"
                gram += torch.from_numpy(a @ a.T)
        else:
            gram += (xb @ xb.T).double()
    return gram


def _gram(x: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """Gram matrix of the rows of ``x - center`` in float64 (``center=None``: the mean row).

    With ``center=None`` the uncentered Gram matrix ``G`` is computed first and centered
    exactly in float64, ``H G H`` with ``H = I - 11^T/n``. Its rounding error is that of
    ``G``, about float32 epsilon times the rows' squared norms: as good as centering the
    data first whenever the mean row is no longer than a typical centered row (deltas).
    When it is longer (raw weights share the model's weights), the rows are centered
    block by block and the product is taken again.
    """
    x = x.detach()
    if center is not None:
        return _block_gram(x, center)
    n = x.shape[0]
    g = _block_gram(x, None)
    h = torch.eye(n, dtype=torch.float64, device=g.device) - 1.0 / n
    centered = h @ g @ h
    offset = g.sum() / n**2  # squared norm of the mean row
    if torch.isfinite(centered).all() and offset <= centered.diagonal().mean():
        return centered
    return _block_gram(x, "block mean")


def sq_distances_to(x: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """``||x_i - point||^2`` for every row, float64 ``(n,)``, accumulated over column
    blocks (no ``(n, d)`` temporary); an overflow gives ``inf``."""
    n, d = x.shape
    ct = compute_dtype(x.dtype)
    out = torch.zeros(n, dtype=torch.float64, device=x.device)
    block = max(1024, _BLOCK_ELEMENTS // n)
    for start in range(0, d, block):
        diff = x[:, start : start + block].to(ct) - point[start : start + block].to(ct)
        out += diff.square().sum(dim=1).double()
    return torch.nan_to_num(out, nan=torch.inf, posinf=torch.inf)


def _distances_from_gram(gram: torch.Tensor) -> torch.Tensor:
    # Exactly symmetric, so that ties (a pair of mutual nearest neighbours) are exact ties.
    gram = (gram + gram.T) / 2
    sq = gram.diagonal()
    dist = sq[:, None] + sq[None, :] - 2 * gram
    # Rounding can make a tiny distance negative; an overflowed norm gives inf or inf - inf:
    # such rows are infinitely far from the others.
    dist = torch.nan_to_num(dist, nan=torch.inf, posinf=torch.inf).clamp_min_(0)
    dist.fill_diagonal_(0)
    return dist


def pairwise_sq_distances(x: torch.Tensor, center: torch.Tensor | str | None = None) -> torch.Tensor:
    r"""All squared distances :math:`D_{ij} = \|x_i - x_j\|^2`, an ``(n, n)`` float64 tensor.

    Computed as :math:`D_{ij} = G_{ii} + G_{jj} - 2 G_{ij}` from the Gram matrix
    :math:`G` of the **centered** rows :math:`x_i - c`. Distances do not depend on
    :math:`c`, but rounding does: the identity loses every digit that the rows share,
    so with raw weights (a large common offset) an uncentered Gram matrix would pick
    the wrong Krum update. ``center=None`` uses the mean row, and falls back to the
    coordinate-wise median when one huge outlier dragged the mean far from the
    other rows (detected by comparing the rows' distances to the centre with their
    distances to each other); ``center="median"`` or a ``(d,)`` tensor fix it.
    The Gram matrix is accumulated over column blocks (on CPU through NumPy, whose
    ``a @ a.T`` calls BLAS syrk and computes one triangle: half the work of a general
    matrix product). Memory is :math:`O(n d)` in blocks, never ``(n, n, d)``. Rows that overflow
    come out at distance ``inf``. Used by Krum, Multi-Krum, Bulyan, the geometric
    median, centered clipping and NNM (chapters ``06`` to ``08``).
    """
    check_updates(x)
    if isinstance(center, str):
        if center != "median":
            raise ValueError(f"center must be None, 'median' or a (d,) tensor, got {center!r}")
        return _distances_from_gram(_gram(x, coordinate_median(x)))
    if center is not None:
        if center.shape != (x.shape[1],):
            raise ValueError(f"center must have shape ({x.shape[1]},), got {tuple(center.shape)}")
        return _distances_from_gram(_gram(x, center))
    gram = _gram(x, None)
    dist = _distances_from_gram(gram)
    n = x.shape[0]
    if n > 2:
        to_center = gram.diagonal()
        between = dist[~torch.eye(n, dtype=torch.bool, device=x.device)]
        between = between[between > 0]  # duplicated rows (identical attackers, mixed updates) say nothing
        dragged = len(between) > 0 and to_center.median() > _RECENTER_RATIO * between.median()
        if not torch.isfinite(to_center).all() or dragged:
            dist = _distances_from_gram(_gram(x, coordinate_median(x)))
    return dist
