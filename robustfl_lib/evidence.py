"""The book's evidence standard: claims about the world, not about seed 0.

A comparative claim in a chapter ("the median beats the mean under ALIE", "ALIE breaks
Krum", "robustness costs clean accuracy") is measured over ``k >= 5`` seeds run in lock
step and printed as an estimate with a 95% interval; the chapter asserts on the interval,
never on one run's number. The base seed comes from ``$ROBUSTFL_SEED``
(:func:`robustfl_lib.runtime.base_seed`) and the seeds from
:func:`robustfl_lib.runtime.derive_seeds`, so the same chapter can be re-run on other
randomness and its claims must still hold. Taught in chapter ``00_introduction``.

* :class:`Estimate`: a point estimate, its interval and the per-seed numbers behind it;
* :func:`summarize`: a t-interval over seeds, floored by the test set's binomial noise;
* :func:`paired_difference`: the same for per-seed differences of two configurations;
* :func:`claim`: assert on an interval and print one line;
* :func:`run_seeds`, :func:`run_over_seeds`: every configuration x seed in one lock-step grid;
* :func:`final_metric`, :func:`compare`, :func:`difference`: from results to estimates.

The interval is the Student-t interval of the mean of ``k`` independent per-seed
measurements (Student 1908; e.g. Wasserman, *All of Statistics*, 2004, sec. 6.3.2 and
10.7), with the variance floored by the binomial variance of an accuracy measured on
``n_test`` examples (the reason is in :func:`summarize`). Paired differences over the same
seeds follow the paired t-test; the per-example floor is the variance behind McNemar's
test (McNemar 1947; Dietterich 1998, "Approximate statistical tests for comparing
supervised classification learning algorithms").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats

from .data import Dataset, load_dataset
from .experiments import RunFailure
from .federated import FLConfig, FLResult, run_federated, run_grid

__all__ = [
    "Estimate",
    "summarize",
    "paired_difference",
    "claim",
    "run_seeds",
    "run_over_seeds",
    "final_metric",
    "correct_predictions",
    "compare",
    "difference",
    "estimate_table",
    "MIN_SEEDS",
]

#: The fewest seeds a comparative claim of the book is measured over.
MIN_SEEDS = 5


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A quantity measured over ``k`` seeds: ``value`` (the mean over seeds) and the
    ``confidence`` interval ``[low, high]`` around it.

    ``values`` are the per-seed numbers the estimate comes from and ``what`` says what was
    measured. ``str(e)`` is one line, ``"median - mean, final clean accuracy: +0.123
    [+0.080, +0.166] (95% CI, 5 seeds)"``; ``format(e, ".1%")`` applies the spec to the
    three numbers. ``signed`` (differences) prints a ``+`` on positive numbers.
    """

    value: float
    low: float
    high: float
    k: int
    values: tuple[float, ...]
    what: str = ""
    confidence: float = 0.95
    signed: bool = False

    @property
    def half_width(self) -> float:
        """Half the interval's width (for a symmetric, unclipped interval: t * SE)."""
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        return self.__format__("")

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        if self.signed and re.fullmatch(r"[0-9.,_]*[a-zA-Z%]?", spec):  # no sign, fill or align given
            spec = "+" + spec
        try:
            v, lo, hi = (format(x, spec) for x in (self.value, self.low, self.high))
        except ValueError as err:
            raise ValueError(f"format spec {spec!r} does not apply to the numbers of an Estimate: {err}") from None
        seeds = f"{self.k} seed" + ("s" if self.k != 1 else "")
        level = f"{100 * self.confidence:g}%"
        label = f"{self.what}: " if self.what else ""
        return f"{label}{v} [{lo}, {hi}] ({level} CI, {seeds})"


def _values(values: Any, name: str) -> np.ndarray:
    """``values`` as a 1-D float array of k >= 2 finite numbers, or a ValueError saying what is wrong."""
    try:
        x = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if x.ndim != 1:
        raise ValueError(f"{name} must be one number per seed (1-D), got shape {x.shape}")
    if len(x) < 2:
        raise ValueError(
            f"{name}: an interval over seeds needs k >= 2 seeds (the book asks for k >= {MIN_SEEDS}), got k = {len(x)}"
        )
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(
            f"{name} must be finite; seed position(s) {bad.tolist()} hold {x[bad].tolist()} (a failed run?)"
        )
    return x


def _n_test(n_test: Any) -> int | None:
    if n_test is None:
        return None
    if isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)) or n_test < 1:
        raise ValueError(f"n_test must be a positive integer (test examples per seed) or None, got {n_test!r}")
    return int(n_test)


