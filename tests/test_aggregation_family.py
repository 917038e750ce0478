"""Issue 14, library part A: the aggregation package's layout, pre-aggregation by Bucketing and ARC,
and ByzFL's rules MDA, MoNNA, Meamed, CAF, SMEA. Each rule is checked against a direct float64
definition (brute force over subsets, a loop per coordinate), for permutation invariance, its
requirements and bad input, non-finite rows, seeded state and checkpoints; against ByzFL when
``byzfl`` is installed."""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest
import torch

import robustfl_lib as rfl
from robustfl_lib.aggregators import (
    ARC,
    CAF,
    MDA,
    SMEA,
    Bucketing,
    CenteredClipping,
    Krum,
    Meamed,
    Median,
    MoNNA,
    MultiKrum,
    NNM,
    Pipeline,
    TrimmedMean,
    get_aggregator,
)
from robustfl_lib.checkpoint import load_checkpoint, load_object_state, object_state, save_checkpoint
from robustfl_lib.peers import import_byzfl

NEW_RULES = {"mda": MDA, "monna": MoNNA, "meamed": Meamed, "caf": CAF, "smea": SMEA}


def _x(n, d, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------ layout (item 7)


def test_aggregation_is_a_package_of_families_and_every_old_name_still_imports():
    fam = {
        "base": ["Aggregator", "RobustAggregator", "NonFiniteBeyondTolerance", "Pipeline", "get_aggregator",
                 "aggregate_states", "AGGREGATORS"],
        "coordinatewise": ["Mean", "Median", "TrimmedMean", "Meamed"],
        "distance": ["Krum", "MultiKrum", "Bulyan", "MDA", "MoNNA", "krum_scores"],
        "iterative": ["GeometricMedian", "CenteredClipping", "spread_radius"],
        "spectral": ["SMEA", "CAF"],
        "preaggregation": ["PreAggregator", "NNM", "Clipping", "Bucketing", "ARC", "PRE_AGGREGATORS"],
    }
    pkg = importlib.import_module("robustfl_lib.aggregators")
    assert hasattr(pkg, "__path__"), "robustfl_lib.aggregators is a package"
    for module, names in fam.items():
        mod = importlib.import_module(f"robustfl_lib.aggregators.{module}")
        for name in names:
            assert getattr(mod, name) is getattr(pkg, name) is getattr(rfl, name), (module, name)
    old = importlib.import_module("robustfl_lib.preaggregation")  # the alias module
    for name in ("PreAggregator", "NNM", "Clipping", "PRE_AGGREGATORS", "check_f", "Bucketing", "ARC"):
        assert getattr(old, name) is getattr(importlib.import_module("robustfl_lib.aggregators.preaggregation"), name)
    # the registry keeps its old names in their old order, then the new ones
    assert list(rfl.AGGREGATORS)[:8] == ["mean", "median", "trimmed_mean", "krum", "multi_krum",
                                         "geometric_median", "centered_clipping", "bulyan"]
    for name, cls in NEW_RULES.items():
        assert rfl.AGGREGATORS[name] is cls and isinstance(get_aggregator(name, f=1), cls)
    assert {"nnm", "clipping", "bucketing", "arc"} <= set(rfl.PRE_AGGREGATORS)


def test_names_compose_with_bucketing_and_arc():
    p = get_aggregator("bucketing+cc", f=1)
    assert isinstance(p, Pipeline) and isinstance(p.steps[0], Bucketing) and isinstance(p.steps[1], CenteredClipping)
    p = get_aggregator("arc+nnm+trimmed_mean", f=2)
    assert [type(s) for s in p.steps] == [ARC, NNM, TrimmedMean] and [s.f for s in p.steps] == [2, 2, 2]
    p = get_aggregator("bucketing+krum", f=1)
    assert [type(s) for s in p.steps] == [Bucketing, Krum] and p.steps[1].f == 1
    x = _x(12, 5, dtype=torch.float32)
    for spec in ("bucketing+cc", "arc+nnm+trimmed_mean", "bucketing+krum", "arc+mda", "bucketing+smea"):
        out = get_aggregator(spec, f=1)(x)
        assert out.shape == (5,) and out.dtype == torch.float32 and torch.isfinite(out).all(), spec
    with pytest.raises(ValueError, match="pre-aggregator"):
        get_aggregator("buckets+median", f=1)


# ------------------------------------------------------------------ exactness against direct definitions


def _brute_subsets(x, f, key):
    """The mean of the n - f subset minimising key(rows), searched in itertools order (first minimum wins)."""
    n = len(x)
    best, best_val = None, math.inf
    for s in itertools.combinations(range(n), n - f):
        v = key(x[list(s)])
        if v < best_val:
            best, best_val = s, v
    return x[list(best)].mean(axis=0), best


def _diameter(rows):
    return max(np.linalg.norm(a - b) for a, b in itertools.combinations(rows, 2))


def _max_eig(rows):
    c = rows - rows.mean(axis=0)
    return np.linalg.eigvalsh(c.T @ c / len(rows))[-1]


@pytest.mark.parametrize("n,f,d,seed", [(5, 1, 3, 0), (7, 2, 4, 1), (8, 3, 2, 2), (9, 2, 12, 3)])
def test_mda_and_smea_equal_brute_force_over_all_subsets(n, f, d, seed):
    x = _x(n, d, seed)
    x[:f] += 3.0 * _x(f, d, seed + 100)  # some spread-out rows, so the subsets differ
    xn = x.numpy()
    for rule, key in ((MDA(f), _diameter), (SMEA(f), _max_eig)):
        expected, kept = _brute_subsets(xn, f, key)
        out = rule(x)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
        assert rule.last_info["selected"].tolist() == list(kept)
        assert rule.last_info["subsets"] == math.comb(n, f)


@pytest.mark.parametrize("seed", range(3))
def test_smea_pruned_search_equals_the_full_search_and_prunes(seed):
    x = _x(14, 6, seed)
    x[:2] *= 3.0
    rule = SMEA(3)
    out = rule(x)
    expected, kept = _brute_subsets(x.numpy(), 3, _max_eig)
    assert rule.last_info["selected"].tolist() == list(kept)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert math.isclose(rule.last_info["eigenvalue"], _max_eig(x.numpy()[list(kept)]), rel_tol=1e-9)
    assert rule.last_info["eigendecompositions"] < rule.last_info["subsets"] == math.comb(14, 3)


def test_mda_reports_the_minimum_diameter():
    x = _x(7, 3, 5)
    rule = MDA(2)
    rule(x)
    _, kept = _brute_subsets(x.numpy(), 2, _diameter)
    assert math.isclose(rule.last_info["diameter"], _diameter(x.numpy()[list(kept)]), rel_tol=1e-9)


def test_mda_ties_go_to_the_first_kept_subset_in_lexicographic_order():
    # four corners of a square and its centre: every subset of four has diameter sqrt(2)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    rule = MDA(1)
    rule(x)
    _, kept = _brute_subsets(x.numpy(), 1, _diameter)
    assert rule.last_info["selected"].tolist() == list(kept) == [0, 1, 2, 3]


def _meamed_loop(x, f):
    n, d = x.shape
    out = np.empty(d)
    for k in range(d):
        col = x[:, k]
        med = np.median(col)
        out[k] = col[np.argsort(np.abs(col - med), kind="stable")[: n - f]].mean()
    return out


@pytest.mark.parametrize("n,f", [(5, 1), (6, 2), (9, 4), (10, 3), (4, 0)])
def test_meamed_equals_a_loop_over_coordinates(n, f):
    x = _x(n, 40, n + f)
    x[0] *= 50.0
    out = Meamed(f)(x)
    np.testing.assert_allclose(out.numpy(), _meamed_loop(x.numpy(), f), rtol=1e-12, atol=1e-12)
    # float32 in, float32 out, equal to the float64 definition up to float32 rounding
    out32 = Meamed(f)(x.float())
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), _meamed_loop(x.float().double().numpy(), f), rtol=1e-5, atol=1e-5)


