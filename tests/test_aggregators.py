"""Aggregators: exact values on small cases, float64 references, requirements, non-finite
clients, permutation invariance, honest-range guarantees (hypothesis), dtypes, devices, states."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from robustfl_lib import (
    NNM,
    Bulyan,
    CenteredClipping,
    Clipping,
    GeometricMedian,
    Krum,
    Mean,
    Median,
    MultiKrum,
    Pipeline,
    SmallCNN,
    TrimmedMean,
    aggregate_states,
    get_aggregator,
    pairwise_sq_distances,
)

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def robust_rules(n: int, f: int) -> list:
    """Every robust rule that admits (n, f), the pipelines included."""
    rules = [Median(), GeometricMedian(), CenteredClipping(), Pipeline(Clipping(), Mean())]
    if 2 * f < n:
        rules += [TrimmedMean(f), Pipeline(NNM(f), Median())]
    if n > 2 * f + 2:
        rules += [Krum(f), MultiKrum(f), Pipeline(NNM(f), Krum(f))]
    if n >= 4 * f + 3:
        rules.append(Bulyan(f))
    return rules


def randn(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- exact values


def test_median_averages_the_two_middle_values():
    x = torch.tensor([[1.0, 5.0], [2.0, -1.0], [3.0, 0.0], [10.0, 7.0]])
    assert torch.equal(Median()(x), torch.tensor([2.5, 2.5]))
    assert torch.equal(Median()(x[:3]), torch.tensor([2.0, 0.0]))
    assert torch.equal(Median()(x[:1]), x[0])


def test_trimmed_mean_drops_f_per_side_per_coordinate():
    x = torch.tensor([[0.0, 100.0], [1.0, 2.0], [2.0, 3.0], [3.0, -50.0], [40.0, 4.0]])
    assert torch.allclose(TrimmedMean(1)(x), torch.tensor([2.0, 3.0]))
    assert torch.allclose(TrimmedMean(0)(x), x.mean(0))
    assert torch.allclose(TrimmedMean(2)(x), Median()(x))
    kept = TrimmedMean(1)
    kept(x)
    assert torch.allclose(kept.last_info["kept_fraction"], torch.tensor([0.0, 1.0, 1.0, 0.5, 0.5], dtype=torch.float64))


def _krum_reference(x: torch.Tensor, f: int) -> np.ndarray:
    """Blanchard et al.'s scores in float64 with explicit differences (no Gram identity)."""
    xd = x.double().numpy()
    d = ((xd[:, None, :] - xd[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, : len(xd) - f - 2].sum(1)


def test_krum_and_multikrum_on_a_known_case():
    honest = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [0.05, 0.05]])
    x = torch.cat([honest, torch.tensor([[5.0, 5.0], [-4.0, 3.0]])])
    k = Krum(2)
    assert torch.equal(k(x), x[4]) and k.last_info["selected"].tolist() == [4]
    mk = MultiKrum(2)
    assert torch.allclose(mk(x), honest.mean(0)) and sorted(mk.last_info["selected"].tolist()) == [0, 1, 2, 3, 4]
    assert torch.equal(MultiKrum(2, m=1)(x), Krum(2)(x))
    assert np.allclose(k.last_info["scores"].numpy(), _krum_reference(x, 2), rtol=1e-3)  # float32 distances
    assert torch.allclose(MultiKrum(0, m=99)(x), x.mean(0))  # m is capped at n