def _confidence(confidence: Any) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    return float(confidence)


def _proportions(x: np.ndarray, name: str) -> None:
    if ((x < 0) | (x > 1)).any():
        raise ValueError(f"with n_test, {name} must be accuracies in [0, 1]; got {x.tolist()}")


@functools.lru_cache(maxsize=64)
def _t_quantile(confidence: float, df: int) -> float:
    """``t_{(1+c)/2, df}``, Student's two-sided quantile (cached: chapters and simulations ask for few (c, df))."""
    return float(stats.t.ppf((1 + confidence) / 2, df=df))


def _interval(x: np.ndarray, variance: float, what: str, confidence: float, bounds: tuple[float, float] | None,
              signed: bool) -> Estimate:
    """``mean(x) +- t_{(1+c)/2, k-1} sqrt(variance / k)``, clipped to ``bounds`` (the range of the quantity)."""
    k = len(x)
    mean = float(x.mean())
    half = _t_quantile(confidence, k - 1) * math.sqrt(variance / k)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Estimate(mean, low, high, k, tuple(float(v) for v in x), what, confidence, signed)


def _shrunk(p: np.ndarray, n: int) -> np.ndarray:
    """``(p n + 1/2) / (n + 1)``: the accuracy with one more example that is right with probability 1/2."""
    return (p * n + 0.5) / (n + 1)


def summarize(values: Sequence[float], n_test: int | None = None, what: str = "",
              confidence: float = 0.95) -> Estimate:
    """Estimate and ``confidence`` interval of a metric measured once per seed.

    With ``x_1..x_k`` the per-seed values (k >= 2), ``xbar`` their mean and ``s^2`` their
    sample variance (``ddof=1``), the interval is Student's

        ``xbar +- t_{(1+c)/2, k-1} * sqrt(v / k)``,   ``v = s^2``    (``n_test=None``)

    (scipy's ``stats.t.ppf``). It covers the mean of the metric over seeds: what this
    configuration gives on average over everything a seed draws (split, partition,
    initialisation, client sampling, attack noise).

    With ``n_test`` the values are accuracies, each measured on ``n_test`` test examples,
    and the variance is floored by the binomial term:

        ``v = max(s^2, mean_s(q_s (1 - q_s)) / n_test)``,   ``q_s = (x_s n_test + 1/2) / (n_test + 1)``.

    Why: a seed's accuracy varies with the seed *and* with the finite test sample (on
    digits, 360 examples: one example is 0.28 points, the binomial SE near 80% is about 2
    points). In expectation ``s^2`` already contains that binomial variance, so the floor is
    a maximum, not a sum; but with k = 5, ``s^2`` can come out tiny or zero by chance
    (five runs at 1.000), and an interval of zero width would claim a precision that 360
    test examples cannot give. ``q_s`` adds one example that is right with probability
    1/2, so that a perfect 1.000 still carries the uncertainty of a finite test set. The
    floor makes the interval conservative when the seed-to-seed variance is small
    compared with the binomial one (coverage up to about 99.5% rather than 95%); it never
    narrows it. With ``n_test`` the interval is clipped to ``[0, 1]``.

    Chapter ``00_introduction`` (the evidence standard).
    """
    x = _values(values, "values")
    n = _n_test(n_test)
    confidence = _confidence(confidence)
    variance = float(x.var(ddof=1))
    if n is not None:
        _proportions(x, "values")
        q = _shrunk(x, n)
        variance = max(variance, float(np.mean(q * (1 - q))) / n)
    return _interval(x, variance, what, confidence, (0.0, 1.0) if n is not None else None, signed=False)


def _correctness(correct: Any, name: str, k: int) -> np.ndarray:
    c = np.asarray(correct)
    if c.ndim != 2 or c.shape[0] != k:
        raise ValueError(f"{name} must be one 0/1 row per seed, shape (k={k}, n_test), got shape {c.shape}")
    if c.shape[1] < 1 or not ((c == 0) | (c == 1)).all():
        raise ValueError(f"{name} must hold only 0/1 (or False/True) per test example")
    return c.astype(float)


