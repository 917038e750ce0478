"""Vectorized statistics that the robust aggregators are built from.

Every function takes a 2-D tensor of flattened client updates ``(n, d)`` and
works on its device, with no Python loop over clients or coordinates:

* :func:`check_updates`: the input checks every aggregator shares;
* :func:`sort_columns`, :func:`coordinate_median`: order statistics per coordinate
  (chapters ``04_median`` and ``05_trimmed_mean``);
* :func:`pairwise_sq_distances`: all squared Euclidean distances ``||x_i - x_j||^2``
  from one Gram matrix of updates centred at a central row, every pair certified and
  recomputed exactly where the centre does not suit it, so that neither a large
  common offset (raw weights instead of deltas) nor far outliers cancel the digits
  that decide Krum's choice (chapters ``06_krum`` to ``08_stronger_aggregators``);
* :func:`sq_distances_to`: distances of every row to one point, in float64.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["check_updates", "finite_rows", "sort_columns", "coordinate_median", "pairwise_sq_distances", "sq_distances_to",
           "compute_dtype"]

# Columns per block of the Gram accumulation: about 4 MiB of float32 per block keeps
# the block in cache while it is centered and multiplied.
_BLOCK_ELEMENTS = 1 << 20
# Coordinates sampled (in float64) to choose the row the Gram matrix is centred at.
_CENTRE_SAMPLE = 1 << 12
# A pair whose distance is smaller than 1/16 of (||a_i|| + ||a_j||)^2 around the centre would
# lose more than 16x the product's rounding: its distance is recomputed from differences.
_AMPLIFICATION = 16.0


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


def _central_row(x: torch.Tensor) -> int:
    """A row near the majority of the rows: the one whose median distance to the others,
    measured in float64 on a sample of coordinates, is smallest (a medoid).

    It only chooses where the Gram matrix is centred, which decides how much rounding the
    float32 product suffers, never which distances come out: :func:`pairwise_sq_distances`
    certifies every distance afterwards and recomputes those the centre does not suit.
    """
    n, d = x.shape
    if d > _CENTRE_SAMPLE:
        # Evenly spaced runs of contiguous coordinates: a small part of the memory that
        # as many single strided coordinates would touch.
        runs, width = 16, _CENTRE_SAMPLE // 16
        starts = torch.arange(runs, device=x.device) * ((d - width) // (runs - 1))
        cols = (starts[:, None] + torch.arange(width, device=x.device)[None, :]).flatten()
        x = x.index_select(1, cols)
    sample = torch.nan_to_num(x.double(), nan=0.0, posinf=0.0, neginf=0.0)
    sample = sample - sample.mean(dim=0)  # float64 keeps the honest digits even around a dragged mean: enough to choose
    gram = sample @ sample.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    return int(dist.median(dim=1).values.argmin())


def _block_gram(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the rows of ``x - center``: each column block is centred and
    multiplied in the compute dtype (:func:`compute_dtype`), the blocks are summed in float64."""
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
    if on_cpu:  # NumPy also centres a strided block faster than torch does
        xn, cn = x.to(ct).numpy() if x.dtype != ct else x.numpy(), center.to(ct).numpy()
    for start in range(0, d, block):
        if on_cpu:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow means "infinitely far"
                a = xn[:, start : start + block] - cn[start : start + block]
                gram += torch.from_numpy(a @ a.T)
        else:
            xb = x[:, start : start + block].to(ct) - center[start : start + block].to(ct)
            gram += (xb @ xb.T).double()
    return gram