def test_geometric_median_minimises_the_sum_of_distances():
    x = randn(9, 4, seed=1, dtype=torch.float64)
    z = GeometricMedian()(x)

    def objective(p):
        return torch.linalg.vector_norm(x - p, dim=1).sum()

    # Optimality: the unit vectors from z to the rows sum to zero, or, when z sits on a row
    # (smoothing radius nu), the unit vectors from that row to the others sum to norm <= 1.
    dist = torch.linalg.vector_norm(x - z, dim=1)
    on = dist < 1e-5
    units = ((z - x[~on]) / dist[~on, None]).sum(0)
    assert units.norm() <= (1 + 1e-4 if on.any() else 1e-5)
    for e in torch.eye(4, dtype=torch.float64):
        assert objective(z) <= objective(z + 1e-3 * e) and objective(z) <= objective(z - 1e-3 * e)
    # Collinear points: the geometric median of an odd number of them is the middle one.
    line = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [100.0, 100.0]], dtype=torch.float64)
    assert torch.allclose(GeometricMedian()(line), line[2], atol=1e-5)


def test_centered_clipping_is_the_mean_for_a_large_radius_and_bounded_otherwise():
    x = randn(8, 5, seed=2)
    assert torch.allclose(CenteredClipping(tau=1e6, iterations=1, init="zero")(x), x.mean(0), atol=1e-6)
    far = torch.cat([x, 1e4 * torch.ones(2, 5)])
    cc = CenteredClipping(tau=1.0, iterations=1, init="median")
    v0 = Median()(far)
    out = cc(far)
    assert torch.linalg.vector_norm(out - v0) <= 1.0 + 1e-5  # each row moves the centre by <= tau / n
    # The two far rows pull with their clipped length tau / n only: tiny weights on huge rows.
    far_pull = cc.last_info["weights"][8:] * torch.linalg.vector_norm(far[8:] - v0, dim=1).double()
    assert (far_pull <= 1.0 / 10 + 1e-6).all() and (far_pull > 0).all()


def test_centered_clipping_previous_init_carries_over_and_resets():
    x = randn(6, 3, seed=3)
    cc = CenteredClipping(tau=0.5, iterations=1, init="previous")
    first = cc(x)
    second = cc(x)
    assert not torch.allclose(first, second)  # the centre started from the first output
    cc.reset()
    assert torch.allclose(cc(x), first)


def _bulyan_reference(x: torch.Tensor, f: int) -> torch.Tensor:
    xd = x.double()
    total = (torch.cdist(xd, xd) ** 2).sum(1)  # tie-break: smaller total distance to all rows
    remaining = list(range(len(xd)))
    chosen = []
    for _ in range(len(xd) - 2 * f):
        sub = xd[remaining]
        r = len(remaining)
        k = min(max(r - f - 2, 1), r - 1)
        d = torch.cdist(sub, sub) ** 2
        d.fill_diagonal_(float("inf"))
        scores = d.sort(dim=1).values[:, :k].sum(1) if k > 0 else torch.zeros(r)
        keys = [(round(float(s), 9), float(total[i])) for s, i in zip(scores, remaining)]
        chosen.append(remaining.pop(min(range(r), key=keys.__getitem__)))
    sel = xd[chosen]
    beta = len(chosen) - 2 * f
    med = sel.median(0).values if len(sel) % 2 else sel.sort(0).values[len(sel) // 2 - 1 : len(sel) // 2 + 1].mean(0)
    out = []
    for j in range(sel.shape[1]):
        col = sel[:, j]
        order = torch.argsort((col - med[j]).abs(), stable=True)[:beta]
        out.append(col[order].mean())
    return torch.stack(out)


@pytest.mark.parametrize("n,f", [(7, 1), (11, 2), (12, 2)])
def test_bulyan_matches_a_loop_reference(n, f):
    x = randn(n, 6, seed=n)
    x[:f] += 3.0
    assert torch.allclose(Bulyan(f)(x).double(), _bulyan_reference(x, f), atol=1e-6)


def test_nnm_matches_a_loop_reference_and_clipping_bounds_norms():
    x = randn(9, 5, seed=4)
    f = 3
    y = NNM(f)(x)
    d = torch.cdist(x.double(), x.double())
    for i in range(9):
        nearest = torch.argsort(d[i], stable=True)[: 9 - f]
        assert torch.allclose(y[i], x[nearest].mean(0), atol=1e-6)
    c = Clipping(tau=0.5)(x)
    norms = torch.linalg.vector_norm(x, dim=1)
    assert torch.allclose(torch.linalg.vector_norm(c, dim=1), norms.clamp(max=0.5), atol=1e-6)
    assert torch.allclose(torch.linalg.vector_norm(Clipping()(x), dim=1).max(), norms.median(), atol=1e-6)


# ---------------------------------------------------------------- Krum's exact selection


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(5, 14),
    d=st.integers(2, 300),
    offset=st.sampled_from([0.0, 1e2, 1e3, 3e3]),
)
def test_krum_selection_equals_float64_reference_under_a_large_common_offset(seed, n, d, offset):
    f = (n - 3) // 2
    g = torch.Generator().manual_seed(seed)
    # Raw weights: every client shares the (large) global model, updates are small differences.
    x = offset * torch.randn(d, generator=g) + 0.01 * torch.randn(n, d, generator=g)
    x = x.float()
    ref = _krum_reference(x, f)
    best, second = np.sort(ref)[:2]
    assume(second - best > 1e-4 * best)  # a float32 input cannot decide closer ties
    k = Krum(f)
    k(x)
    assert int(k.last_info["selected"]) == int(np.argmin(ref))
    mk = MultiKrum(f, m=3)
    mk(x)
    assume(np.sort(ref)[3] - np.sort(ref)[2] > 1e-4 * best)
    assert set(mk.last_info["selected"].tolist()) == set(np.argsort(ref)[:3].tolist())