def paired_difference(a: Sequence[float], b: Sequence[float], n_test: int | None = None, what: str = "",
                      correct_a: Any = None, correct_b: Any = None, confidence: float = 0.95) -> Estimate:
    """Estimate and interval of ``a - b`` where ``a[s]`` and ``b[s]`` were measured with the same seed ``s``.

    Lock step makes the comparison paired: both configurations see the same split,
    partition, initialisation and client draws, so the per-seed differences
    ``d_s = a_s - b_s`` cancel what the seed does to both, and their t-interval

        ``dbar +- t_{(1+c)/2, k-1} * sqrt(v / k)``,   ``v = max(s_d^2, floor)``

    is much narrower than comparing two :func:`summarize` intervals. It covers the
    expected difference of the two configurations over seeds and test samples (the
    difference a reader would see on average re-running both with fresh seeds), not the
    difference on one test set.

    The floor (only with ``n_test`` or correctness arrays) is the test-sample variance of a
    difference of two accuracies measured on the *same* ``n`` test examples: with
    ``e_i = c^a_i - c^b_i`` in {-1, 0, 1} the per-example difference of correctness,
    ``Var(dbar_s) = (mean(e^2) - mean(e)^2) / n`` (the variance McNemar's test uses:
    ``mean(e^2)`` is the discordance rate, ``mean(e) = a_s - b_s``). As in
    :func:`summarize`, one extra example on which each side is right with probability 1/2
    (``e`` = -1, 0, 1 with probabilities 1/4, 1/2, 1/4) keeps it positive:

        ``floor = mean_s((D_s + 1/2) / (n + 1) - (n d_s / (n + 1))^2) / n``.

    ``D_s`` is the discordance rate of seed ``s``: exact when the per-example correctness
    ``correct_a``, ``correct_b`` (shape ``(k, n_test)``, 0/1) are given; otherwise its
    smallest value consistent with the two accuracies, ``|a_s - b_s|`` (two models that
    disagree on no more examples than their accuracies force), so that the floor never
    exceeds the true test-sample variance. The interval is clipped to ``[-1, 1]`` then.

    Chapter ``00_introduction`` (the evidence standard).
    """
    xa, xb = _values(a, "a"), _values(b, "b")
    if len(xa) != len(xb):
        raise ValueError(f"a and b must be paired, one value per seed each: got {len(xa)} and {len(xb)} values")
    confidence = _confidence(confidence)
    n = _n_test(n_test)
    d = xa - xb
    variance = float(d.var(ddof=1))
    if (correct_a is None) != (correct_b is None):
        raise ValueError("give both correct_a and correct_b (per-example correctness of each side), or neither")
    if correct_a is not None:
        ca, cb = _correctness(correct_a, "correct_a", len(d)), _correctness(correct_b, "correct_b", len(d))
        if ca.shape != cb.shape:
            raise ValueError(f"correct_a and correct_b must be on the same test examples: shapes {ca.shape} and {cb.shape}")
        if n is not None and n != ca.shape[1]:
            raise ValueError(f"n_test={n} but the correctness arrays have {ca.shape[1]} test examples")
        n = ca.shape[1]
        for name, x, c in (("a", xa, ca), ("b", xb, cb)):
            if not np.allclose(x, c.mean(axis=1), atol=0.5 / n):
                raise ValueError(f"{name} does not match the mean of correct_{name} per seed: "
                                 f"{x.tolist()} vs {c.mean(axis=1).tolist()}")
        discordance = np.abs(ca - cb).mean(axis=1)
    elif n is not None:
        _proportions(xa, "a")
        _proportions(xb, "b")
        discordance = np.abs(d)
    if n is not None:
        shrunk_d = d * n / (n + 1)
        variance = max(variance, float(np.mean(_shrunk(discordance, n) - shrunk_d**2)) / n)
    return _interval(d, variance, what, confidence, (-1.0, 1.0) if n is not None else None, signed=True)


