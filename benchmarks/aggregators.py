"""Seconds per call of every aggregator against straightforward references.

    python benchmarks/aggregators.py               # both settings, 5 repeats, 1 thread (a few minutes)
    python benchmarks/aggregators.py --quick       # small sizes, to check that it runs

Settings: (n, d) = (50, 1,000,000) and (200, 100,000) float32 updates, f = n / 5.
References (what a first implementation would write):

* Krum / Multi-Krum: the seed tutorial's pairwise Python double loop over clients
  (``torch.norm(x_i - x_j)`` for every pair, then a per-row sort);
* median / trimmed mean: a full per-coordinate ``torch.sort`` along the client
  dimension (the seed's trimmed mean), and for transparency the same with NumPy's
  SIMD sort, which the library's CPU path uses.

Each timing is the median of ``--repeats`` calls after one warm-up call; the
calls of all rules are interleaved, so a change in machine load hits them
alike, and each rule and its reference alternate which runs first. NNM's peak memory is the growth of the process's maximum resident set
size during one call (Linux ``VmHWM``, reset just before the call), measured in a
fresh subprocess after the input exists; ``tracemalloc`` does not see torch's allocations.
Goals: Krum and Multi-Krum >= 5x the loop at n=50, d=1e6 (issue 4); Krum, exact distances
included, within 1.5x of one ``X @ X.T`` (issue 12); median and trimmed mean no slower than the
sort reference.

Issue 14's rules (``--rules issue14`` runs only them) at n=50, d=1e6: Meamed, MDA, MoNNA, CAF, SMEA,
Bucketing and ARC, each printed beside three baselines timed in the same interleaved loop (the mean,
one ``X @ X.T``, one scaled copy ``2 * X``: a pass that writes ``(n, d)``), and beside ByzFL's
version of the rule when ``byzfl`` is installed. MDA and
SMEA search all C(n, f) subsets, so they run at f = 3 (19,600 subsets), the others at f = n / 5.
The filters DnC and SignGuard (not in ByzFL) run with their defaults (DnC: 5 iterations on 10,000
coordinates; SignGuard: mean shift on the sign statistics of a 10% block) and seeded generators.
``--only dnc,signguard`` keeps the rows whose name contains one of the words, beside the baselines.
Goal: Bucketing and ARC cost at most one extra pass over the updates: a read (the norms, the
bucket sums) plus at most one written copy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import robustfl_lib as rfl  # noqa: E402
from robustfl_lib.peers import import_byzfl  # noqa: E402

GOAL_KRUM_SPEEDUP = 5.0
GOAL_KRUM_VS_GRAM = 1.5


# ---------------------------------------------------------------- references


def loop_krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """The seed's Krum: a Python double loop over client pairs, then a sort per row
    (with Blanchard et al.'s squared distances over the n - f - 2 nearest)."""
    n = x.shape[0]
    distances = torch.zeros(n, n)
    for i in range(n):
        for j in range(i + 1, n):
            d = torch.norm(x[i] - x[j]) ** 2
            distances[i, j] = d
            distances[j, i] = d
    scores = []
    for i in range(n):
        sorted_d, _ = torch.sort(distances[i])
        scores.append(sorted_d[1 : n - f - 1].sum())
    return torch.stack(scores)


def loop_krum(x: torch.Tensor, f: int) -> torch.Tensor:
    return x[int(loop_krum_scores(x, f).argmin())]


def loop_multi_krum(x: torch.Tensor, f: int) -> torch.Tensor:
    chosen = torch.argsort(loop_krum_scores(x, f))[: x.shape[0] - f]
    return x[chosen].mean(dim=0)


def gram_product(x: torch.Tensor) -> torch.Tensor:
    """One ``X @ X.T`` in float32 with torch: the least work any Gram-based distance needs."""
    return x @ x.T


def _sorted(x: torch.Tensor, numpy: bool) -> torch.Tensor:
    return torch.from_numpy(np.sort(x.numpy(), axis=0)) if numpy else torch.sort(x, dim=0).values


def sort_median(x: torch.Tensor, numpy: bool = False) -> torch.Tensor:
    s = _sorted(x, numpy)
    n = s.shape[0]
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def sort_trimmed_mean(x: torch.Tensor, f: int, numpy: bool = False) -> torch.Tensor:
    s = _sorted(x, numpy)
    return s[f : s.shape[0] - f].mean(dim=0)


# ---------------------------------------------------------------- timing


def rules(f: int) -> dict[str, tuple[Callable, Callable | None, str]]:
    """name -> (ours, reference or None, reference name)."""
    return {
        "mean": (rfl.Mean(), None, ""),
        "median": (rfl.Median(), sort_median, "torch.sort"),
        "median (numpy sort ref.)": (rfl.Median(), lambda x: sort_median(x, numpy=True), "np.sort"),
        "trimmed_mean": (rfl.TrimmedMean(f), lambda x: sort_trimmed_mean(x, f), "torch.sort"),
        "trimmed_mean (numpy sort ref.)": (rfl.TrimmedMean(f), lambda x: sort_trimmed_mean(x, f, True), "np.sort"),
        "krum": (rfl.Krum(f), lambda x: loop_krum(x, f), "seed loop"),
        "multi_krum": (rfl.MultiKrum(f), lambda x: loop_multi_krum(x, f), "seed loop"),
        # Exact distances must stay cheap: Krum against the one Gram product any distance-based
        # rule needs, measured side by side (issue 12's goal: within 1.5x).
        "krum (vs one Gram product)": (rfl.Krum(f), gram_product, "torch X @ X.T"),
        "geometric_median": (rfl.GeometricMedian(), None, ""),
        "centered_clipping": (rfl.CenteredClipping(), None, ""),
        "bulyan": (rfl.Bulyan(f), None, ""),
        "nnm (pre-aggregation)": (rfl.NNM(f), None, ""),
        "nnm+krum": (rfl.Pipeline(rfl.NNM(f), rfl.Krum(f)), None, ""),
        "clipping (pre-aggregation)": (rfl.Clipping(), None, ""),
    }


def _time(fn: Callable, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def bench(n: int, d: int, repeats: int, seed: int = 0) -> list[dict]:
    f = n // 5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:f] += 0.5  # f shifted rows, as Byzantine clients would be
    table = rules(f)
    checks = {}
    for name, (ours, ref, _) in table.items():  # warm-up, and ours agrees with the reference
        out = ours(x)
        if ref is not None:
            want = ref(x)
            checks[name] = float((out - want).abs().max()) if want.shape == out.shape else float("nan")
    times: dict[str, list[float]] = {k: [] for k in table}
    ref_times: dict[str, list[float]] = {k: [] for k, v in table.items() if v[1] is not None}
    for rep in range(repeats):
        for name, (ours, ref, _) in table.items():
            # Alternate which of the pair runs first: the first call after a large free pays
            # the page faults of fresh memory, and that must not always be the same one.
            first_ours = rep % 2 == 0 or ref is None
            if first_ours:
                times[name].append(_time(ours, x))
            if ref is not None:
                ref_times[name].append(_time(ref, x))
            if not first_ours:
                times[name].append(_time(ours, x))
    rows = []
    for name, (_, ref, ref_name) in table.items():
        row = {"n": n, "d": d, "f": f, "rule": name, "seconds": float(np.median(times[name]))}
        if ref is not None:
            row.update(reference=ref_name, reference_seconds=float(np.median(ref_times[name])),
                       max_abs_diff=checks[name])
            row["speedup"] = row["reference_seconds"] / row["seconds"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------- issue 14's rules

F_SUBSET = 3  # MDA and SMEA search C(n, f) subsets: C(50, 3) = 19,600


def issue14_rules(n: int, d: int, f: int) -> dict[str, tuple[Callable, Callable | None, str]]:
    """name -> (ours, ByzFL's rule or None, its name): ByzFL's only when ``byzfl`` is installed."""
    byzfl = import_byzfl()

    def theirs(make):
        if byzfl is None:
            return None
        rule = make(byzfl)
        return lambda x: rule(x.clone())

    ref = "byzfl" if byzfl is not None else "(byzfl not installed)"
    # ByzFL's SMEA runs a Python loop over the C(n, f) subsets, each copying its (n - f, d) rows
    # and taking a power step in dimension d: 19,600 such steps at n=50, d=1e6, far over an hour.
    smea_theirs = theirs(lambda b: b.SMEA(f=F_SUBSET)) if math.comb(n, F_SUBSET) * d <= 10**8 else None
    smea_ref = ref if smea_theirs is not None or byzfl is None else "byzfl: not timed (C(n, f) x d > 1e8)"

    gen = torch.Generator().manual_seed(0)
    return {
        "mean (baseline)": (rfl.Mean(), None, ""),
        "one X @ X.T (baseline)": (gram_product, None, ""),
        # What one pass that writes an (n, d) result costs (fresh memory's page faults included):
        # the yardstick for pre-aggregation, which must return new rows.
        "one scaled copy 2 * X (baseline)": (lambda x: x * 2.0, None, ""),
        f"meamed (f={f})": (rfl.Meamed(f), theirs(lambda b: b.Meamed(f=f)), ref),
        f"mda (f={F_SUBSET})": (rfl.MDA(F_SUBSET), theirs(lambda b: b.MDA(f=F_SUBSET)), ref),
        f"monna (f={f})": (rfl.MoNNA(f), theirs(lambda b: b.MoNNA(f=f)), ref),
        f"caf (f={f})": (rfl.CAF(f), theirs(lambda b: b.CAF(f=f)), ref),
        f"smea (f={F_SUBSET})": (rfl.SMEA(F_SUBSET), smea_theirs, smea_ref),
        "bucketing s=2 (pre-aggregation)": (rfl.Bucketing(2, generator=gen), theirs(lambda b: b.Bucketing(s=2)), ref),
        f"arc (f={f}, pre-aggregation)": (rfl.ARC(f), theirs(lambda b: b.ARC(f=f)), ref),
        "bucketing+centered_clipping": (rfl.get_aggregator("bucketing+centered_clipping", f=f), None, ""),
        f"arc+nnm+trimmed_mean (f={f})": (rfl.get_aggregator("arc+nnm+trimmed_mean", f=f), None, ""),
        f"dnc (f={f})": (rfl.DnC(f, generator=torch.Generator().manual_seed(0)), None, "(not in ByzFL)"),
        "signguard": (rfl.SignGuard(generator=torch.Generator().manual_seed(0)), None, "(not in ByzFL)"),
        "signguard (dbscan)": (rfl.SignGuard(clustering="dbscan", generator=torch.Generator().manual_seed(0)), None,
                               "(not in ByzFL)"),
    }


def bench_issue14(n: int, d: int, repeats: int, seed: int = 0, only: list[str] | None = None) -> list[dict]:
    f = n // 5
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    x[:f] += 0.5
    table = issue14_rules(n, d, f)
    if only:  # the baselines stay: every ratio is to them, measured in the same run
        table = {k: v for k, v in table.items() if "(baseline)" in k or any(w in k for w in only)}
    for ours, ref, _ in table.values():  # warm-up
        ours(x)
        if ref is not None:
            ref(x)
    times: dict[str, list[float]] = {k: [] for k in table}
    ref_times: dict[str, list[float]] = {k: [] for k, v in table.items() if v[1] is not None}
    for _ in range(repeats):
        for name, (ours, ref, _) in table.items():
            times[name].append(_time(ours, x))
            if ref is not None:
                ref_times[name].append(_time(ref, x))
    mean_s = float(np.median(times["mean (baseline)"]))
    gram_s = float(np.median(times["one X @ X.T (baseline)"]))
    copy_s = float(np.median(times["one scaled copy 2 * X (baseline)"]))
    rows = []
    for name, (_, ref, ref_name) in table.items():
        sec = float(np.median(times[name]))
        row = {"n": n, "d": d, "rule": name, "seconds": sec, "x_mean": sec / mean_s, "x_gram": sec / gram_s,
               "x_copy": sec / copy_s}
        if ref is not None:
            row.update(reference=ref_name, reference_seconds=float(np.median(ref_times[name])))
            row["speedup"] = row["reference_seconds"] / sec
        elif ref_name:
            row["note"] = ref_name
        rows.append(row)
    return rows


def print_issue14(rows: list[dict]) -> None:
    print("| n | d | rule | seconds | / mean | / X @ X.T | / copy | ByzFL seconds | speed-up vs ByzFL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = f"{r['reference_seconds']:.3f} | {r['speedup']:.1f}x" if "reference" in r else f"{r.get('note', '')} | "
        print(f"| {r['n']} | {r['d']:,} | {r['rule']} | {r['seconds']:.3f} | {r['x_mean']:.2f} | {r['x_gram']:.2f} | "
              f"{r['x_copy']:.2f} | {ref} |")
    print()


# ---------------------------------------------------------------- memory


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(n: int, d: int, f: int) -> None:
    """Print the growth of peak RSS during one NNM call (Linux: the peak is reset first
    through /proc/self/clear_refs, so that importing torch does not hide it)."""
    x = torch.randn(n, d)
    x.sum()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_mb("VmRSS")
        rfl.NNM(f)(x)
        growth = _rss_mb("VmHWM") - before
    except (OSError, RuntimeError):  # not Linux: ru_maxrss, which may under-report
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rfl.NNM(f)(x)
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(json.dumps({"input_mb": x.numel() * 4 / 2**20, "peak_growth_mb": growth}))


def nnm_peak_memory(n: int, d: int, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--nnm-peak", f"{n},{d}", "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(n=n, d=d, naive_nnd_mb=n * n * d * 4 / 2**20)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a shared CPU)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--rules", choices=("all", "issue14"), default="all",
                        help="issue14: only issue 14's rules with their baselines, at the first setting")
    parser.add_argument("--only", default=None,
                        help="with --rules issue14: comma-separated words; only the rows whose name contains one "
                             "(and the baselines), e.g. --only dnc,signguard")
    parser.add_argument("--nnm-peak", default=None, help=argparse.SUPPRESS)  # n,d: the memory subprocess
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The library hands some CPU work to NumPy (sorting, BLAS syrk); hold its BLAS to the same
    # thread count, so that ours and the references compete on equal terms.
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    threadpool_limits(args.threads)
    if args.nnm_peak:
        n, d = map(int, args.nnm_peak.split(","))
        _peak_child(n, d, n // 5)
        return
    settings = [(50, 20_000), (40, 5_000)] if args.quick else [(50, 1_000_000), (200, 100_000)]
    repeats = 2 if args.quick else args.repeats
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} thread(s), float32, "
          f"median of {repeats} calls; {os.cpu_count()} CPUs, load average {load:.1f} at start\n")
    only = [w.strip() for w in args.only.split(",") if w.strip()] if args.only else None
    if only and args.rules != "issue14":
        parser.error("--only needs --rules issue14")
    rows14 = bench_issue14(*settings[0], repeats, only=only)
    if args.rules == "issue14":
        print_issue14(rows14)
        if args.json:
            args.json.write_text(json.dumps({"issue14": rows14}, indent=1))
        return
    rows = []
    for n, d in settings:
        rows += bench(n, d, repeats)
    print("| n | d | rule | seconds | reference | ref. seconds | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = (f"{r['reference']} | {r['reference_seconds']:.3f} | {r['speedup']:.1f}x" if "reference" in r
               else " | | ")
        print(f"| {r['n']} | {r['d']:,} | {r['rule']} | {r['seconds']:.3f} | {ref} |")
    print()
    mem = [nnm_peak_memory(n, d, args.threads) for n, d in settings]
    for m in mem:
        print(f"NNM peak memory at n={m['n']}, d={m['d']:,}: +{m['peak_growth_mb']:.0f} MB over a "
              f"{m['input_mb']:.0f} MB input (an (n, n, d) array would need {m['naive_nnd_mb']:,.0f} MB)")
    big = {r["rule"]: r for r in rows if (r["n"], r["d"]) == settings[0]}
    print("\nGoals at n={}, d={:,}:".format(*settings[0]))
    for name in ("krum", "multi_krum"):
        ok = big[name]["speedup"] >= GOAL_KRUM_SPEEDUP
        print(f"  {name}: {big[name]['speedup']:.1f}x the seed loop (goal >= {GOAL_KRUM_SPEEDUP:.0f}x): "
              f"{'met' if ok else 'NOT met'}")
    gram = big["krum (vs one Gram product)"]
    ratio = gram["seconds"] / gram["reference_seconds"]
    print(f"  krum: {gram['seconds']:.3f} s vs one X @ X.T {gram['reference_seconds']:.3f} s = {ratio:.2f}x "
          f"(goal <= {GOAL_KRUM_VS_GRAM}x, exact distances included): {'met' if ratio <= GOAL_KRUM_VS_GRAM else 'NOT met'}")
    for r in rows:
        if r["rule"] in ("median", "trimmed_mean"):
            ok = r["seconds"] <= r["reference_seconds"]
            print(f"  {r['rule']} at n={r['n']}: {r['seconds']:.3f} s vs torch.sort {r['reference_seconds']:.3f} s: "
                  f"{'met' if ok else 'NOT met'}")
    print(f"\nIssue 14's rules at n={settings[0][0]}, d={settings[0][1]:,}:")
    print_issue14(rows14)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "nnm_memory": mem, "issue14": rows14}, indent=1))


if __name__ == "__main__":
    main()