def test_meamed_kept_fraction_and_tie_convention():
    x = torch.tensor([[0.0], [1.0], [2.0]])
    # 0 and 2 are equally close to the median 1: the documented tie-break keeps the smaller values
    assert Meamed(1)(x).item() == 0.5
    rule = Meamed(1)
    rule(_x(7, 30, 3))
    kf = rule.last_info["kept_fraction"]
    assert kf.shape == (7,) and math.isclose(float(kf.sum()), 6.0, rel_tol=1e-12)


@pytest.mark.parametrize("idx", [0, 3])
def test_monna_is_the_mean_of_the_nearest_neighbours_of_the_trusted_row(idx):
    x = _x(9, 6, 4)
    f = 3
    xn = x.numpy()
    near = np.argsort(((xn - xn[idx]) ** 2).sum(axis=1), kind="stable")[: 9 - f]
    rule = MoNNA(f, idx=idx)
    out = rule(x)
    np.testing.assert_allclose(out.numpy(), xn[near].mean(axis=0), rtol=1e-12)
    assert sorted(rule.last_info["selected"].tolist()) == sorted(near.tolist())
    assert idx in rule.last_info["selected"].tolist()


def _caf_reference(x, f):
    """ByzFL's CAF loop in float64 with an exact eigenpair from the d x d covariance."""
    n = len(x)
    c = np.ones(n)
    best, best_lam = None, math.inf
    while c.sum() > n - 2 * f:
        mu = (c[:, None] * x).sum(axis=0) / c.sum()
        diffs = x - mu
        cov = (c[:, None, None] * diffs[:, :, None] * diffs[:, None, :]).sum(axis=0) / c.sum()
        evals, evecs = np.linalg.eigh(cov)
        if evals[-1] < best_lam:
            best, best_lam = mu, evals[-1]
        tau = (diffs @ evecs[:, -1]) ** 2
        c = c * (1 - tau / tau.max())
    return best, best_lam