def test_distances_survive_one_huge_finite_row():
    x = randn(8, 50, seed=5) * 0.01 + 1e3
    x[3] = 1e30  # a finite float32 value whose square overflows
    dist = pairwise_sq_distances(x)
    honest = [i for i in range(8) if i != 3]
    ref = torch.cdist(x[honest].double(), x[honest].double()) ** 2
    assert torch.allclose(dist[honest][:, honest], ref, rtol=1e-3, atol=1e-9)
    assert (dist[3, honest] > 1e50).all()
    k = Krum(1)
    assert torch.isfinite(k(x)).all() and int(k.last_info["selected"]) in honest


# ---------------------------------------------------------------- requirements


@pytest.mark.parametrize(
    "make,n,message",
    [
        (lambda: Krum(2), 6, r"n > 2f \+ 2 = 6"),
        (lambda: MultiKrum(3), 8, r"n > 2f \+ 2 = 8"),
        (lambda: TrimmedMean(2), 4, r"2f < n"),
        (lambda: Bulyan(2), 10, r"n >= 4f \+ 3 = 11"),
        (lambda: Pipeline(NNM(3), Mean()), 6, r"n > 2f = 6"),
    ],
)
def test_requirements_on_n_and_f_raise_valueerror(make, n, message):
    with pytest.raises(ValueError, match=message):
        make()(randn(n, 3, seed=0))


@pytest.mark.parametrize("cls", [Krum, MultiKrum, TrimmedMean, Bulyan, NNM])
@pytest.mark.parametrize("bad", [-1, 1.5, None, True])
def test_f_must_be_a_non_negative_integer(cls, bad):
    with pytest.raises(ValueError, match="f .*must be an integer >= 0"):
        cls(bad)


@pytest.mark.parametrize("rule", [Mean(), Median(), Krum(0), TrimmedMean(0), GeometricMedian(), Bulyan(0)])
@pytest.mark.parametrize("bad", [torch.zeros(0, 3), torch.zeros(3, 0), torch.zeros(4), torch.zeros(2, 2, 2)])
def test_input_must_be_a_non_empty_2d_tensor(rule, bad):
    with pytest.raises(ValueError, match="non-empty 2-D"):
        rule(bad)
    with pytest.raises(ValueError, match="floating-point"):
        rule(torch.zeros(3, 2, dtype=torch.int64))