def _direct_sq_distances(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``||x_i - x_j||^2`` for the given pairs, in float64 from explicit differences
    (no Gram identity, so no cancellation), over column blocks."""
    n, d = x.shape
    out = torch.zeros(len(i), dtype=torch.float64, device=x.device)
    block = max(256, _BLOCK_ELEMENTS // max(len(i), 1))
    for start in range(0, d, block):
        xb = x[:, start : start + block].double()
        out += (xb[i] - xb[j]).square().sum(dim=1)
    return torch.nan_to_num(out, nan=torch.inf, posinf=torch.inf)


def sq_distances_to(x: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """``||x_i - point||^2`` for every row, float64 ``(n,)``, from explicit differences in
    float64 over column blocks (exact up to float64 rounding, no ``(n, d)`` temporary);
    an overflow gives ``inf``."""
    n, d = x.shape
    out = torch.zeros(n, dtype=torch.float64, device=x.device)
    block = max(1024, _BLOCK_ELEMENTS // n)
    for start in range(0, d, block):
        diff = x[:, start : start + block].double() - point[start : start + block].double()
        out += diff.square().sum(dim=1)
    return torch.nan_to_num(out, nan=torch.inf, posinf=torch.inf)


def _distances_from_gram(gram: torch.Tensor) -> torch.Tensor:
    # Exactly symmetric, so that ties (a pair of mutual nearest neighbours) are exact ties.
    gram = (gram + gram.T) / 2
    sq = gram.diagonal()
    dist = sq[:, None] + sq[None, :] - 2 * gram
    # An overflowed norm gives inf or inf - inf; those pairs are certified (recomputed) next.
    return torch.nan_to_num(dist, nan=torch.inf, posinf=torch.inf, neginf=torch.inf)


def pairwise_sq_distances(x: torch.Tensor, center: torch.Tensor | str | None = None) -> torch.Tensor:
    r"""All squared distances :math:`D_{ij} = \|x_i - x_j\|^2`, an ``(n, n)`` float64 tensor,
    each within a few float32 roundings of the exact value, whatever the rows' common offset
    or the outliers among them.

    Computed as :math:`D_{ij} = G_{ii} + G_{jj} - 2 G_{ij}` from the Gram matrix :math:`G`
    of the rows centred at :math:`c`, :math:`a_i = x_i - c`. Distances do not depend on
    :math:`c`, but rounding does: the product's error in :math:`D_{ij}` is of the order of
    the unit roundoff times :math:`(\|a_i\| + \|a_j\|)^2`, so a centre far from two rows
    (a common offset of raw weights, a mean dragged by a huge outlier) loses the digits of
    their distance. Hence exactness by construction, in two steps:

    1. the centre is a data row near the majority (``center=None``: the medoid of a
       float64 sample of coordinates), or ``center="median"`` (the coordinate-wise
       median) or a given ``(d,)`` tensor;
    2. every pair is **certified**: when the amplification
       :math:`(\|a_i\| + \|a_j\|)^2 / D_{ij}` exceeds ``16`` (or the entry overflowed),
       the centre does not suit that pair, and its distance is recomputed in float64 from
       explicit differences (no Gram identity, no cancellation). Certified pairs carry a
       relative error of at most about ``16 * 4`` roundings of the product, which is what
       makes Krum, Multi-Krum, Bulyan, NNM, the geometric median and centered clipping
       select what a float64 reference selects (tests: ``tests/test_exact_distances.py``).

    Pairs of rows that lie close together far from the centre (duplicated attackers,
    a cluster of outliers) are the ones recomputed; honest rows around the centre never
    are. The Gram matrix is accumulated over column blocks in float64 (on CPU through
    NumPy, whose ``a @ a.T`` calls BLAS syrk: half the work of a general product); memory
    is :math:`O(n d)` in blocks, never ``(n, n, d)``. A pair whose float64 distance
    overflows comes out ``inf``. Chapters ``06`` to ``08``.
    """
    check_updates(x)
    x = x.detach()
    n, d = x.shape
    if isinstance(center, str):
        if center != "median":
            raise ValueError(f"center must be None, 'median' or a (d,) tensor, got {center!r}")
        c = coordinate_median(x)
    elif center is not None:
        if center.shape != (d,):
            raise ValueError(f"center must have shape ({d},), got {tuple(center.shape)}")
        c = center
    else:
        c = x[_central_row(x)]
    gram = _block_gram(x, c)
    dist = _distances_from_gram(gram)
    norms = torch.nan_to_num(gram.diagonal(), nan=torch.inf).clamp_min(0).sqrt()
    reach = (norms[:, None] + norms[None, :]).square()
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=1)
    suspect = upper & ~(reach <= _AMPLIFICATION * dist)  # also catches inf, nan and exact zeros
    if bool(suspect.any()):
        i, j = suspect.nonzero(as_tuple=True)
        exact = _direct_sq_distances(x, i, j)
        dist[i, j] = exact
        dist[j, i] = exact
    dist.clamp_min_(0).fill_diagonal_(0)
    return dist