@pytest.mark.parametrize("n,f,d,seed", [(7, 1, 3, 0), (9, 2, 4, 1), (11, 4, 5, 2), (10, 3, 2, 3)])
def test_caf_equals_its_loop_with_an_exact_eigenpair(n, f, d, seed):
    x = _x(n, d, seed)
    x[:f] += torch.tensor([6.0] + [0.0] * (d - 1), dtype=torch.float64)  # a shifted group along one axis
    expected, lam = _caf_reference(x.numpy(), f)
    rule = CAF(f)
    out = rule(x)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-10)
    assert math.isclose(rule.last_info["eigenvalue"], lam, rel_tol=1e-8)
    torch.testing.assert_close(rule.last_info["weights"].to(x.dtype) @ x, out, rtol=1e-10, atol=1e-12)


def test_rules_with_f_zero_are_the_mean_and_caf_stops_on_identical_rows():
    x = _x(6, 4, 9)
    for cls in (MDA, SMEA, CAF, Meamed, MoNNA):
        torch.testing.assert_close(cls(0)(x), x.mean(dim=0), rtol=1e-12, atol=1e-12)
    same = torch.ones(5, 3)
    rule = CAF(2)
    torch.testing.assert_close(rule(same), torch.ones(3))  # no 0/0: every point is at the mean
    assert rule.last_info["iterations"] == 1 and rule.last_info["eigenvalue"] == 0.0


# ------------------------------------------------------------------ invariances, requirements, non-finite rows


