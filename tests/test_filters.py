"""Issue 14, item 3: the filtering aggregators DnC (Shejwalkar & Houmansadr 2021) and SignGuard (Xu et al.
2022). Each is checked against a float64 definition written here from the papers (NumPy, an SVD for DnC's
direction, per-row loops), with the same generator state, so the same coordinates are drawn; then the
properties the rules exist for, requirements and bad input, non-finite rows, seeding and checkpoints,
sample counts and config names."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.cluster import DBSCAN, MeanShift

import robustfl_lib as rfl
from robustfl_lib.aggregators import DnC, NonFiniteBeyondTolerance, Pipeline, SignGuard, get_aggregator
from robustfl_lib.checkpoint import load_checkpoint, load_object_state, object_state, save_checkpoint


def _x(n, d, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ float64 definitions


def dnc_reference(x: np.ndarray, f: int, seed: int, niters: int = 5, c: float = 1.0, b: int = 10_000):
    """Algorithm 2 of the paper, with the library's documented draw of coordinates (per iteration one
    62-bit seed from the generator, then NumPy's choice of b distinct coordinates, sorted) and its
    documented fallback for an empty intersection (the rows in the most good sets). Returns the
    output, the kept rows and whether the intersection was empty."""
    g = _gen(seed)
    n, d = x.shape
    flagged = math.floor(round(c * f, 9))
    if flagged == 0:
        return x.mean(axis=0), list(range(n)), False
    b = min(b, d)
    good_sets = []
    for _ in range(niters if b < d else 1):
        if b < d:
            s = int(torch.randint(0, 2**62, (1,), generator=g))
            r = np.sort(np.random.default_rng(s).choice(d, size=b, replace=False))
        else:
            r = np.arange(d)
        sub = x[:, r]
        centred = sub - sub.mean(axis=0)
        v = np.linalg.svd(centred, full_matrices=False)[2][0]  # top right singular vector
        scores = np.array([float(np.dot(sub[i] - sub.mean(axis=0), v)) ** 2 for i in range(n)])
        good_sets.append(set(np.argsort(scores, kind="stable")[: n - flagged].tolist()))
    kept = sorted(set.intersection(*good_sets))
    empty = not kept
    if empty:
        votes = [sum(i in g for g in good_sets) for i in range(n)]
        kept = [i for i in range(n) if votes[i] == max(votes)]
    return x[kept].mean(axis=0), kept, empty


def signguard_reference(x: np.ndarray, seed: int, lower=0.1, upper=3.0, fraction=0.1, clustering="meanshift"):
    g = _gen(seed)
    n, d = x.shape
    norms = np.array([math.sqrt(float(np.dot(row, row))) for row in x])
    med = float(np.median(norms))
    s1 = {i for i in range(n) if lower <= norms[i] / med <= upper}
    k = max(1, math.ceil(round(fraction * d, 9)))
    start = int(torch.randint(0, d - k + 1, (1,), generator=g))
    block = x[:, start : start + k]
    feat = np.stack([(block > 0).mean(axis=1), (block == 0).mean(axis=1), (block < 0).mean(axis=1)], axis=1)
    top = feat.max(axis=0)
    feat = feat / np.where(top > 0, top, 1.0)
    if clustering == "meanshift":
        dist = cdist(feat, feat)
        m = min(n - 1, max(1, int(0.5 * n) - 1))  # m-th nearest other point
        h = float(np.mean([np.sort(np.delete(dist[i], i))[m - 1] for i in range(n)]))
        labels = MeanShift(bandwidth=h, bin_seeding=True, cluster_all=False).fit(feat).labels_
    else:
        labels = DBSCAN(eps=0.05, min_samples=2).fit(feat).labels_
    values, counts = np.unique(labels[labels >= 0], return_counts=True)
    s2 = {i for i in range(n) if labels[i] == values[np.argmax(counts)]}
    kept = sorted(s1 & s2)
    out = np.mean([x[i] * min(1.0, med / norms[i]) for i in kept], axis=0)
    return out, kept, n - len(s1), n - len(s2)


def _spiked(n, f, d, seed, shift=3.0):
    """n - f standard normal rows and f rows shifted by `shift` on every coordinate (the Byzantine rows,
    first): they stand out along the direction of largest variance on any subset of coordinates."""
    x = _x(n, d, seed)
    x[:f] = x[:f] * 0.5 + shift
    return x


def _signed(n, d, seed, flipped=(0, 1, 2), big=3, small=4):
    """Honest rows with a positive bias (about 58% positive coordinates), some sign-flipped rows, one
    row ten times too long and one a hundred times too short."""
    x = _x(n, d, seed) + 0.2
    x[list(flipped)] *= -1
    x[big] *= 10.0
    x[small] *= 0.01
    return x


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("n,f,d,b,niters,c,seed", [
    (9, 2, 40, 12, 5, 1.0, 0),
    (12, 3, 200, 30, 3, 1.0, 1),
    (10, 2, 25, 10_000, 5, 1.0, 2),  # d <= b: every coordinate, one iteration
    (11, 3, 60, 20, 4, 1.5, 3),      # c f = 4.5: four rows flagged per iteration
    (20, 6, 30, 5, 5, 1.0, 4),       # T c f >= n, but the intersection is not empty
    (6, 2, 50, 3, 5, 1.0, 6),        # an empty intersection: the rows kept in the most iterations
    (6, 2, 50, 3, 5, 1.0, 9),
])
def test_dnc_equals_its_definition_with_the_same_generator_state(n, f, d, b, niters, c, seed):
    x = _x(n, d, seed)
    if n > 6:
        x[:f] += 2.0 * _x(f, d, seed + 100)
    rule = DnC(f, niters=niters, c=c, b=b, generator=_gen(seed))
    out = rule(x)
    expected, kept, empty = dnc_reference(x.numpy(), f, seed, niters, c, b)
    assert rule.last_info["selected"].tolist() == kept
    assert rule.last_info["empty_intersection"] is empty is (n == 6)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-13)
    sel = rule.last_info["selected"]
    torch.testing.assert_close(out, x[sel].mean(dim=0), rtol=1e-12, atol=1e-13)
    w = rule.last_info["weights"]
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12) and bool((w[sel] > 0).all())
    assert rule.last_info["iterations"] == (niters if b < d else 1)


def test_dnc_scores_are_the_squared_projections_on_the_top_singular_vector():
    x = _x(8, 30, 5)
    x[0] += 4.0
    rule = DnC(1, b=30)  # every coordinate, one iteration: the scores are the definition's
    rule(x)
    xn = x.numpy()
    centred = xn - xn.mean(axis=0)
    v = np.linalg.svd(centred)[2][0]
    np.testing.assert_allclose(rule.last_info["scores"].numpy(), (centred @ v) ** 2, rtol=1e-10)
    assert rule.last_info["selected"].tolist() == list(range(1, 8))


@pytest.mark.parametrize("seed,clustering", [(0, "meanshift"), (1, "meanshift"), (2, "dbscan")])
def test_signguard_equals_its_definition_with_the_same_generator_state(seed, clustering):
    x = _signed(15, 2000, seed)
    rule = SignGuard(clustering=clustering, generator=_gen(seed))
    out = rule(x)
    expected, kept, norm_rej, sign_rej = signguard_reference(x.numpy(), seed, clustering=clustering)
    assert rule.last_info["selected"].tolist() == kept and rule.last_info["fallback"] is None
    assert (rule.last_info["norm_rejected"], rule.last_info["sign_rejected"]) == (norm_rej, sign_rej)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(rule.last_info["weights"].to(x.dtype) @ x, out, rtol=1e-12, atol=1e-13)


def test_signguard_removes_flipped_signs_and_bad_norms_and_clips_to_the_median_norm():
    x = _signed(15, 2000, 7)
    rule = SignGuard(generator=_gen(7))
    rule(x)
    kept = set(rule.last_info["selected"].tolist())
    assert kept.isdisjoint({0, 1, 2, 3, 4}) and len(kept) >= 8
    assert rule.last_info["norm_rejected"] == 2  # the long and the short row
    norms = x.norm(dim=1)
    assert math.isclose(rule.last_info["norm_threshold"], float(norms.median()), rel_tol=1e-12)  # n odd
    # each kept row enters with its clipping factor min(1, M / ||x_i||) over |S|
    w = rule.last_info["weights"]
    m = rule.last_info["norm_threshold"]
    for i in kept:
        assert math.isclose(float(w[i]), min(1.0, m / float(norms[i])) / len(kept), rel_tol=1e-12)


def test_signguard_bandwidth_is_scikit_learns_estimate_without_its_small_n_collapse():
    from sklearn.cluster import estimate_bandwidth

    from robustfl_lib.aggregators.filters import _bandwidth

    rng = np.random.default_rng(0)
    for n in (4, 5, 9, 30):
        feat = rng.random((n, 3))
        assert math.isclose(_bandwidth(feat, 0.5), estimate_bandwidth(feat, quantile=0.5), rel_tol=1e-12)
    for n in (2, 3):  # scikit-learn's counts the point itself as its only neighbour here and gives 0
        feat = rng.random((n, 3))
        nearest = np.sort(cdist(feat, feat), axis=1)[:, 1]
        assert estimate_bandwidth(feat, quantile=0.5) == 0.0
        assert math.isclose(_bandwidth(feat, 0.5), float(nearest.mean()), rel_tol=1e-12)


# ------------------------------------------------------------------ what the rules are for


@pytest.mark.parametrize("seed", range(3))
def test_dnc_removes_outliers_along_the_top_singular_direction(seed):
    n, f = 15, 3
    x = _spiked(n, f, 500, seed)
    rule = DnC(f, b=100, generator=_gen(seed))
    out = rule(x)
    sel = rule.last_info["selected"]
    assert set(sel.tolist()).isdisjoint(range(f)) and len(sel) >= n - 2 * f
    torch.testing.assert_close(out, x[sel].mean(dim=0), rtol=1e-12, atol=1e-13)
    assert float((out - x[f:].mean(dim=0)).abs().max()) < 0.5  # near the honest mean, far from the shift
    assert bool((rule.last_info["scores"][:f] > rule.last_info["scores"][f:].max()).all())


def test_without_outliers_and_f_zero_dnc_is_the_mean_and_draws_nothing():
    x = _x(9, 50, 3)
    g = _gen(11)
    before = g.get_state()
    rule = DnC(0, b=10, generator=g)
    torch.testing.assert_close(rule(x), x.mean(dim=0), rtol=1e-12, atol=1e-13)
    assert rule.last_info["selected"].tolist() == list(range(9)) and rule.last_info["iterations"] == 0
    assert torch.equal(g.get_state(), before)
    # c f < 1 flags nothing either
    torch.testing.assert_close(DnC(1, c=0.5, b=10)(x), x.mean(dim=0), rtol=1e-12, atol=1e-13)


def test_signguard_on_alike_updates_is_the_mean():
    # equal norms and one sign pattern: nothing to filter, nothing to clip
    pattern = torch.where(_x(1, 300, 1) > 0, 1.0, -1.0).double()
    x = _x(10, 300, 2).abs() * pattern
    x = x / x.norm(dim=1, keepdim=True)
    rule = SignGuard()
    out = rule(x)
    assert rule.last_info["selected"].tolist() == list(range(10)) and rule.last_info["clusters"] == 1
    torch.testing.assert_close(out, x.mean(dim=0), rtol=1e-12, atol=1e-13)


def test_signguard_falls_back_to_the_norm_filter_then_to_every_update():
    # the largest sign cluster (rows 0-2) has no norm within [0.1, 3] of the median: keep S1 = {3, 4}
    ones = torch.ones(1, 40, dtype=torch.float64)
    x = torch.cat([ones * s for s in (0.001, 50.0, 5000.0)] + [-ones / math.sqrt(40)] * 2)
    rule = SignGuard()
    out = rule(x)
    assert rule.last_info["fallback"] == "norm_filter" and rule.last_info["selected"].tolist() == [3, 4]
    torch.testing.assert_close(out, x[3:].mean(dim=0), rtol=1e-12, atol=1e-13)
    # no norm passes (n even, upper < 2): every update, clipped to the median norm M = 2
    x = torch.cat([torch.zeros(2, 6, dtype=torch.float64), 4.0 * torch.eye(6, dtype=torch.float64)[:2]])
    rule = SignGuard(upper=1.5)
    out = rule(x)
    assert rule.last_info["fallback"] == "all" and rule.last_info["norm_threshold"] == 2.0
    torch.testing.assert_close(out, (x[2] + x[3]) / 2 / 4, rtol=1e-12, atol=1e-13)


def test_signguard_with_a_zero_median_norm_keeps_the_zero_updates():
    x = torch.zeros(5, 8, dtype=torch.float64)
    x[3:] = _x(2, 8, 1)
    rule = SignGuard()
    out = rule(x)
    assert torch.equal(out, torch.zeros(8, dtype=torch.float64)) and set(rule.last_info["selected"].tolist()) <= {0, 1, 2}


# ------------------------------------------------------------------ requirements and bad input


def test_dnc_requirement_names_n_f_and_c():
    with pytest.raises(ValueError, match=r"DnC\(f=2, c=1\) needs n > 2f = 4 and n > floor\(c f\) = 2 updates, got n=4"):
        DnC(2)(_x(4, 3))
    with pytest.raises(ValueError, match=r"n > floor\(c f\) = 5 updates, got n=5"):
        DnC(1, c=5.0)(_x(5, 3))
    assert torch.isfinite(DnC(2)(_x(5, 3))).all()  # n = 5 > 4 is enough


@pytest.mark.parametrize("make,match", [
    (lambda: DnC(-1), "f"), (lambda: DnC(1.5), "f"), (lambda: DnC(None), "f"), (lambda: DnC(True), "f"),
    (lambda: DnC(1, niters=0), "niters"), (lambda: DnC(1, niters=True), "niters"),
    (lambda: DnC(1, c=0), "filtering fraction"), (lambda: DnC(1, c=math.nan), "c"),
    (lambda: DnC(1, c=math.inf), "filtering fraction"), (lambda: DnC(1, c="1"), "c"),
    (lambda: DnC(1, b=0), "coordinates"), (lambda: DnC(1, b=2.5), "coordinates"),
    (lambda: DnC(1, weighted=1), "weighted"), (lambda: DnC(1, generator=np.random.default_rng(0)), "generator"),
    (lambda: SignGuard(lower=-0.1), "lower"), (lambda: SignGuard(lower=1.5), "lower"),
    (lambda: SignGuard(upper=0.5), "upper"), (lambda: SignGuard(upper=math.nan), "upper"),
    (lambda: SignGuard(fraction=0), "fraction"), (lambda: SignGuard(fraction=1.5), "fraction"),
    (lambda: SignGuard(clustering="kmeans"), "clustering"), (lambda: SignGuard(quantile=0), "quantile"),
    (lambda: SignGuard(eps=0), "eps"), (lambda: SignGuard(min_samples=0), "min_samples"),
    (lambda: SignGuard(weighted="no"), "weighted"), (lambda: SignGuard(generator=0), "generator"),
])
def test_bad_arguments_raise_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make", [lambda: DnC(1), lambda: SignGuard(), lambda: get_aggregator("bucketing+dnc", f=1)])
@pytest.mark.parametrize("bad", [torch.zeros(0, 3), torch.zeros(3, 0), torch.zeros(4), torch.zeros(5, 3, dtype=torch.long)])
def test_bad_inputs_raise(make, bad):
    with pytest.raises(ValueError):
        make()(bad)


def test_non_tensor_input_and_bad_weights_raise():
    for rule in (DnC(1), SignGuard()):
        with pytest.raises(TypeError):
            rule([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        with pytest.raises(ValueError, match="weights"):
            rule(_x(5, 3), weights=torch.ones(4))
        with pytest.raises(ValueError, match="weights"):
            rule(_x(5, 3), weights=-torch.ones(5))


# ------------------------------------------------------------------ non-finite rows


@pytest.mark.parametrize("make", [lambda f: DnC(f, b=8, generator=_gen(5)), lambda f: SignGuard(generator=_gen(5))])
def test_nonfinite_rows_give_the_rule_on_the_finite_rows(make):
    x = _signed(12, 400, 9)
    x[[2, 7]] = torch.tensor([torch.nan, torch.inf, -torch.inf] + [0.0] * 397, dtype=x.dtype)
    keep = [i for i in range(12) if i not in (2, 7)]
    rule = make(3)
    out = rule(x)
    assert torch.isfinite(out).all() and rule.last_info["dropped"] == [2, 7]
    expected_rule = make(1)  # two certainly-Byzantine rows dropped: f shrinks by two
    torch.testing.assert_close(out, expected_rule(x[keep]), rtol=1e-12, atol=1e-13)
    # the kept rows in the input's numbering
    assert rule.last_info["selected"].tolist() == [keep[i] for i in expected_rule.last_info["selected"].tolist()]
    assert rule.last_info["weights"].shape == (12,) and float(rule.last_info["weights"][[2, 7]].abs().sum()) == 0


def test_more_nonfinite_rows_than_tolerated_warn_and_stay_finite():
    x = _x(9, 20, 4)
    x[[0, 1]] = torch.nan
    with pytest.warns(NonFiniteBeyondTolerance):
        out = DnC(1)(x)
    assert torch.isfinite(out).all()
    x[2:5] = torch.inf  # five of nine: a Byzantine majority, beyond SignGuard's honest-majority premise
    rule = SignGuard()
    with pytest.warns(NonFiniteBeyondTolerance):
        out = rule(x)
    assert torch.isfinite(out).all() and rule.last_info["nonfinite_beyond_tolerance"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x[2:5] = 0.5
        SignGuard()(x)  # two of nine: within the tolerance, no warning


def test_huge_finite_rows_do_not_overflow_and_tiny_updates_do_not_underflow():
    x = _x(9, 50, 6)
    x[0] = 1e300
    for rule in (DnC(1), SignGuard()):
        out = rule(x)
        assert torch.isfinite(out).all() and 0 not in rule.last_info["selected"].tolist()
    x = _spiked(9, 1, 50, 6)
    for make in (lambda: DnC(1, b=20), lambda: SignGuard()):  # both rules are scale-invariant
        a, b = make(), make()
        out = a(x * 1e-200)
        b(x)
        assert a.last_info["selected"].tolist() == b.last_info["selected"].tolist() and bool(out.abs().max() > 0)


# ------------------------------------------------------------------ seeding and state


@pytest.mark.parametrize("make", [lambda g: DnC(2, b=10, generator=g), lambda g: SignGuard(fraction=0.05, generator=g)])
def test_same_seed_same_output_and_the_generator_moves_on(make):
    x = _signed(12, 400, 3)
    a, b = make(_gen(1)), make(_gen(1))
    first = a(x)
    assert torch.equal(first, b(x)) and a.last_info["selected"].tolist() == b.last_info["selected"].tolist()
    others = [make(_gen(s))(x) for s in range(2, 8)] + [a(x) for _ in range(3)]
    assert any(not torch.equal(first, o) for o in others)  # other coordinates, another kept set


@pytest.mark.parametrize("make", [lambda: DnC(2, b=10), lambda: SignGuard()])
def test_the_default_generator_is_the_rules_own_not_torchs_global_one(make):
    x = _signed(12, 400, 4)
    state = torch.get_rng_state()
    a = make()(x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    assert torch.equal(a, make()(x))


@pytest.mark.parametrize("build", [
    lambda: DnC(2, b=10, generator=_gen(7)),
    lambda: SignGuard(fraction=0.05, generator=_gen(7)),
    lambda: Pipeline(rfl.Bucketing(2, generator=_gen(8)), DnC(1, b=10, generator=_gen(7))),
])
def test_state_round_trips_through_a_checkpoint(build, tmp_path):
    x = _signed(12, 400, 5).float()
    a = build()
    a(x)
    save_checkpoint(tmp_path / "c.pt", {"aggregator": object_state(a, "aggregator")})
    expected = [a(x) for _ in range(3)]
    fresh = build()
    load_object_state(fresh, load_checkpoint(tmp_path / "c.pt")["aggregator"], "aggregator")
    assert all(torch.equal(e, fresh(x)) for e in expected)


# ------------------------------------------------------------------ sample counts, dtypes, names


def test_weights_are_ignored_unless_weighted_then_weight_the_kept_mean():
    x = _signed(12, 400, 6)
    counts = torch.arange(1.0, 13.0)
    for make in (lambda **kw: DnC(2, b=20, generator=_gen(2), **kw), lambda **kw: SignGuard(generator=_gen(2), **kw)):
        assert torch.equal(make()(x, weights=counts), make()(x))
        rule = make(weighted=True)
        out = rule(x, weights=counts)
        sel = rule.last_info["selected"]
        clip = torch.clamp(rule.last_info.get("norm_threshold", math.inf) / x.norm(dim=1), max=1.0)
        p = counts.double()[sel] * clip[sel]
        torch.testing.assert_close(out, (p[:, None] * x[sel]).sum(dim=0) / counts.double()[sel].sum(),
                                   rtol=1e-12, atol=1e-13)


def test_float32_in_float32_out_close_to_float64():
    x = _spiked(15, 3, 300, 8)
    for make in (lambda: DnC(3, b=50, generator=_gen(0)), lambda: SignGuard(generator=_gen(0))):
        a, b = make(), make()
        out32, out64 = a(x.float()), b(x)
        assert out32.dtype == torch.float32
        assert a.last_info["selected"].tolist() == b.last_info["selected"].tolist()
        torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-5)


def test_config_names_exports_and_composition_with_pre_aggregation():
    assert rfl.AGGREGATORS["dnc"] is DnC is rfl.DnC and rfl.AGGREGATORS["signguard"] is SignGuard is rfl.SignGuard
    from robustfl_lib.aggregators import filters

    assert filters.DnC is DnC and filters.SignGuard is SignGuard
    rule = get_aggregator("dnc", f=2, b=50)
    assert isinstance(rule, DnC) and rule.f == 2 and rule.b == 50
    assert isinstance(get_aggregator("signguard", f=2), SignGuard)  # takes no f
    x = _x(12, 40, 9, dtype=torch.float32)
    for spec in ("bucketing+dnc", "arc+dnc", "nnm+dnc", "bucketing+signguard", "arc+nnm+signguard"):
        rule = get_aggregator(spec, f=2)
        out = rule(x)
        assert out.shape == (40,) and out.dtype == torch.float32 and torch.isfinite(out).all(), spec
        assert set(rule.last_info["selected"].tolist()) <= set(range(12)), spec
    # Bucketing passes f on: DnC(f=3) on 6 bucket means needs 6 > 6
    with pytest.raises(ValueError, match=r"6 bucket means.*DnC\(f=3"):
        get_aggregator("bucketing+dnc", f=3)(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_kept_set():
    x = _signed(15, 2000, 11)
    for make in (lambda: DnC(3, b=100, generator=_gen(3)), lambda: SignGuard(generator=_gen(3))):
        a, b = make(), make()
        out_cpu, out_gpu = a(x), b(x.cuda())
        assert out_gpu.device.type == "cuda"
        assert a.last_info["selected"].tolist() == b.last_info["selected"].cpu().tolist()
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-10, atol=1e-12)
