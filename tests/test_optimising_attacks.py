"""Attacks that optimise against the rule or over rounds (issue 14, item 4): Min-Max, Min-Sum, Fang et al.'s
attacks on the trimmed mean / median and on Krum, optimal ALIE / IPM, the time-coupled attack.

Each is checked against a float64 definition written here independently of the library (explicit norms,
per-coordinate loops, closed-form roots), then for its requirements and bad inputs, and for its effect on a
synthetic cloud (farther from the honest mean than ALIE and sign flip against the rule it targets).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from robustfl_lib import (
    ADAPTIVE_ATTACKS,
    ALIE,
    IPM,
    AdaptiveScaling,
    FangKrum,
    FangTrimmedMean,
    MinMax,
    MinSum,
    OptimalALIE,
    OptimalIPM,
    ScaleSearch,
    SignFlip,
    TimeCoupled,
    FLConfig,
    alie_z,
    get_attack,
    load_dataset,
    run_federated,
)
from robustfl_lib.aggregators import Krum, Mean, Median, MultiKrum, TrimmedMean
from robustfl_lib.checkpoint import load_object_state, object_state


def cloud(n: int = 16, d: int = 100, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Honest updates whose mean (0.1 per coordinate) is small next to their spread (1), as for SGD."""
    g = torch.Generator().manual_seed(seed)
    return (0.1 + torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)


def damage(rule, honest: torch.Tensor, byz: torch.Tensor) -> float:
    return float((rule(torch.cat([honest, byz])).double() - honest.double().mean(0)).norm())


def explicit_distances(x: torch.Tensor) -> torch.Tensor:
    """All ||x_i - x_j|| from explicit float64 differences."""
    x = x.double()
    return (x[:, None, :] - x[None, :, :]).norm(dim=2)


def paper_perturbation(h: torch.Tensor, direction: str) -> torch.Tensor:
    mu = h.mean(0)
    return {"unit_vec": -mu / mu.norm(), "std": -h.std(0), "sign": -torch.sign(mu)}[direction]


# ------------------------------------------------------------------ Min-Max and Min-Sum

@pytest.mark.parametrize("direction", ["unit_vec", "std", "sign"])
def test_min_max_gamma_is_the_largest_that_stays_within_the_honest_diameter(direction):
    h = cloud(n=9, d=40, seed=1)
    atk = MinMax(direction=direction, tol=1e-7)
    out = atk(h, 3)
    gamma, mu, p = atk.last_scale, h.mean(0), paper_perturbation(h, direction)
    assert torch.equal(out[0], out[2])
    torch.testing.assert_close(out[0], mu + gamma * p, rtol=1e-12, atol=1e-12)
    diameter = float(explicit_distances(h).max())

    def worst(g):
        return float((mu + g * p - h).norm(dim=1).max())

    assert worst(gamma) <= diameter * (1 + 1e-12)  # feasible...
    assert worst(gamma * (1 + 2e-7)) > diameter  # ...and a slightly larger step is not
    # Closed form: ||m - u_i||^2 = c_i - 2 g b_i + g^2 a <= D^2 holds up to the larger root of each quadratic.
    diff = h - mu
    c, b, a = diff.square().sum(1), diff @ p, float(p.square().sum())
    roots = (b + (b.square() - a * (c - diameter**2)).sqrt()) / a
    assert gamma == pytest.approx(float(roots.min()), rel=2e-7)


@pytest.mark.parametrize("direction", ["unit_vec", "std", "sign"])
def test_min_sum_gamma_is_the_largest_that_keeps_the_summed_distances_within_the_honest_maximum(direction):
    h = cloud(n=8, d=30, seed=2)
    atk = MinSum(direction=direction, tol=1e-7)
    out = atk(h, 2)
    gamma, mu, p = atk.last_scale, h.mean(0), paper_perturbation(h, direction)
    torch.testing.assert_close(out[1], mu + gamma * p, rtol=1e-12, atol=1e-12)
    bound = float(explicit_distances(h).square().sum(1).max())

    def total(g):
        return float((mu + g * p - h).norm(dim=1).square().sum())

    assert total(gamma) <= bound * (1 + 1e-12)
    assert total(gamma * (1 + 2e-7)) > bound
    # Closed form for the plain mean (the cross term vanishes): n g^2 ||p||^2 + sum_i c_i = bound.
    closed = math.sqrt((bound - float((h - mu).square().sum())) / (len(h) * float(p.square().sum())))
    assert gamma == pytest.approx(closed, rel=2e-7)