@pytest.mark.parametrize("name", ["mda", "meamed", "caf", "smea"])
def test_permutation_invariance(name):
    x = _x(9, 7, 11)
    x[:2] *= 4.0
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(5))
    a, b = get_aggregator(name, f=2)(x), get_aggregator(name, f=2)(x[perm])
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_monna_follows_its_trusted_row_under_permutation():
    x = _x(9, 7, 12)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(6))
    pos = int((perm == 4).nonzero())
    torch.testing.assert_close(MoNNA(2, idx=4)(x), MoNNA(2, idx=pos)(x[perm]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [MDA, MoNNA, Meamed, CAF, SMEA, ARC])
def test_requirement_n_greater_than_2f_raises_naming_n_and_f(cls):
    x = _x(6, 3)
    rule = cls(3)
    with pytest.raises(ValueError, match=r"f=3.*n > 2f = 6.*n=6"):
        rule(x)
    cls(2)(x)  # n = 6 > 4 is enough


@pytest.mark.parametrize("cls", [MDA, MoNNA, Meamed, CAF, SMEA, ARC])
@pytest.mark.parametrize("bad", [-1, 1.5, None, True])
def test_f_must_be_a_non_negative_integer(cls, bad):
    with pytest.raises(ValueError, match="f"):
        cls(bad)


@pytest.mark.parametrize("make", [lambda: MDA(1), lambda: SMEA(1), lambda: CAF(1), lambda: Meamed(1),
                                  lambda: MoNNA(1), lambda: Pipeline(ARC(1), Median()),
                                  lambda: Pipeline(Bucketing(2), Median())])
@pytest.mark.parametrize("bad", [torch.zeros(0, 3), torch.zeros(3, 0), torch.zeros(4), torch.zeros(5, 3, dtype=torch.long)])
def test_bad_inputs_raise(make, bad):
    with pytest.raises(ValueError):
        make()(bad)


def test_subset_search_is_bounded_and_other_arguments_are_checked():
    x = _x(12, 3)
    for cls in (MDA, SMEA):
        with pytest.raises(ValueError, match=r"C\(n, f\) = 495 subsets, more than max_subsets=100"):
            cls(4, max_subsets=100)(x)
        cls(4, max_subsets=495)(x)
        with pytest.raises(ValueError, match="max_subsets"):
            cls(1, max_subsets=0)
    with pytest.raises(ValueError, match="idx"):
        MoNNA(1, idx=-1)
    with pytest.raises(ValueError, match=r"idx=7.*n=7"):
        MoNNA(1, idx=7)(_x(7, 3))
    with pytest.raises(ValueError, match="max_iter"):
        CAF(1, max_iter=0)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="bucket size"):
            Bucketing(bad)
    with pytest.raises(ValueError, match="generator"):
        Bucketing(2, generator=np.random.default_rng(0))


@pytest.mark.parametrize("name", ["mda", "monna", "meamed", "caf", "smea"])
def test_nonfinite_rows_up_to_f_give_the_rule_on_the_finite_rows(name):
    x = _x(10, 6, 21)
    x[[2, 7]] = torch.tensor([torch.nan, torch.inf, -torch.inf, 0.0, 1.0, 2.0], dtype=x.dtype)
    keep = [i for i in range(10) if i not in (2, 7)]
    rule = get_aggregator(name, f=3)
    out = rule(x)
    assert torch.isfinite(out).all() and rule.last_info["dropped"] == [2, 7]
    # two certainly-Byzantine rows dropped: at most one Byzantine row remains among the eight
    expected = get_aggregator(name, f=1)(x[keep])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_monna_trusted_row_must_be_finite_and_keeps_its_identity_when_rows_drop():
    x = _x(8, 4, 2)
    x[1] = torch.nan
    with pytest.raises(ValueError, match="trusted row idx=1"):
        MoNNA(2, idx=1)(x)
    keep = [0, 2, 3, 4, 5, 6, 7]
    torch.testing.assert_close(MoNNA(2, idx=5)(x), MoNNA(1, idx=4)(x[keep]), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ Bucketing


def test_bucketing_averages_random_buckets_of_s_including_the_last_short_one():
    x = _x(7, 4, 1)
    rows = Bucketing(3, generator=torch.Generator().manual_seed(42))(x)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(42))
    expected = torch.stack([x[perm[:3]].mean(0), x[perm[3:6]].mean(0), x[perm[6:]].mean(0)])
    torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-12)
    assert Bucketing(3).rows_out(7) == 3 and Bucketing(2).rows_out(8) == 4


@pytest.mark.parametrize("inner", [Median(), TrimmedMean(2), Krum(2), Meamed(2), MDA(2), SMEA(2)])
def test_bucketing_with_s_1_equals_the_inner_rule(inner):
    x = _x(9, 5, 8)
    out = Pipeline(Bucketing(1, generator=torch.Generator().manual_seed(3)), inner)(x)
    if isinstance(inner, (MDA, SMEA)):  # a weighted sum: shuffled rows add up in another order
        torch.testing.assert_close(out, inner(x), rtol=1e-13, atol=1e-15)
    else:  # sorts and selections: bit for bit
        assert torch.equal(out, inner(x))