def test_get_aggregator_names_and_compositions():
    assert isinstance(get_aggregator("krum", f=2), Krum) and get_aggregator("krum", f=2).f == 2
    assert isinstance(get_aggregator("median", f=2), Median)
    p = get_aggregator("nnm+clipping+trimmed_mean", f=1)
    assert isinstance(p, Pipeline) and [type(s) for s in p.steps] == [NNM, Clipping, TrimmedMean]
    assert get_aggregator(p) is p
    with pytest.raises(ValueError, match="unknown aggregator"):
        get_aggregator("krumm")
    with pytest.raises(ValueError, match="unknown pre-aggregator"):
        get_aggregator("nmm+krum")
    with pytest.raises(ValueError, match="last step"):
        Pipeline(NNM(1))
    with pytest.raises(ValueError, match="PreAggregator"):
        Pipeline(Median(), Mean())


# ---------------------------------------------------------------- non-finite clients

NONFINITE = st.sampled_from(["nan_row", "inf_row", "-inf_row", "one_nan", "one_inf", "mixed"])


def _poison(x: torch.Tensor, rows: list[int], kind: str, g: torch.Generator) -> torch.Tensor:
    x = x.clone()
    for r in rows:
        if kind == "nan_row":
            x[r] = float("nan")
        elif kind == "inf_row":
            x[r] = float("inf")
        elif kind == "-inf_row":
            x[r] = -float("inf")
        elif kind == "one_nan":
            x[r, int(torch.randint(x.shape[1], (1,), generator=g))] = float("nan")
        elif kind == "one_inf":
            x[r, int(torch.randint(x.shape[1], (1,), generator=g))] = float("inf")
        else:
            x[r, ::2] = float("nan")
            x[r, 1::2] = -float("inf")
    return x


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 13), d=st.integers(1, 20), kind=NONFINITE, data=st.data())
def test_nonfinite_clients_never_make_a_robust_output_nonfinite(seed, n, d, kind, data):
    f = data.draw(st.integers(1, (n - 1) // 2))
    k = data.draw(st.integers(1, f))  # at most f clients are Byzantine, here all of them non-finite
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    rows = torch.randperm(n, generator=g)[:k].tolist()
    bad = _poison(x, rows, kind, g)
    for rule in robust_rules(n, f):
        out = rule(bad)
        assert torch.isfinite(out).all(), rule
        assert sorted(rule.last_info["dropped"]) == sorted(rows)
        for key in ("selected",):
            if key in rule.last_info:
                assert not set(rule.last_info[key].tolist()) & set(rows)


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 13), d=st.integers(1, 20),
       value=st.sampled_from([1e30, -1e30, 3e38, -3e38]), data=st.data())