def test_min_max_and_min_sum_degenerate_clouds_and_inputs():
    same = torch.ones(5, 7, dtype=torch.float64)  # all honest updates equal: nowhere to hide
    for atk in (MinMax(), MinMax("unit_vec"), MinSum("sign")):
        assert torch.equal(atk(same, 2), same[:2])
        assert atk.last_scale == 0.0
    one = cloud(n=1, d=6)
    assert torch.equal(MinMax("sign")(one, 2)[0], one[0])  # a single honest update: the only safe point is itself
    with pytest.raises(ValueError, match="direction"):
        MinMax(direction="inverse")
    for tol in (0.0, 1.0, True, "1e-6"):
        with pytest.raises(ValueError, match="tol"):
            MinSum(tol=tol)


# ------------------------------------------------------------------ Fang et al. on the trimmed mean / median

def test_fang_trimmed_mean_intervals_follow_the_papers_cases():
    h = cloud(n=7, d=60, seed=3)
    h[:, :5] = torch.tensor([[2.0, -3.0, 0.5, -0.5, 1.0]]).expand(7, -1) + 0.1 * torch.arange(7.0)[:, None]
    atk = FangTrimmedMean(b=2.0)
    lo, hi = atk.intervals(h)
    for j in range(h.shape[1]):  # the paper's four cases, one coordinate at a time
        col = h[:, j].tolist()
        w_max, w_min, s = max(col), min(col), 1 if sum(col) >= 0 else -1
        if s == -1:
            want = (w_max, 2 * w_max) if w_max > 0 else (w_max, w_max / 2)
        else:
            want = (w_min / 2, w_min) if w_min > 0 else (2 * w_min, w_min)
        assert (float(lo[j]), float(hi[j])) == pytest.approx(want, rel=1e-15, abs=0), j
    out = atk(h, 4, generator=torch.Generator().manual_seed(5))
    assert ((out >= lo) & (out <= hi)).all()
    # Every Byzantine value lies beyond the honest extreme opposite to the honest direction.
    s = torch.where(h.mean(0) >= 0, 1.0, -1.0).double()
    assert ((s > 0) & (out > h.min(0).values)).sum() == 0 and ((s < 0) & (out < h.max(0).values)).sum() == 0
    # Uniform draws from the given generator; without one, the same seeded draws every call.
    again = atk(h, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again) and not torch.equal(out, atk(h, 4, generator=torch.Generator().manual_seed(6)))
    u = torch.rand(4, 60, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(out, lo + (hi - lo) * u)
    assert torch.equal(atk(h, 3), atk(h, 3)) and torch.equal(atk(h, 3), FangTrimmedMean(seed=0)(h, 3))
    assert len({atk(h, 2)[0, 0].item(), FangTrimmedMean(seed=1)(h, 2)[0, 0].item()}) == 2
    for bad in (1.0, 0.5, float("inf"), True):
        with pytest.raises(ValueError, match="b "):
            FangTrimmedMean(b=bad)


# ------------------------------------------------------------------ Fang et al. on Krum

def test_fang_krum_starts_at_the_papers_bound_and_halves_until_krum_selects_it():
    h, c = cloud(n=16, d=100, seed=0), 4
    atk = FangKrum(epsilon=1e-3)
    out = atk(h, c, generator=torch.Generator().manual_seed(2))
    n, d = len(h) + c, h.shape[1]
    # lambda_0 from explicit distances: the n - c - 2 nearest honest neighbours of each honest update.
    dist = explicit_distances(h)
    nearest = [sorted(dist[i, j].item() for j in range(len(h)) if j != i)[: n - c - 2] for i in range(len(h))]
    lam0 = min(map(sum, nearest)) / ((n - 2 * c - 1) * math.sqrt(d)) + float(h.norm(dim=1).max()) / math.sqrt(d)
    assert atk.upper_bound(h, c) == pytest.approx(lam0, rel=1e-12)
    k = round(math.log2(lam0 / atk.last_scale))
    assert k >= 1 and atk.last_scale == pytest.approx(lam0 / 2**k, rel=1e-12) and atk.last_selected
    s = torch.where(h.mean(0) >= 0, 1.0, -1.0).double()
    torch.testing.assert_close(out[0], -atk.last_scale * s, rtol=0, atol=0)
    offsets = out[1:] - out[0]
    r = float(h.norm(dim=1).median())
    torch.testing.assert_close(offsets.norm(dim=1), torch.full((c - 1,), 1e-3 * r, dtype=torch.float64))
    krum = Krum(f=c)
    krum(torch.cat([h, out]))
    assert int(krum.last_info["selected"][0]) >= len(h)  # Krum selects a crafted update...
    for j in range(k):  # ...and selected none at the larger lambdas tried before
        crafted = torch.cat([(-lam0 / 2**j * s)[None], (-lam0 / 2**j * s)[None] + offsets])
        krum(torch.cat([h, crafted]))
        assert int(krum.last_info["selected"][0]) < len(h), j
    # epsilon = 0: exact copies; a given rule (Multi-Krum) counts as fooled when it keeps a crafted row.
    copies = FangKrum(epsilon=0.0)(h, c)
    assert torch.equal(copies[0], copies[-1])
    mk = MultiKrum(f=c)
    atk_mk = FangKrum(aggregator=mk)
    byz = atk_mk(h, c)
    mk(torch.cat([h, byz]))
    assert atk_mk.last_selected and bool((mk.last_info["selected"] >= len(h)).any())


def test_fang_krum_requirements_and_failure_to_be_selected():
    h = cloud(n=6, d=20, seed=4)
    with pytest.raises(ValueError, match=r"n > 2c \+ 1"):
        FangKrum(f=1)(h[:4], 3)  # n = 7 is not > 7
    with pytest.raises(ValueError, match="needs n > 2f"):
        FangKrum(f=3)(h, 2)  # Fang's n > 2c + 1 holds (8 > 5), Krum(f=3)'s n > 8 does not
    for kwargs, match in (({"epsilon": -1.0}, "epsilon"), ({"threshold": 1.0}, "threshold"),
                          ({"threshold": 0.0}, "threshold"), ({"f": -1}, "f must"),
                          ({"aggregator": "krum"}, "aggregator"), ({"seed": 1.5}, "seed")):
        with pytest.raises(ValueError, match=match):
            FangKrum(**kwargs)
    # Honest updates whose mean dwarfs their spread: -lambda s is never near them, so Krum never picks it;
    # the halving stops at the threshold and says so.
    far = 5.0 + 0.01 * cloud(n=12, d=30, seed=5)
    atk = FangKrum(threshold=1e-3)
    atk(far, 2)
    assert atk.last_selected is False and atk.last_scale < 2e-3 * atk.upper_bound(far, 2)


# ------------------------------------------------------------------ optimal ALIE and IPM

@pytest.mark.parametrize("rule", [Krum(f=3), Median(), TrimmedMean(f=3)], ids=["krum", "median", "trimmed_mean"])
def test_optimal_alie_is_at_least_as_damaging_as_alie_and_every_grid_point(rule):
    h, f = cloud(n=12, d=50, seed=6), 3
    atk = OptimalALIE(rule)
    out = atk(h, f)
    z = atk.last_scale
    assert torch.equal(out, ALIE(z=z)(h, f))  # exactly ALIE's update at the chosen z
    grid = [2.0**k for k in range(-6, 7)] + [alie_z(len(h) + f, f)]
    assert atk.grid(len(h), f) == tuple(grid)
    best = damage(rule, h, out)
    assert best >= damage(rule, h, ALIE()(h, f)) - 1e-12
    for g in grid:
        assert best >= damage(rule, h, ALIE(z=g)(h, f)) - 1e-12, g


def test_optimal_ipm_is_ipm_at_the_most_damaging_epsilon():
    h, f = cloud(n=12, d=50, seed=7), 3
    rule = TrimmedMean(f=f)
    atk = OptimalIPM(rule, refine=0)
    out = atk(h, f)
    eps = atk.last_scale
    assert torch.equal(out, IPM(epsilon=eps)(h, f))
    damages = [damage(rule, h, IPM(epsilon=2.0**k)(h, f)) for k in range(-6, 7)]
    assert eps == 2.0 ** (-6 + max(range(13), key=lambda i: (damages[i], -i)))
    assert damage(rule, h, out) == pytest.approx(max(damages), rel=1e-12)
    # Against the mean, damage grows with epsilon: the largest scale wins, and refining goes beyond it.
    atk = OptimalIPM(Mean(), refine=2)
    atk(h, f)
    assert atk.last_scale == pytest.approx(64 * 2**0.5 * 2**0.25)


def test_one_search_routine_behind_adaptive_scaling_and_the_optimal_attacks():
    for cls in (AdaptiveScaling, OptimalALIE, OptimalIPM):
        assert issubclass(cls, ScaleSearch) and cls.search is ScaleSearch.search
    h = cloud(n=6, d=20, seed=8)
    w = torch.tensor([5.0, 90.0, 20.0, 1.0, 40.0, 12.0], dtype=torch.float64)
    wb = torch.tensor([30.0, 8.0], dtype=torch.float64)
    # With the server's weights the line starts at the weighted honest mean and trials use all weights.
    atk = OptimalALIE(Mean(), scales=(0.5, 2.0), refine=0)
    byz = atk(h, 2, weights=w, byzantine_weights=wb)
    mu_w = (w / w.sum()) @ h
    torch.testing.assert_close(byz[0], mu_w - atk.last_scale * h.std(0))
    expected = [float((Mean()(torch.cat([h, (mu_w - z * h.std(0)).expand(2, -1)]), weights=torch.cat([w, wb]))
                       - mu_w).norm()) for z in (0.5, 2.0, alie_z(8, 2))]
    torch.testing.assert_close(atk.damages(h, 2, weights=w, byzantine_weights=wb),
                               torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs the f"):
        OptimalALIE("median")
    with pytest.raises(ValueError, match="scales"):
        OptimalIPM(Median(), scales=[-1.0])
    with pytest.raises(ValueError, match="refine"):
        OptimalIPM(Median(), refine=-1)


# ------------------------------------------------------------------ the time-coupled attack

def test_time_coupled_sends_a_fixed_direction_scaled_to_each_rounds_spread():
    r1, r2 = cloud(n=10, d=30, seed=9), 0.5 * cloud(n=10, d=30, seed=10) - 0.2
    atk = TimeCoupled(fraction=0.3)
    out1, out2 = atk(r1, 2), atk(r2, 3)
    v = -r1.mean(0) / r1.mean(0).norm()  # fixed from the first round
    for r, out in ((r1, out1), (r2, out2)):
        mu = r.mean(0)
        rms = math.sqrt(sum(float((r[i] - mu).square().sum()) for i in range(len(r))) / len(r))
        torch.testing.assert_close(out, (mu + 0.3 * rms * v).expand(len(out), -1))
        # inside the honest cloud: closer to the mean than every honest update
        assert float((out[0] - mu).norm()) < float((r - mu).norm(dim=1).min())
    torch.testing.assert_close(atk.direction_vector, v)
    sign = TimeCoupled(direction="sign")
    sign(r1, 1)
    torch.testing.assert_close(sign.direction_vector, -torch.sign(r1.mean(0)) / math.sqrt(30))
    given = TimeCoupled(direction=torch.arange(30.0))
    assert given.get_state() == {"v": None}
    torch.testing.assert_close(given.direction_vector, torch.arange(30.0).double() / torch.arange(30.0).norm())
    # An all-zero honest mean gives nothing to be against yet: the honest mean is sent, v stays unset.
    x = torch.arange(60.0, dtype=torch.float64).reshape(2, 30) - 17
    zero = torch.cat([x, -x])  # integers: the mean is exactly zero
    lazy = TimeCoupled()
    assert torch.equal(lazy(zero, 2), torch.zeros(2, 30, dtype=torch.float64)) and lazy.get_state() == {"v": None}


def test_time_coupled_bias_adds_up_over_rounds_under_a_memoryless_rule():
    torch.manual_seed(0)  # not used by the library; the clouds below come from their own generators
    atk, median, f = TimeCoupled(fraction=0.5), Median(), 3
    drift, clean = 0.0, 0.0
    for t in range(20):  # honest updates of mean zero, fresh each round
        h = cloud(n=12, d=40, seed=100 + t) - 0.1
        drift += float(median(torch.cat([h, atk(h, f)])) @ atk.direction_vector)
        clean += float(median(h) @ atk.direction_vector)
    assert drift > 0 and drift - clean > 20 * 0.5 * 0.1  # each round adds a positive bias along v


def test_time_coupled_state_round_trips_bitwise_through_a_checkpoint():
    rounds = [cloud(n=8, d=25, seed=20 + t, dtype=torch.float32) for t in range(4)]
    a = TimeCoupled(fraction=0.4)
    a(rounds[0], 2), a(rounds[1], 2)
    buf = io.BytesIO()
    torch.save({"attack": object_state(a, "attack")}, buf)
    buf.seek(0)
    b = TimeCoupled(fraction=0.4)
    load_object_state(b, torch.load(buf, weights_only=True)["attack"], "attack")
    for r in rounds[2:]:
        assert torch.equal(a(r, 2), b(r, 2))
    fresh = TimeCoupled(fraction=0.4)
    assert not torch.equal(fresh(rounds[2], 2), b(rounds[2], 2))  # the state is what made them agree
    a.reset()
    assert a.get_state() == {"v": None} and torch.equal(a(rounds[2], 2), TimeCoupled(fraction=0.4)(rounds[2], 2))
    with pytest.raises(ValueError, match="keys"):
        b.set_state({"direction": None})
    with pytest.raises(ValueError, match="finite 1-D"):
        b.set_state({"v": torch.full((25,), float("nan"))})
    with pytest.raises(ValueError, match="learns no v"):
        TimeCoupled(direction=torch.ones(25)).set_state({"v": torch.ones(25)})
    with pytest.raises(ValueError, match="reset"):
        b(cloud(n=8, d=26), 2)
    for kwargs, match in (({"fraction": -0.1}, "fraction"), ({"direction": "up"}, "direction"),
                          ({"direction": torch.zeros(3)}, "non-zero"), ({"direction": torch.ones(2, 2)}, "1-D")):
        with pytest.raises(ValueError, match=match):
            TimeCoupled(**kwargs)


def test_time_coupled_run_resumes_bitwise_from_a_checkpoint(tmp_path):
    config = FLConfig(dataset="digits", num_clients=8, rounds=4, local_epochs=1, batch_size=16, partition="dirichlet",
                      alpha=0.5, checkpoint_every=2, progress=False, aggregator="median", byzantine_fraction=0.25,
                      byzantine_attack="time_coupled", attack_kwargs={"fraction": 0.5})
    data = load_dataset("digits")
    full = run_federated(config, data=data)

    class Interrupt(Exception):
        pass

    def stop_after_3(record):
        if record["round"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):  # the checkpoint after round 2 holds v, learned in round 1
        run_federated(config, data=data, callback=stop_after_3, checkpoint_dir=tmp_path)
    resumed = run_federated(config, data=data, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == full.history
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    torch.testing.assert_close(resumed.attack.direction_vector, full.attack.direction_vector, rtol=0, atol=0)


# ------------------------------------------------------------------ every new attack: names, dtypes, inputs, weights

def _every_new_attack():
    return {
        "min_max": MinMax(), "min_sum": MinSum(), "fang_trimmed_mean": FangTrimmedMean(), "fang_krum": FangKrum(),
        "optimal_alie": OptimalALIE(Median()), "optimal_ipm": OptimalIPM(Median()), "time_coupled": TimeCoupled(),
    }


def test_config_names_build_the_right_objects():
    expected = {"min_max": MinMax, "min_sum": MinSum, "fang_trimmed_mean": FangTrimmedMean,
                "fang_median": FangTrimmedMean, "fang_krum": FangKrum, "optimal_alie": OptimalALIE,
                "optimal_ipm": OptimalIPM, "time_coupled": TimeCoupled, "adaptive_scaling": AdaptiveScaling}
    assert {k: ADAPTIVE_ATTACKS[k] for k in expected} == expected
    for name in ("min_max", "min_sum", "fang_trimmed_mean", "fang_median", "fang_krum", "time_coupled"):
        assert type(get_attack(name)) is expected[name]
    assert get_attack("min_sum", direction="sign").direction == "sign"
    assert get_attack("fang_krum", f=2).f == 2 and get_attack("time_coupled", fraction=0.1).fraction == 0.1
    alie = get_attack("optimal_alie", aggregator="trimmed_mean", f=2)
    assert isinstance(alie.aggregator, TrimmedMean) and alie.aggregator.f == 2
    ipm = get_attack("optimal_ipm", aggregator=Krum(f=1))
    assert isinstance(ipm, OptimalIPM) and isinstance(ipm.aggregator, Krum)
    with pytest.raises(ValueError, match="min_max"):  # the error lists the new names too
        get_attack("minmax")
    for name in ("optimal_alie", "optimal_ipm", "adaptive_scaling"):
        with pytest.raises(ValueError, match="needs the aggregator it attacks"):
            get_attack(name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_new_attack_returns_finite_rows_like_the_input(dtype):
    h = cloud(n=12, d=40, seed=11, dtype=dtype)
    for name, atk in _every_new_attack().items():
        out = atk(h, 3, generator=torch.Generator().manual_seed(0))
        assert out.shape == (3, 40) and out.dtype == dtype and out.device == h.device, name
        assert torch.isfinite(out).all(), name
        assert atk(h, 0).shape == (0, 40), name


def test_every_new_attack_checks_its_input():
    bad = cloud(n=12, d=10)
    bad[4, 3] = float("nan")
    for name, atk in _every_new_attack().items():
        with pytest.raises(ValueError, match=r"finite; row\(s\) \[4\]"):
            atk(bad, 2)
        with pytest.raises(ValueError, match="non-empty 2-D"):
            atk(torch.zeros(5, dtype=torch.float64), 2)
        with pytest.raises(ValueError, match="num_byzantine"):
            atk(cloud(), -1)
        with pytest.raises(ValueError, match="go together"):
            atk(cloud(), 2, weights=torch.ones(16))


def test_attacks_defined_without_the_servers_weights_ignore_them():
    h = cloud(n=12, d=30, seed=12)
    w, wb = torch.arange(1.0, 13.0), torch.tensor([3.0, 4.0])
    for name, atk in _every_new_attack().items():
        if atk.uses_weights:
            continue
        plain = atk(h, 2, generator=torch.Generator().manual_seed(1))
        atk.reset()
        weighted = atk(h, 2, generator=torch.Generator().manual_seed(1), weights=w, byzantine_weights=wb)
        assert torch.equal(plain, weighted), name
    assert {n for n, a in _every_new_attack().items() if a.uses_weights} == {"optimal_alie", "optimal_ipm"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_new_attack_runs_on_cuda_like_on_cpu():
    h = cloud(n=12, d=40, seed=13)
    for name, atk in _every_new_attack().items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        out = atk(h.cuda(), 3, generator=gen)
        assert out.device.type == "cuda" and out.dtype == h.dtype, name
        if name not in ("fang_trimmed_mean", "fang_krum"):  # the others draw nothing at random
            atk.reset()
            torch.testing.assert_close(out.cpu(), atk(h, 3), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ effect: farther than ALIE and sign flip

@pytest.mark.parametrize("seed", [0, 1])
def test_each_optimising_attack_beats_alie_and_sign_flip_against_its_target_rule(seed):
    h, f = cloud(n=16, d=100, seed=seed), 4
    krum, multi_krum, trimmed, median = Krum(f), MultiKrum(f), TrimmedMean(f), Median()
    cases = [(MinMax(), krum), (MinMax(), multi_krum), (MinMax(), trimmed), (MinSum(), krum), (MinSum(), trimmed),
             (FangTrimmedMean(), trimmed), (FangTrimmedMean(), median), (FangKrum(), krum),
             (OptimalALIE(krum), krum), (OptimalALIE(median), median), (OptimalIPM(trimmed), trimmed),
             (OptimalIPM(krum), krum)]
    for atk, rule in cases:
        ours = damage(rule, h, atk(h, f, generator=torch.Generator().manual_seed(seed)))
        plain = max(damage(rule, h, ALIE()(h, f)), damage(rule, h, SignFlip()(h, f)))
        assert ours > 1.1 * plain, (type(atk).__name__, rule, ours, plain)


def test_alie_rejects_a_z_that_is_not_a_finite_number():
    for bad in ("big", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="z must be a finite number"):
            ALIE(z=bad)


def test_fang_krum_names_a_rule_that_reports_no_selection():
    from robustfl_lib.aggregators import Median

    h = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="reports which rows it selected"):
        FangKrum(aggregator=Median())(h, 2)