def test_bucketing_is_seeded_stateful_and_round_trips_through_a_checkpoint(tmp_path):
    x = _x(10, 6, 3, dtype=torch.float32)

    def build():
        return Pipeline(Bucketing(2, generator=torch.Generator().manual_seed(7)), CenteredClipping(init="previous"))

    a, b = build(), build()
    first = a(x)
    assert torch.equal(first, b(x))  # same seed, same buckets
    assert not torch.equal(a.steps[0](x), Bucketing(2, generator=torch.Generator().manual_seed(7))(x))  # state moved on
    save_checkpoint(tmp_path / "c.pt", {"aggregator": object_state(a, "aggregator")})
    expected = [a(x) for _ in range(3)]
    fresh = build()
    load_object_state(fresh, load_checkpoint(tmp_path / "c.pt")["aggregator"], "aggregator")
    assert all(torch.equal(e, fresh(x)) for e in expected)
    # without the restored state the next buckets differ
    assert not torch.equal(build()(x), expected[0])


def test_bucketing_with_the_global_generator_follows_torch_manual_seed():
    x = _x(8, 3, 4)
    torch.manual_seed(123)
    a = get_aggregator("bucketing+mean")(x)
    torch.manual_seed(123)
    assert torch.equal(a, get_aggregator("bucketing+mean")(x))


def test_bucketing_passes_f_on_and_maps_the_rule_info_back_to_clients():
    x = _x(10, 4, 5)
    x[0] += 100.0
    rule = Pipeline(Bucketing(2, generator=torch.Generator().manual_seed(1)), MultiKrum(1, m=2))
    out = rule(x)
    info = rule.last_info
    # two buckets of two clients each were averaged: four clients, weight 1/4 each
    assert len(info["selected"]) == 4 and 0 not in info["selected"].tolist()
    torch.testing.assert_close(x[info["selected"]].mean(dim=0), out, rtol=1e-12, atol=1e-12)
    assert info["scores"].shape == (10,) and info["pre"][0] == {"name": "Bucketing", "buckets": 5}
    # each client's weight in a weighted-average output: M^T w
    rule = Pipeline(Bucketing(2, generator=torch.Generator().manual_seed(1)), MDA(1))
    out = rule(x)
    w = rule.last_info["weights"]
    assert w.shape == (10,) and math.isclose(float(w.sum()), 1.0, rel_tol=1e-12) and w[0] == 0
    torch.testing.assert_close(w.to(x.dtype) @ x, out, rtol=1e-10, atol=1e-12)
    # f goes on unchanged: Krum(2) on 5 bucket means needs 5 > 6
    with pytest.raises(ValueError, match=r"5 bucket means.*Krum\(f=2\)"):
        get_aggregator("bucketing+krum", f=2)(x)
    # a non-finite row is dropped before bucketing (f shrinks by one)
    x[3] = torch.inf
    rule = get_aggregator("bucketing+krum", f=1)
    assert torch.isfinite(rule(x)).all() and rule.last_info["dropped"] == [3]


def test_bucketing_rule_outputs_are_finite_in_an_fl_round_shape():
    x = _x(20, 50, 6, dtype=torch.float32)
    for spec in ("bucketing+cc", "bucketing+median", "bucketing+caf", "bucketing+meamed", "bucketing+monna"):
        assert torch.isfinite(get_aggregator(spec, f=2)(x)).all(), spec


# ------------------------------------------------------------------ ARC


def test_arc_with_f_zero_is_the_identity():
    x = _x(6, 5, dtype=torch.float32)
    assert torch.equal(ARC(0)(x), x)
    assert torch.equal(Pipeline(ARC(0), Median())(x), Median()(x))