def claim(estimate: Estimate, greater_than: float | None = None, less_than: float | None = None,
          statement: str = "") -> Estimate:
    """Assert that the whole interval of ``estimate`` lies beyond a bound; print one line.

    ``greater_than=x`` needs the interval's low end ``> x``; ``less_than=x`` its high end
    ``< x``; both give a band. A claim is a statement about the quantity, so it must hold
    for every value the interval leaves plausible, not just for the point estimate.
    Prints ``CLAIM holds: <statement>: <estimate>`` and returns ``estimate``, or raises
    ``AssertionError`` with ``CLAIM FAILS: <statement>: <estimate>``. Without a
    ``statement`` the bound is the statement.
    """
    if not isinstance(estimate, Estimate):
        raise TypeError(f"claim needs an Estimate (from summarize, paired_difference, compare or difference), "
                        f"got {type(estimate).__name__}")
    for name, bound in (("greater_than", greater_than), ("less_than", less_than)):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float, np.number))
                                  or not math.isfinite(bound)):
            raise ValueError(f"{name} must be a finite number or None, got {bound!r}")
    if greater_than is None and less_than is None:
        raise ValueError("claim needs a bound: greater_than (the interval's low end must exceed it), "
                         "less_than (its high end must stay below it), or both")
    if greater_than is not None and less_than is not None and not greater_than < less_than:
        raise ValueError(f"an empty band: greater_than={greater_than} must be < less_than={less_than}")
    if not statement:
        if less_than is None:
            statement = f"above {greater_than:g}"
        elif greater_than is None:
            statement = f"below {less_than:g}"
        else:
            statement = f"between {greater_than:g} and {less_than:g}"
    holds = (greater_than is None or estimate.low > greater_than) and (less_than is None or estimate.high < less_than)
    line = f"{statement}: {estimate}"
    if not holds:
        raise AssertionError(f"CLAIM FAILS: {line}")
    print(f"CLAIM holds: {line}")
    return estimate


# -- running over seeds


def _seed_list(seeds: Sequence[int]) -> list[int]:
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"seeds must be non-negative integers, got {s!r}")
        out.append(int(s))
    if not out:
        raise ValueError("seeds is empty; derive them with robustfl_lib.derive_seeds(base_seed(), k)")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct (a repeated seed repeats its run and fakes agreement): {out}")
    return out


def _seed_data(data: Dataset | Mapping[int, Dataset] | None, seed: int) -> Dataset | None:
    return data[seed] if isinstance(data, Mapping) else data


def _run_one_by_one(configs: list[FLConfig], data: Dataset | Mapping[int, Dataset] | None) -> list[FLResult | RunFailure]:
    """What :func:`robustfl_lib.experiments.run_attacks` does when a grid fails: each run alone, failures kept."""
    out: list[FLResult | RunFailure] = []
    for cfg in configs:
        done: list[dict] = []
        try:
            out.append(run_federated(cfg, data=_seed_data(data, cfg.seed), callback=done.append))
        except ValueError as err:
            out.append(RunFailure(str(err), "refused", done))
        except FloatingPointError as err:
            out.append(RunFailure(str(err), "diverged", done))
    return out


def _lock_step(configs: list[FLConfig], data: Dataset | Mapping[int, Dataset] | None,
               progress: bool) -> list[FLResult] | None:
    """One :func:`run_grid` call, or ``None`` if it cannot batch these configs or a run fails."""
    try:
        return run_grid(configs, data=data, progress=progress)
    except (ValueError, FloatingPointError):
        return None


def run_over_seeds(configs: Mapping[Any, FLConfig] | Sequence[FLConfig], seeds: Sequence[int],
                   data: Dataset | Mapping[int, Dataset] | None = None,
                   progress: bool = False) -> dict[Any, list[FLResult | RunFailure]]:
    """Run every configuration with every seed, in lock step; ``{name: [result per seed]}``.

    ``configs`` is a mapping ``{name: FLConfig}`` or a list (keys are then the positions).
    Each run is ``dataclasses.replace(config, seed=s)``, so configurations ``A`` and
    ``B`` at seed ``s`` share the data split, partition, initialisation and client
    draws: :func:`paired_difference` of their metrics is a paired comparison. Without
    ``data`` each seed loads its own seeded dataset (its own train/test split, loaded
    once); ``data`` may be one dataset for every seed or a dict ``{seed: Dataset}``.

    All runs train in one :func:`robustfl_lib.federated.run_grid` call: one batched
    local training per round for everything. If that grid cannot run (a model with
    BatchNorm, or a run that fails), each configuration's seeds are tried as a grid of
    their own, and a group that still fails runs one config at a time; a failed run is
    a :class:`robustfl_lib.experiments.RunFailure` (as in
    :func:`robustfl_lib.experiments.run_attacks`), whose metrics are NaN, which
    :func:`summarize` refuses, naming the failed run's position among the seeds.
    """
    named = dict(configs) if isinstance(configs, Mapping) else dict(enumerate(configs))
    if not named:
        raise ValueError("run_over_seeds needs at least one config")
    for name, cfg in named.items():
        if not isinstance(cfg, FLConfig):
            raise TypeError(f"config {name!r} must be an FLConfig, got {type(cfg).__name__}")
        cfg.validate()  # a bad setting is the caller's error, not a failed run
    seeds = _seed_list(seeds)
    if isinstance(data, Mapping):
        missing = sorted(set(seeds) - set(data))
        if missing:
            raise ValueError(f"data has datasets for seeds {sorted(data)} but not for seed(s) {missing}")
    elif data is None and len({(c.dataset, repr(c.dataset_kwargs)) for c in named.values()}) == 1:
        first = next(iter(named.values()))  # loaded once here, not again by every fallback run
        data = {s: load_dataset(first.dataset, seed=s, **first.dataset_kwargs) for s in seeds}
    runs = {name: [dataclasses.replace(cfg, seed=s, progress=False) for s in seeds] for name, cfg in named.items()}
    grid = _lock_step([c for group in runs.values() for c in group], data, progress)
    if grid is not None:
        return {name: grid[i * len(seeds):(i + 1) * len(seeds)] for i, name in enumerate(named)}
    return {name: _lock_step(group, data, progress) or _run_one_by_one(group, data) for name, group in runs.items()}


