"""The evidence standard: intervals that cover the truth, claims on intervals, runs over seeds in lock step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from robustfl_lib import (
    Estimate,
    FLConfig,
    RunFailure,
    base_seed,
    claim,
    compare,
    correct_predictions,
    derive_seeds,
    difference,
    final_metric,
    paired_difference,
    run_federated,
    run_over_seeds,
    run_seeds,
    summarize,
)

N_TEST, K, EXPERIMENTS = 360, 5, 2000


def _coverage(estimates, truth):
    return float(np.mean([e.low <= truth <= e.high for e in estimates]))


def _accuracies(rng, p, n=N_TEST):
    """Per-seed accuracies: binomial(n, p_s) / n."""
    return rng.binomial(n, np.clip(p, 0, 1)) / n


# -- summarize


def test_summarize_covers_the_truth_with_seed_and_test_sample_noise():
    # Seed effects of SD 3 points around 80% (comparable to the binomial SE of 2.1 points on 360 examples).
    rng = np.random.default_rng(0)
    p = 0.8 + 0.03 * rng.standard_normal((EXPERIMENTS, K))
    x = _accuracies(rng, p)
    est = [summarize(row, n_test=N_TEST) for row in x]
    assert 0.93 <= _coverage(est, 0.8) <= 0.98
    # Without the binomial floor the plain t-interval covers just as well here: the floor only acts on tiny spreads.
    plain = [summarize(row) for row in x]
    assert 0.93 <= _coverage(plain, 0.8) <= 0.98


def test_summarize_with_test_sample_noise_only_is_conservative_not_overconfident():
    rng = np.random.default_rng(1)
    x = _accuracies(rng, np.full((EXPERIMENTS, K), 0.8))
    cov = _coverage([summarize(row, n_test=N_TEST) for row in x], 0.8)
    assert 0.95 <= cov <= 0.999  # the floor widens, never narrows (docstring: up to about 99%)


def test_summarize_near_perfect_accuracy_keeps_coverage_through_the_floor():
    # At 99.5% five runs often all score 1.000: without the floor those intervals have zero width and miss.
    rng = np.random.default_rng(2)
    x = _accuracies(rng, np.full((EXPERIMENTS, K), 0.995))
    floored = _coverage([summarize(row, n_test=N_TEST) for row in x], 0.995)
    plain = _coverage([summarize(row) for row in x], 0.995)
    assert floored >= 0.95 and plain < floored


def test_summarize_is_the_student_t_interval():
    x = [0.71, 0.75, 0.69, 0.80, 0.74]
    e = summarize(x, what="mean, final clean accuracy")
    low, high = stats.t.interval(0.95, df=4, loc=np.mean(x), scale=stats.sem(x))
    assert (e.value, e.k, e.values) == (pytest.approx(np.mean(x)), 5, tuple(x))
    assert e.low == pytest.approx(low) and e.high == pytest.approx(high)
    # A spread far above the binomial floor: n_test changes nothing (a floor, not an added term).
    f = summarize(x, n_test=N_TEST)
    assert (f.low, f.high) == (pytest.approx(low), pytest.approx(high))
    wide = summarize(x, confidence=0.99)
    assert wide.low < e.low and wide.high > e.high


def test_floor_gives_identical_seeds_a_positive_width():
    for v in (1.0, 0.8, 0.0):
        e = summarize([v] * 5, n_test=N_TEST)
        assert e.high - e.low > 0 and e.low <= v <= e.high
        assert 0.0 <= e.low and e.high <= 1.0
    # Five perfect runs are 1,800 correct answers: the interval reaches down about 3 / 1800 (rule of three).
    assert 0.996 < summarize([1.0] * 5, n_test=N_TEST).low < 0.9995
    assert summarize([0.8] * 5).high == summarize([0.8] * 5).low  # without n_test there is nothing to floor with


@pytest.mark.parametrize("bad, match", [
    ([0.8], "k >= 2"), ([], "k >= 2"), ([0.8, float("nan"), 0.7], r"finite; seed position\(s\) \[1\]"),
    ([0.8, float("inf")], "finite"), ([[0.8, 0.7]], "1-D"), (["a", "b"], "sequence of numbers"),
])
def test_summarize_refuses_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        summarize(bad)


@pytest.mark.parametrize("n_test", [0, -3, 2.5, True, "360"])
def test_summarize_refuses_bad_n_test(n_test):
    with pytest.raises(ValueError, match="n_test must be a positive integer"):
        summarize([0.8, 0.7], n_test=n_test)


def test_summarize_refuses_non_accuracies_with_n_test_and_bad_confidence():
    with pytest.raises(ValueError, match=r"accuracies in \[0, 1\]"):
        summarize([80.0, 75.0], n_test=N_TEST)
    with pytest.raises(ValueError, match="confidence"):
        summarize([0.8, 0.7], confidence=95)


# -- paired differences


def _paired_experiments(rng, diff, diff_sd, rho=0.7):
    """Per-example correctness of two rules on the same test examples, shape (E, K, N): a shared seed effect,
    a per-seed effect of SD diff_sd on the difference, and correlated errors (a fraction rho of examples
    share one draw)."""
    shape = (EXPERIMENTS, K, 1)
    p_b = 0.8 + 0.03 * rng.standard_normal(shape)
    p_a = p_b + diff + diff_sd * rng.standard_normal(shape)
    u = rng.random((EXPERIMENTS, K, N_TEST))
    shared = rng.random((EXPERIMENTS, K, N_TEST)) < rho
    v = np.where(shared, u, rng.random((EXPERIMENTS, K, N_TEST)))
    return u < p_a, v < p_b


def _both_floors(ca, cb):
    a, b = ca.mean(axis=2), cb.mean(axis=2)
    by_accuracy = [paired_difference(a[i], b[i], n_test=N_TEST) for i in range(EXPERIMENTS)]
    by_example = [paired_difference(a[i], b[i], correct_a=ca[i], correct_b=cb[i]) for i in range(EXPERIMENTS)]
    return a, by_accuracy, by_example


def test_paired_difference_covers_the_truth():
    ca, cb = _paired_experiments(np.random.default_rng(3), diff=0.02, diff_sd=0.02)
    a, by_accuracy, by_example = _both_floors(ca, cb)
    assert 0.93 <= _coverage(by_accuracy, 0.02) <= 0.98
    assert 0.93 <= _coverage(by_example, 0.02) <= 0.98
    # Pairing cancels the 3-point seed effect both share: narrower than the unpaired intervals.
    unpaired = np.mean([summarize(a[i], n_test=N_TEST).half_width for i in range(200)])
    assert np.mean([e.half_width for e in by_accuracy[:200]]) < 0.8 * unpaired


def test_paired_difference_with_test_sample_noise_only_is_conservative():
    # No per-seed effect on the difference: the McNemar floor is the whole variance, and the max() errs wide.
    ca, cb = _paired_experiments(np.random.default_rng(5), diff=0.02, diff_sd=0.0)
    _, by_accuracy, by_example = _both_floors(ca, cb)
    assert 0.95 <= _coverage(by_accuracy, 0.02) <= 0.999
    assert 0.95 <= _coverage(by_example, 0.02) <= 0.999


def test_paired_difference_is_a_paired_t_interval_and_prints_signed():
    a, b = [0.82, 0.85, 0.80, 0.86, 0.83], [0.70, 0.74, 0.69, 0.72, 0.71]
    e = paired_difference(a, b, what="median - mean, final clean accuracy")
    d = np.subtract(a, b)
    low, high = stats.t.interval(0.95, df=4, loc=d.mean(), scale=stats.sem(d))
    assert (e.low, e.high, e.k) == (pytest.approx(low), pytest.approx(high), 5)
    assert str(e) == f"median - mean, final clean accuracy: +{d.mean():.3f} [+{low:.3f}, +{high:.3f}] (95% CI, 5 seeds)"
    assert format(e, ".1%").endswith(f"+{100 * high:.1f}%] (95% CI, 5 seeds)")


def test_paired_floor_identical_rules_and_exact_discordance():
    same = paired_difference([0.8] * 5, [0.8] * 5, n_test=N_TEST)
    assert same.low < 0 < same.high  # two rules scoring alike on 5 seeds are not shown equal to 0 +- 0
    # With per-example correctness the floor is the McNemar variance: more disagreement, wider interval.
    rng = np.random.default_rng(4)
    ca = (rng.random((5, N_TEST)) < 0.8).astype(int)
    agree = paired_difference(ca.mean(1), ca.mean(1), correct_a=ca, correct_b=ca)
    cb = ca.copy()
    cb[:, :40] = 1 - cb[:, :40]  # 40 discordant examples per seed
    disagree = paired_difference(ca.mean(1), cb.mean(1), correct_a=ca, correct_b=cb)
    assert 0 < agree.half_width < disagree.half_width


def test_paired_difference_refuses_bad_input():
    with pytest.raises(ValueError, match="paired, one value per seed each: got 3 and 2"):
        paired_difference([0.8, 0.7, 0.9], [0.8, 0.7])
    with pytest.raises(ValueError, match="k >= 2"):
        paired_difference([0.8], [0.7])
    with pytest.raises(ValueError, match="finite"):
        paired_difference([0.8, np.nan], [0.7, 0.6])
    c = np.ones((2, 10), dtype=int)
    with pytest.raises(ValueError, match="both correct_a and correct_b"):
        paired_difference([1.0, 1.0], [1.0, 1.0], correct_a=c)
    with pytest.raises(ValueError, match=r"shape \(k=2, n_test\)"):
        paired_difference([1.0, 1.0], [1.0, 1.0], correct_a=c[:1], correct_b=c)
    with pytest.raises(ValueError, match="does not match the mean of correct_b"):
        paired_difference([1.0, 1.0], [0.5, 1.0], correct_a=c, correct_b=c)
    with pytest.raises(ValueError, match="n_test=9 but the correctness arrays have 10"):
        paired_difference([1.0, 1.0], [1.0, 1.0], n_test=9, correct_a=c, correct_b=c)


# -- claim


def _est(low, high, what="median - mean, final clean accuracy"):
    return Estimate((low + high) / 2, low, high, 5, (0.1,) * 5, what, 0.95, True)


def test_claim_holds_prints_one_line_and_returns(capsys):
    e = _est(0.08, 0.166)
    assert claim(e, greater_than=0, statement="the median beats the mean") is e
    out = capsys.readouterr().out
    assert out == "CLAIM holds: the median beats the mean: median - mean, final clean accuracy: " \
                  "+0.123 [+0.080, +0.166] (95% CI, 5 seeds)\n"
    assert claim(e, greater_than=0.05, less_than=0.2) is e
    assert capsys.readouterr().out.startswith("CLAIM holds: between 0.05 and 0.2: ")


@pytest.mark.parametrize("bounds", [dict(greater_than=0.1), dict(less_than=0.15), dict(greater_than=0.09, less_than=0.15)])
def test_claim_fails_on_the_interval_not_the_point(bounds, capsys):
    e = _est(0.08, 0.166)  # the point estimate 0.123 satisfies every one of these bounds; the interval does not
    with pytest.raises(AssertionError) as err:
        claim(e, statement="X breaks Y", **bounds)
    assert str(err.value) == f"CLAIM FAILS: X breaks Y: {e}"
    assert "[+0.080, +0.166]" in str(err.value) and "5 seeds" in str(err.value)
    assert capsys.readouterr().out == ""


def test_claim_refuses_bad_bounds():
    e = _est(0.0, 0.1)
    with pytest.raises(ValueError, match="needs a bound"):
        claim(e)
    with pytest.raises(ValueError, match="empty band"):
        claim(e, greater_than=0.2, less_than=0.1)
    with pytest.raises(ValueError, match="finite number"):
        claim(e, greater_than=float("nan"))
    with pytest.raises(TypeError, match="needs an Estimate"):
        claim(0.5, greater_than=0)


# -- seeds


def test_base_seed_reads_the_environment(monkeypatch):
    monkeypatch.delenv("ROBUSTFL_SEED", raising=False)
    assert base_seed() == 0 and base_seed(default=3) == 3
    monkeypatch.setenv("ROBUSTFL_SEED", "7")
    assert base_seed() == 7
    for bad in ("abc", "-1", "1.5"):
        monkeypatch.setenv("ROBUSTFL_SEED", bad)
        with pytest.raises(ValueError, match="ROBUSTFL_SEED must be a non-negative integer"):
            base_seed()


def test_derive_seeds_deterministic_and_distinct():
    s = derive_seeds(7, 5)
    assert s == derive_seeds(7, 5) and len(set(s)) == 5 and all(0 <= x < 2**31 for x in s)
    assert s != derive_seeds(8, 5) and s != derive_seeds(7, 5, stream=1)
    assert derive_seeds(7, 3) == s[:3]


# -- running over seeds in lock step

TINY = dict(num_clients=4, rounds=2, local_epochs=1, batch_size=32, progress=False)


def _params(result):
    return torch.cat([p.detach().flatten() for p in result.model.parameters()])


def test_run_seeds_lock_step_is_deterministic_and_equals_separate_runs(one_thread):
    cfg = FLConfig(**TINY)
    seeds = derive_seeds(0, 3)
    first, again = run_seeds(cfg, seeds), run_seeds(cfg, seeds)
    assert [r.config.seed for r in first] == seeds and cfg.seed == 0  # the caller's config is left alone
    np.testing.assert_array_equal(final_metric(first), final_metric(again))
    for a, b in zip(first, again):
        torch.testing.assert_close(_params(a), _params(b), rtol=0, atol=0)
    for s, got in zip(seeds, first):
        want = run_federated(FLConfig(**dict(TINY, seed=s)))
        torch.testing.assert_close(_params(got), _params(want), rtol=1e-4, atol=1e-5)
    assert not torch.equal(_params(first[0]), _params(first[1]))  # each run really used its own seed
    e = compare({"mean": first})["mean"]
    assert e.k == 3 and e.what == "mean, final clean accuracy" and e.low <= e.value <= e.high


def test_run_over_seeds_pairs_configs_and_keeps_failures(one_thread):
    seeds = [11, 12]
    runs = run_over_seeds({
        "mean": FLConfig(**TINY, aggregator="mean", byzantine_fraction=0.25, byzantine_attack="nonfinite"),
        "median": FLConfig(**TINY, aggregator="median", byzantine_fraction=0.25, byzantine_attack="nonfinite"),
    }, seeds)
    assert all(isinstance(r, RunFailure) and r.kind == "refused" for r in runs["mean"])
    assert [r.config.seed for r in runs["median"]] == seeds
    assert np.isnan(final_metric(runs["mean"])).all()
    with pytest.raises(ValueError, match=r"seed position\(s\) \[0, 1\]"):
        compare(runs)
    assert compare({"median": runs["median"]})["median"].k == 2
    with pytest.raises(ValueError, match="no value of 'robust_accuracy'"):
        final_metric(runs["median"], "robust_accuracy")
    with pytest.raises(ValueError, match="distinct"):
        run_seeds(FLConfig(**TINY), [1, 1])


def test_difference_pairs_by_seed_and_per_example_floor(one_thread):
    seeds = [3, 4]
    runs = run_over_seeds([FLConfig(**TINY, aggregator="mean"), FLConfig(**TINY, aggregator="median")], seeds)
    d = difference(runs, 1, 0)
    np.testing.assert_allclose(d.values, final_metric(runs[1]) - final_metric(runs[0]))
    assert d.what == "1 - 0, final clean accuracy"
    exact = difference(runs, 1, 0, per_example=True)  # checks the history's accuracy against the model's predictions
    assert exact.value == pytest.approx(d.value)
    ok = correct_predictions(runs[0][0])
    assert ok.shape == (N_TEST,) and ok.mean() == pytest.approx(final_metric(runs[0])[0])
    with pytest.raises(ValueError, match="not paired"):
        difference({"a": runs[0], "b": runs[1][::-1]}, "a", "b")
    with pytest.raises(KeyError, match="'c' is not among the results"):
        difference(runs, 0, "c")


def test_estimate_table_shows_intervals_and_refuses_ragged_rows():
    from robustfl_lib import estimate_table, summarize

    e = summarize([0.8, 0.82, 0.81, 0.79, 0.8], n_test=360)
    table = estimate_table({"median": {"none": e, "alie": "n/a"}}, digits=2, corner="rule")
    lines = table.splitlines()
    assert lines[0] == "| rule | none | alie |"
    assert lines[2] == f"| median | {e.value:.2f} [{e.low:.2f}, {e.high:.2f}] | n/a |"
    with pytest.raises(ValueError, match="columns"):
        estimate_table({"a": {"x": e}, "b": {"y": e}})