@pytest.mark.parametrize("n,f", [(10, 3), (7, 1), (11, 5), (50, 10)])
def test_arc_clips_exactly_k_rows_to_the_next_norm(n, f):
    x = _x(n, 8, n) * torch.linspace(0.5, 3.0, n, dtype=torch.float64)[:, None]  # distinct norms
    k = (2 * f * (n - f)) // n
    assert ARC.clipped_count(n, f) == k
    y = ARC(f)(x)
    norms = x.norm(dim=1)
    order = norms.argsort(descending=True)
    changed = (y != x).any(dim=1)
    assert changed.sum() == k and set(changed.nonzero().flatten().tolist()) == set(order[:k].tolist())
    torch.testing.assert_close(y[order[:k]].norm(dim=1), norms[order[k]].expand(k), rtol=1e-12, atol=0)
    # the clipped rows keep their direction
    cos = torch.nn.functional.cosine_similarity(y[changed], x[changed], dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_arc_k_examples_and_pipeline_info():
    assert [ARC.clipped_count(10, f) for f in range(5)] == [0, 1, 3, 4, 4]
    x = _x(10, 3, 7) * torch.arange(1, 11, dtype=torch.float64)[:, None]
    rule = get_aggregator("arc+nnm+trimmed_mean", f=3)
    rule(x)
    assert rule.last_info["pre"][0]["name"] == "ARC" and rule.last_info["pre"][0]["clipped"] == 4


# ------------------------------------------------------------------ devices and ByzFL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("spec", ["mda", "monna", "meamed", "caf", "smea", "bucketing+cc", "arc+median"])
def test_cuda_equals_cpu(spec):
    x = _x(9, 33, 2, dtype=torch.float32)
    torch.manual_seed(0)
    cpu = get_aggregator(spec, f=2)(x)
    torch.manual_seed(0)
    cuda = get_aggregator(spec, f=2)(x.cuda())
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_against_byzfl_when_installed():
    byzfl = import_byzfl()
    if byzfl is None:
        pytest.skip("byzfl is not installed")
    np.random.seed(0)  # ByzFL's CAF and SMEA draw their power-method start from NumPy's global RNG
    x = _x(8, 5, 3, dtype=torch.float32)
    # two far outliers: every subset holding one has a top eigenvalue that even ByzFL's one
    # power step from a random vector cannot underestimate below the clean subset's
    x[:2] += 1000.0
    f = 2

    def theirs(rule, v):
        return torch.as_tensor(np.asarray(rule(v.numpy().copy())), dtype=torch.float32)

    pairs = [(byzfl.MDA(f=f), MDA(f)), (byzfl.MoNNA(f=f, idx=3), MoNNA(f, idx=3)), (byzfl.Meamed(f=f), Meamed(f)),
             (byzfl.SMEA(f=f), SMEA(f))]
    for their_rule, ours in pairs:
        torch.testing.assert_close(ours(x), theirs(their_rule, x), rtol=1e-4, atol=1e-3)
    # ByzFL's CAF takes one power-method step from a random vector: exact in one dimension
    x1 = _x(9, 1, 4, dtype=torch.float32)
    x1[:2] += 50.0
    torch.testing.assert_close(CAF(f)(x1), theirs(byzfl.CAF(f=f), x1).reshape(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ARC(f)(x), theirs(byzfl.ARC(f=f), x), rtol=1e-5, atol=1e-3)
    ours = Bucketing(1, generator=torch.Generator().manual_seed(0))(x)  # s = 1: the same rows, shuffled
    assert sorted(map(tuple, ours.tolist())) == sorted(map(tuple, theirs(byzfl.Bucketing(s=1), x).tolist()))


@pytest.mark.parametrize("n,f,d,seed", [(7, 1, 4, 1), (10, 3, 12, 2), (12, 2, 30, 3)])
def test_deterministic_rules_equal_byzfl_on_random_inputs(n, f, d, seed):
    byzfl = import_byzfl()
    if byzfl is None:
        pytest.skip("byzfl is not installed")
    x = _x(n, d, seed, dtype=torch.float32)
    x[:f] = 3.0 * x[:f] + 2.0  # f displaced rows, so that the choice of subset matters

    def theirs(rule):
        return torch.as_tensor(np.asarray(rule(x.numpy().copy())), dtype=torch.float32)

    for their_rule, ours in [(byzfl.MDA(f=f), MDA(f)), (byzfl.MoNNA(f=f, idx=n - 1), MoNNA(f, idx=n - 1)),
                             (byzfl.Meamed(f=f), Meamed(f))]:
        torch.testing.assert_close(ours(x), theirs(their_rule), rtol=1e-5, atol=1e-5)


def test_plain_attacks_equal_byzfl():
    byzfl = import_byzfl()
    if byzfl is None:
        pytest.skip("byzfl is not installed")
    h = _x(9, 6, 5)
    torch.testing.assert_close(rfl.SignFlip()(h, 2)[0], torch.as_tensor(byzfl.SignFlipping()(h.numpy().copy())))
    theirs = torch.as_tensor(byzfl.InnerProductManipulation(tau=2.0)(h.numpy().copy()))
    torch.testing.assert_close(rfl.IPM(epsilon=2.0)(h, 2)[0], theirs)