def run_seeds(config: FLConfig, seeds: Sequence[int], data: Dataset | Mapping[int, Dataset] | None = None,
              progress: bool = False) -> list[FLResult | RunFailure]:
    """``config`` run once per seed, all in lock step (see :func:`run_over_seeds`); one result per seed."""
    return run_over_seeds({"run": config}, seeds, data=data, progress=progress)["run"]


# -- from results to estimates


def final_metric(results: Sequence[FLResult | RunFailure], key: str = "clean_accuracy") -> np.ndarray:
    """The last recorded (non-``None``) value of ``key`` in each run's history; NaN for a failed run."""
    out = np.empty(len(results))
    for i, r in enumerate(results):
        if isinstance(r, RunFailure):
            out[i] = np.nan
            continue
        if not isinstance(r, FLResult):
            raise TypeError(f"results[{i}] must be an FLResult or RunFailure, got {type(r).__name__}")
        recorded = [h[key] for h in r.history if h.get(key) is not None]
        if not recorded:
            known = sorted(r.history[-1]) if r.history else []
            raise ValueError(f"results[{i}] (seed {r.config.seed}) has no value of {key!r} in its history "
                             f"(robust_accuracy needs eval_eps); keys: {known}")
        out[i] = float(recorded[-1])
    return out


_TEST_SIZES: dict[str, int] = {}


def _test_size(config: FLConfig) -> int:
    # The split sizes do not depend on the seed (a stratified split of a fixed fraction), so one load tells.
    key = f"{config.dataset}|{config.dataset_kwargs!r}"
    if key not in _TEST_SIZES:
        _TEST_SIZES[key] = len(load_dataset(config.dataset, seed=config.seed, **config.dataset_kwargs).y_test)
    return _TEST_SIZES[key]


def _resolve_n_test(results: Sequence[FLResult | RunFailure], key: str, n_test: int | None,
                    data: Dataset | Mapping[int, Dataset] | None) -> int | None:
    """Test examples behind ``key``: the caller's, ``data``'s, or the runs' dataset's; None if ``key`` is no accuracy."""
    if not key.endswith("accuracy"):
        if n_test is not None:
            raise ValueError(f"n_test floors the variance of an accuracy; {key!r} is not one")
        return None
    if n_test is not None:
        return _n_test(n_test)
    if isinstance(data, Mapping):
        return min(len(d.y_test) for d in data.values())  # the smallest test set: the widest floor
    if data is not None:
        return len(data.y_test)
    ok = [r for r in results if isinstance(r, FLResult)]
    if not ok:
        return None  # every run failed: summarize refuses the NaNs anyway
    return _test_size(ok[0].config)


def _label(key: str) -> str:
    return "final " + key.replace("_", " ")


def compare(results_by_name: Mapping[Any, Sequence[FLResult | RunFailure]], key: str = "clean_accuracy",
            n_test: int | None = None, data: Dataset | Mapping[int, Dataset] | None = None,
            confidence: float = 0.95) -> dict[Any, Estimate]:
    """:func:`summarize` of ``final_metric(runs, key)`` for each name of :func:`run_over_seeds`.

    For an accuracy, ``n_test`` (the binomial floor) is the caller's, else ``data``'s
    test size, else that of the runs' dataset (digits: 360).
    """
    return {name: summarize(final_metric(runs, key), n_test=_resolve_n_test(runs, key, n_test, data),
                            what=f"{name}, {_label(key)}", confidence=confidence)
            for name, runs in results_by_name.items()}