def test_huge_finite_clients_never_make_a_robust_output_nonfinite(seed, n, d, value, data):
    f = data.draw(st.integers(1, (n - 1) // 2))
    k = data.draw(st.integers(1, f))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    rows = torch.randperm(n, generator=g)[:k].tolist()
    x[rows] = value  # finite, but its square overflows float32
    for rule in robust_rules(n, f):
        out = rule(x)
        assert torch.isfinite(out).all(), rule
        if "selected" in rule.last_info and not isinstance(rule, Pipeline):
            assert not set(rule.last_info["selected"].tolist()) & set(rows), rule


def test_dropped_rows_lower_f_by_one_each():
    x = randn(9, 4, seed=6)
    bad = x.clone()
    bad[[2, 7]] = float("nan")
    keep = [i for i in range(9) if i not in (2, 7)]
    assert torch.equal(TrimmedMean(3)(bad), TrimmedMean(1)(x[keep]))
    k = Krum(2)
    assert torch.equal(k(bad), Krum(0)(x[keep]))
    assert int(k.last_info["selected"]) in keep and k.last_info["dropped"] == [2, 7]
    with pytest.raises(ValueError, match="all 2 updates are non-finite"):
        Median()(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="after dropping 3 non-finite"):
        Krum(1)(torch.cat([randn(2, 3, seed=0), torch.full((3, 3), float("nan"))]))
    with pytest.raises(ValueError, match="non-finite update from client row"):
        Mean()(bad)


# ---------------------------------------------------------------- properties


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 12), d=st.integers(1, 12), data=st.data())
def test_permutation_invariance(seed, n, d, data):
    f = data.draw(st.integers(0, (n - 3) // 4))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    for rule in robust_rules(n, f) + [Mean()]:
        assert torch.allclose(rule(x), rule(x[perm]), atol=1e-9), rule


finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([1e30, -1e30, 3e38, float("nan"), float("inf")]),
)


@FAST
@given(
    honest=st.integers(1, 9),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_median_and_trimmed_mean_stay_in_the_honest_range(honest, d, seed, data):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(honest, d, generator=g)
    # Up to f arbitrary rows, with f such that the rule's requirement holds: 2f < n.
    f = data.draw(st.integers(0, honest - 1))
    byz = torch.tensor(data.draw(st.lists(st.lists(finite_or_not, min_size=d, max_size=d), min_size=f, max_size=f)),
                       dtype=torch.float32).reshape(f, d)
    x = torch.cat([h, byz])[torch.randperm(honest + f, generator=g)]
    lo, hi = h.min(0).values, h.max(0).values
    for rule in (TrimmedMean(f), Median()):
        out = rule(x)
        assert torch.isfinite(out).all()
        assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all(), (rule, out, lo, hi)


# ---------------------------------------------------------------- dtypes and devices


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_follow_the_input(dtype):
    x32 = randn(11, 7, seed=7)
    x = x32.to(dtype)
    for rule in robust_rules(11, 2) + [Mean()]:
        out = rule(x)
        assert out.dtype == dtype and out.shape == (7,), rule
        tol = 1e-9 if dtype == torch.float64 else 5e-2
        assert torch.allclose(out.float(), rule(x.float()), atol=tol), rule


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_follow_the_input_device(device):
    x = randn(11, 7, seed=8).to(device)
    x[4] = float("nan")
    for rule in robust_rules(11, 2):
        out = rule(x)
        assert out.device == x.device and torch.isfinite(out).all(), rule
        assert torch.allclose(out.cpu(), rule(x.cpu()), atol=1e-4), rule


def test_nnm_never_allocates_n_by_n_by_d():
    from torch.profiler import ProfilerActivity, profile

    n, d = 40, 20_000
    x = randn(n, d, seed=9)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        Pipeline(NNM(8), Krum(8))(x)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= 2 * n * d * 4 < n * n * d * 4 / 10


# ---------------------------------------------------------------- state dicts


def test_aggregate_states_handles_integer_buffers():
    torch.manual_seed(0)
    models = [SmallCNN((1, 8, 8), 10, batchnorm=True) for _ in range(5)]
    for i, m in enumerate(models):
        m.train()
        for _ in range(i + 1):  # different num_batches_tracked per client
            m(torch.rand(4, 1, 8, 8))
    states = [m.state_dict() for m in models]
    out = aggregate_states(states, "median")
    for k, v in states[0].items():
        stacked = torch.stack([s[k] for s in states])
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        if torch.is_floating_point(v):
            assert torch.allclose(out[k], Median()(stacked.reshape(5, -1)).reshape(v.shape))
        else:
            assert int(out[k]) == 3  # median of 1..5
    fedavg = aggregate_states(states, Mean(), weights=[1, 1, 1, 1, 4])
    k0 = next(iter(states[0]))
    expect = (sum(s[k0] for s in states[:4]) + 4 * states[4][k0]) / 8
    assert torch.allclose(fedavg[k0], expect, atol=1e-6)
    krum = aggregate_states(states, "krum", f=1)
    assert isinstance(krum, dict) and set(krum) == set(states[0])
    with pytest.raises(ValueError, match="keys"):
        aggregate_states([states[0], {k: v for k, v in itertools.islice(states[1].items(), 2)}], "mean")
    with pytest.raises(ValueError, match="empty"):
        aggregate_states([], "mean")
