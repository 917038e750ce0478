"""Distance-based rules select what a float64 reference selects, whatever the common offset,
the outliers and the dtype (audit item 1); centered clipping's radius (item 2); non-finite rows
beyond what a rule tolerates (item 5)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from robustfl_lib import (
    NNM,
    Bulyan,
    CenteredClipping,
    GeometricMedian,
    Krum,
    Mean,
    Median,
    MultiKrum,
    Pipeline,
    TrimmedMean,
    pairwise_sq_distances,
)
from robustfl_lib.aggregators import NonFiniteBeyondTolerance

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- float64 references


def ref_distances(x: torch.Tensor) -> np.ndarray:
    """Squared distances in float64 from explicit differences (no Gram identity)."""
    xd = x.double().numpy()
    return ((xd[:, None, :] - xd[None, :, :]) ** 2).sum(-1)


def ref_krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    d = dist.copy()
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, : len(d) - f - 2].sum(1)


def separated(values: np.ndarray, k: int, rtol: float = 1e-4) -> bool:
    """Whether the k smallest values are separated from the rest (and, for k = 1, from the
    second) by more than ``rtol``: closer calls are rounding ties that no float32 input decides."""
    s = np.sort(values)
    return k >= len(s) or s[k] - s[k - 1] > rtol * max(abs(s[k]), 1e-300)


def updates(seed: int, n: int, d: int, outliers: int, offset: float, scale: float, dtype) -> torch.Tensor:
    """Raw weights (a common part ``offset`` times the honest spread) with ``outliers`` far rows."""
    g = torch.Generator().manual_seed(seed)
    spread = 1e-2
    common = offset * spread * torch.randn(d, generator=g, dtype=torch.float64)
    rows = common + spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    if outliers:
        rows[:outliers] = common + scale * spread * torch.randn(outliers, d, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    return rows[perm].to(dtype)


SPACE = dict(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(7, 16),
    d=st.integers(2, 120),
    offset=st.sampled_from([0.0, 1.0, 10.0, 1e2, 1e3]),
    scale=st.sampled_from([1.0, 10.0, 1e3, 1e6]),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
    data=st.data(),
)


def _draw(seed, n, d, offset, scale, dtype, data):
    f = data.draw(st.integers(1, (n - 3) // 2), label="f")
    outliers = data.draw(st.integers(0, f), label="outliers")
    if dtype == torch.float16:
        scale = min(scale, 1e5)  # float16 stops at 65504
    x = updates(seed, n, d, outliers, offset, scale, dtype)
    assume(bool(torch.isfinite(x).all()))
    return x, f


@PROPERTY
@given(**SPACE)
def test_distances_are_within_rounding_of_the_float64_reference(seed, n, d, offset, scale, dtype, data):
    x, _ = _draw(seed, n, d, offset, scale, dtype, data)
    ref = ref_distances(x)
    got = pairwise_sq_distances(x).numpy()
    # Each distance to its own relative accuracy, the tiny ones included: nothing is lost to
    # the rows' common part or to far outliers.
    assert np.all(np.abs(got - ref) <= 1e-4 * ref + 1e-30), np.max(np.abs(got - ref) / np.maximum(ref, 1e-30))


@PROPERTY
@given(**SPACE)
def test_krum_multikrum_bulyan_nnm_select_what_float64_selects(seed, n, d, offset, scale, dtype, data):
    x, f = _draw(seed, n, d, offset, scale, dtype, data)
    dist = ref_distances(x)
    scores = ref_krum_scores(dist, f)
    if separated(scores, 1):
        k = Krum(f)
        k(x)
        assert int(k.last_info["selected"]) == int(np.argmin(scores))
    m = n - f
    if separated(scores, m):
        mk = MultiKrum(f)
        mk(x)
        assert set(mk.last_info["selected"].tolist()) == set(np.argsort(scores)[:m].tolist())
    # NNM: each row's n - f nearest neighbours (itself included) are the reference's.
    mixed = NNM(f).transform(x, dropped=0).double()
    for i in range(n):
        row = dist[i].copy()
        row[i] = -1.0
        if separated(row, n - f):
            want = x.double()[np.argsort(row)[: n - f]].mean(0)
            tol = 4 * torch.finfo(x.dtype).eps * float(x.double().abs().max()) + 1e-12
            assert torch.allclose(mixed[i], want, rtol=0, atol=tol)
    # Bulyan's selection stage: repeated Krum over the remaining rows.
    if n >= 4 * f + 3:
        remaining, order = list(range(n)), []
        ok = True
        for _ in range(n - 2 * f):
            r = len(remaining)
            k_nn = min(max(r - f - 2, 1), r - 1)
            sub = dist[np.ix_(remaining, remaining)].copy()
            np.fill_diagonal(sub, np.inf)
            sc = np.sort(sub, axis=1)[:, :k_nn].sum(1)
            ok &= separated(sc, 1)
            best = remaining[int(np.argmin(sc))]
            order.append(best)
            remaining.remove(best)
        if ok:
            b = Bulyan(f)
            b(x)
            assert b.last_info["selected"].tolist() == order


def ref_weiszfeld(x: np.ndarray, nu=1e-6, iters=500, tol=1e-10) -> np.ndarray:
    w = np.full(len(x), 1.0 / len(x))
    for _ in range(iters):
        z = w @ x
        beta = 1.0 / np.maximum(np.linalg.norm(x - z, axis=1), nu)
        w_new = beta / beta.sum()
        done = np.abs(w_new - w).sum() < tol
        w = w_new
        if done:
            break
    return w @ x


def ref_centered_clipping(x: np.ndarray, v: np.ndarray, tau: float, iters: int) -> np.ndarray:
    n = len(x)
    for _ in range(iters):
        diff = x - v
        r = np.linalg.norm(diff, axis=1)
        scale = np.where(r > tau, tau / np.maximum(r, 1e-300), 1.0)
        v = v + (diff * scale[:, None]).sum(0) / n
    return v


@PROPERTY
@given(**SPACE)
def test_geometric_median_and_centered_clipping_match_float64(seed, n, d, offset, scale, dtype, data):
    x, _ = _draw(seed, n, d, offset, scale, dtype, data)
    xd = x.double().numpy()
    spread = 1e-2 * np.sqrt(d)  # honest rows lie about this far from each other
    tol = 8 * torch.finfo(x.dtype).eps * float(np.abs(xd).max()) + 1e-3 * spread
    gm = GeometricMedian()(x).double().numpy()
    assert np.linalg.norm(gm - ref_weiszfeld(xd)) <= tol
    cc = CenteredClipping(iterations=3, init="median")
    out = cc(x).double().numpy()
    v0 = Median()(x).double().numpy()
    want = ref_centered_clipping(xd, v0, cc.last_info["tau"], 3)
    assert np.linalg.norm(out - want) <= tol


def test_the_audits_reproductions():
    """Audit item 1: raw weights with a few far outliers, float32. Before the fix Krum picked
    another row than the float64 reference in several of these draws."""
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        w = 0.05 * torch.randn(20000, generator=g)
        x = torch.cat([w + 1e-6 * torch.randn(15, 20000, generator=g), w + 100 * torch.randn(3, 20000, generator=g)])
        k = Krum(4)
        k(x)
        assert int(k.last_info["selected"]) == int(np.argmin(ref_krum_scores(ref_distances(x), 4))), seed
        honest = np.arange(15)
        got = pairwise_sq_distances(x).numpy()[np.ix_(honest, honest)]
        ref = ref_distances(x)[np.ix_(honest, honest)]
        assert np.allclose(got, ref, rtol=1e-4, atol=0)  # honest distances were off by 10-1000x
    for seed in range(8):  # 12 x 5000, offset 10, two outliers
        g = torch.Generator().manual_seed(seed)
        x = torch.cat([10 + 1e-3 * torch.randn(10, 5000, generator=g), 10 + 1e2 * torch.randn(2, 5000, generator=g)])
        k = Krum(2)
        k(x)
        assert int(k.last_info["selected"]) == int(np.argmin(ref_krum_scores(ref_distances(x), 2))), seed
        got = pairwise_sq_distances(x).numpy()[:10, :10]
        assert np.allclose(got, ref_distances(x)[:10, :10], rtol=1e-4, atol=0)


def test_duplicated_rows_are_at_distance_exactly_zero():
    g = torch.Generator().manual_seed(0)
    x = 1e3 + torch.randn(9, 300, generator=g)
    x[5:] = x[5]  # identical attackers
    dist = pairwise_sq_distances(x)
    assert (dist[5:, 5:] == 0).all() and (dist[:5, 5:] > 0).all()


# ---------------------------------------------------------------- centered clipping (item 2)


def test_centered_clipping_radius_does_not_collapse_to_the_mean_when_the_centre_is_far():
    """Karimireddy et al. 2021: the radius is of the order of the honest spread. Measured from a
    far centre (zero, with raw weights or the previous round's aggregate), the old default
    radius put every row inside it and returned exactly the mean."""
    g = torch.Generator().manual_seed(1)
    honest = 5.0 + 0.1 * torch.randn(10, 50, generator=g, dtype=torch.float64)
    attack = honest.mean(0) + 20.0 * torch.ones(3, 50, dtype=torch.float64)  # scaled far away
    x = torch.cat([honest, attack])
    for init in ("zero", "previous"):
        cc = CenteredClipping(init=init, iterations=50)
        out = cc(x)
        tau = cc.last_info["tau"]
        spread = float(torch.cdist(honest, honest).median())
        assert 0.5 * spread <= tau <= 2 * spread
        assert not torch.allclose(out, x.mean(0))
        # The attackers pull 3 * tau / 13 at most: the output stays near the honest mean.
        assert torch.linalg.vector_norm(out - honest.mean(0)) < 0.5 * torch.linalg.vector_norm(x.mean(0) - honest.mean(0))


def test_centered_clipping_equals_the_mean_exactly_when_every_update_is_within_tau():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    v0 = Median()(x)
    reach = float(torch.linalg.vector_norm(x - v0, dim=1).max())
    reach_mean = float(torch.linalg.vector_norm(x - x.mean(0), dim=1).max())
    inside = CenteredClipping(tau=max(reach, reach_mean) * 1.01, iterations=3)
    assert torch.allclose(inside(x), x.mean(0), rtol=0, atol=1e-12)
    outside = CenteredClipping(tau=0.5 * reach_mean, iterations=3)
    assert not torch.allclose(outside(x), x.mean(0), atol=1e-6)


def test_centered_clipping_previous_centre_is_the_last_aggregate():
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(7, 4, generator=g, dtype=torch.float64)
    x2 = x1 + 0.3
    cc = CenteredClipping(tau=0.2, iterations=1, init="previous")
    first = cc(x1)
    second = cc(x2)
    want = ref_centered_clipping(x2.numpy(), first.numpy(), 0.2, 1)
    assert np.allclose(second.numpy(), want, atol=1e-12)


# ---------------------------------------------------------------- non-finite beyond f (item 5)


@pytest.mark.parametrize("make,n,bad", [(lambda: TrimmedMean(1), 7, 2), (lambda: Krum(1), 8, 2),
                                        (lambda: Median(), 7, 4), (lambda: Pipeline(NNM(1), Median()), 7, 2)])
def test_more_nonfinite_rows_than_tolerated_warns_and_says_so(make, n, bad):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 5, generator=g)
    x[:bad] = float("nan")
    rule = make()
    with pytest.warns(NonFiniteBeyondTolerance, match="no longer holds"):
        out = rule(x)
    assert torch.isfinite(out).all()
    assert rule.last_info["nonfinite_beyond_tolerance"] == bad - rule.tolerated(n) > 0
    # Within the tolerance: no warning, and the field says 0.
    x = torch.randn(n, 5, generator=g)
    x[:1] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteBeyondTolerance)
        rule(x)
    assert rule.last_info["nonfinite_beyond_tolerance"] == 0


def test_mean_still_refuses_nonfinite_rows():
    x = torch.randn(4, 3)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not robust"):
        Mean()(x)