def correct_predictions(result: FLResult, data: Dataset | Mapping[int, Dataset] | None = None) -> np.ndarray:
    """Which test examples ``result.model`` (the final global model) classifies correctly, as a 0/1 array.

    On ``data``'s test split (``data[seed]`` for a dict), or on the split of ``result.config``'s dataset at its seed
    (the one the run was evaluated on when it loaded its own data). Its mean is the
    run's final clean accuracy; :func:`difference` uses it for the exact paired floor.
    """
    if not isinstance(result, FLResult):
        raise TypeError(f"correct_predictions needs an FLResult, got {type(result).__name__}")
    cfg = result.config
    data = _seed_data(data, cfg.seed)
    data = data if data is not None else load_dataset(cfg.dataset, seed=cfg.seed, **cfg.dataset_kwargs)
    model = result.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ok = [(model(x.to(device)).argmax(dim=1) == y.to(device)).cpu()
                  for x, y in zip(data.x_test.split(1024), data.y_test.split(1024))]
    finally:
        model.train(was_training)
    return torch.cat(ok).numpy().astype(np.int8)


def difference(results_by_name: Mapping[Any, Sequence[FLResult | RunFailure]], a: Any, b: Any,
               key: str = "clean_accuracy", n_test: int | None = None, data: Dataset | Mapping[int, Dataset] | None = None,
               per_example: bool = False, confidence: float = 0.95) -> Estimate:
    """:func:`paired_difference` of ``final_metric`` of runs ``a`` minus runs ``b``, seed by seed.

    The two lists must hold the same seeds in the same order (as :func:`run_over_seeds`
    makes them). ``per_example=True`` (clean accuracy only) evaluates each final model
    on its test split (:func:`correct_predictions`) for the exact McNemar floor instead
    of the smallest one the accuracies allow.
    """
    for name in (a, b):
        if name not in results_by_name:
            raise KeyError(f"{name!r} is not among the results: {list(results_by_name)}")
    runs_a, runs_b = results_by_name[a], results_by_name[b]
    seeds_a = [r.config.seed if isinstance(r, FLResult) else None for r in runs_a]
    seeds_b = [r.config.seed if isinstance(r, FLResult) else None for r in runs_b]
    if len(runs_a) != len(runs_b) or any(x is not None and y is not None and x != y for x, y in zip(seeds_a, seeds_b)):
        raise ValueError(f"{a!r} and {b!r} are not paired: seeds {seeds_a} vs {seeds_b}")
    xa, xb = final_metric(runs_a, key), final_metric(runs_b, key)
    n = _resolve_n_test(list(runs_a) + list(runs_b), key, n_test, data)
    correct_a = correct_b = None
    if per_example:
        if key != "clean_accuracy":
            raise ValueError(f"per_example=True needs key='clean_accuracy' (the final models' predictions), got {key!r}")
        failed = [i for i, r in enumerate(list(runs_a) + list(runs_b)) if isinstance(r, RunFailure)]
        if failed:
            raise ValueError(f"per_example=True needs every run's final model; runs {failed} failed")
        correct_a = np.stack([correct_predictions(r, data) for r in runs_a])
        correct_b = np.stack([correct_predictions(r, data) for r in runs_b])
        n = None  # the arrays give it
    return paired_difference(xa, xb, n_test=n, what=f"{a} - {b}, {_label(key)}", correct_a=correct_a,
                             correct_b=correct_b, confidence=confidence)


def estimate_table(cells: Mapping[Any, Mapping[Any, Estimate | str]], digits: int = 2, corner: str = "") -> str:
    """A markdown table of estimates, ``cells[row][column]``, each shown as ``value [low, high]``
    (a string cell, e.g. ``"n/a"`` for a rule that cannot run, is shown as it is). Every row
    must have the columns of the first. The chapters print their comparisons with it."""
    if not cells:
        raise ValueError("estimate_table needs at least one row")
    columns = list(next(iter(cells.values())))
    for row, values in cells.items():
        if list(values) != columns:
            raise ValueError(f"row {row!r} has columns {list(values)}, the first row has {columns}")
    fmt = f".{int(digits)}f"

    def show(cell: Estimate | str) -> str:
        if isinstance(cell, Estimate):
            return f"{cell.value:{fmt}} [{cell.low:{fmt}}, {cell.high:{fmt}}]"
        return str(cell)

    lines = [f"| {corner} | " + " | ".join(map(str, columns)) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(show(v) for v in values.values()) + " |" for row, values in cells.items()]
    return "\n".join(lines)
