"""Command line for instructors: ``python -m robustfl_lib run|grid|worst-case ...``.

* ``run``: one federated configuration, one line per round, a final summary.
* ``grid``: every combination of comma-separated option values, one CSV row each
  (final clean and robust accuracy), e.g. the aggregator x attack x fraction table of
  chapter ``09_robust_federated_learning``.
* ``worst-case``: the worst-case benchmark of a TOML config
  (:func:`robustfl_lib.worstcase.worst_case_benchmark`): a CSV of every run, a summary
  CSV, a markdown table and, with ``--heatmap``, a figure.

Options are generated from :class:`robustfl_lib.federated.FLConfig`'s fields
(``--byzantine-fraction 0.2`` sets ``byzantine_fraction``), so the command line
always offers exactly what the library does. Bad options print a one-line error
and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .federated import FLConfig, run_federated

__all__ = ["main"]

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _parse_bool(text: str) -> bool:
    t = text.lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _converter(tp: Any):
    """A str -> value function for a field's annotation (None for fields the CLI does not offer)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _converter(str if str in args else args[0])
        if inner is None:
            return None
        return lambda s: None if s.lower() == "none" else inner(s)
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    return None


def _fields() -> dict[str, Any]:
    hints = typing.get_type_hints(FLConfig)
    out = {}
    for f in dataclasses.fields(FLConfig):
        conv = _converter(hints[f.name])
        if conv is not None and f.name != "progress":
            out[f.name] = (conv, f.default)
    return out


def _add_config_options(parser: argparse.ArgumentParser, grid: bool) -> None:
    group = parser.add_argument_group("configuration (FLConfig fields)" + ("; comma-separate values to sweep" if grid else ""))
    for name, (_, default) in _fields().items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, metavar="V" if not grid else "V[,V...]",
                           default=None, help=f"default: {default}")


def _values(args: argparse.Namespace, grid: bool) -> dict[str, list[Any]]:
    chosen: dict[str, list[Any]] = {}
    for name, (conv, _) in _fields().items():
        raw = getattr(args, name)
        if raw is None:
            continue
        parts = raw.split(",") if grid else [raw]
        try:
            chosen[name] = [conv(p.strip()) for p in parts]
        except ValueError as err:
            raise _UsageError(f"--{name.replace('_', '-')}: {err}") from None
    return chosen


class _UsageError(Exception):
    """A bad option value: reported in one line, exit status 2."""


def _error(message: str) -> int:
    print(f"robustfl: error: {message}", file=sys.stderr)
    return 2


def _make_config(values: dict[str, Any]) -> FLConfig:
    config = FLConfig(**values, progress=False)
    config.validate()
    return config


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def cmd_run(args: argparse.Namespace) -> int:
    values = {k: v[0] for k, v in _values(args, grid=False).items()}
    try:
        config = _make_config(values)
    except (TypeError, ValueError) as err:
        return _error(str(err))
    print(f"robustfl run: {values or 'defaults'}", flush=True)
    start = time.perf_counter()

    def show(record: dict[str, Any]) -> None:
        print(f"round {record['round']:>4}  clean {_fmt(record.get('clean_accuracy'))}  "
              f"robust {_fmt(record.get('robust_accuracy'))}", flush=True)

    try:
        result = run_federated(config, callback=show, **({"checkpoint_dir": args.checkpoint_dir, "resume": args.resume}
                                                          if args.checkpoint_dir else {}))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        return _error(str(err))
    last = result.history[-1]
    print("\nfinal")
    print(f"  rounds            {len(result.history)}")
    print(f"  clean accuracy    {_fmt(last.get('clean_accuracy'))}")
    print(f"  robust accuracy   {_fmt(last.get('robust_accuracy'))}")
    print(f"  wall time         {time.perf_counter() - start:.1f} s")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    values = _values(args, grid=True)
    names = list(values)
    combos = [dict(zip(names, c)) for c in itertools.product(*values.values())] if names else [{}]
    configs = []
    for combo in combos:
        try:
            configs.append((combo, _make_config(combo)))
        except (TypeError, ValueError) as err:
            return _error(f"{combo}: {err}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = names + ["final_clean_accuracy", "final_robust_accuracy", "seconds"]
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for combo, config in tqdm(configs, desc="grid", unit="run"):
            start = time.perf_counter()
            try:
                result = run_federated(config)
            except (ValueError, RuntimeError) as err:
                return _error(f"{combo}: {err}")
            last = result.history[-1]
            writer.writerow({**combo, "final_clean_accuracy": last.get("clean_accuracy"),
                             "final_robust_accuracy": last.get("robust_accuracy"),
                             "seconds": round(time.perf_counter() - start, 2)})
            fh.flush()
    print(f"wrote {len(configs)} rows to {out}")
    return 0


def cmd_worst_case(args: argparse.Namespace) -> int:
    from .worstcase import load_worst_case_config, worst_case_benchmark

    try:
        config = load_worst_case_config(args.config, full=args.full, base_seed=args.seed)
    except (TypeError, ValueError, FileNotFoundError, RuntimeError) as err:
        return _error(str(err))
    combos = sum(len(r.settings) for r in config.rules) * len(config.fractions) * len(config.heterogeneity)
    print(f"robustfl worst-case: {args.config}{' (full)' if args.full else ''}: {len(config.rules)} rules, "
          f"{len(config.attacks)} attacks, fractions {list(config.fractions)}, heterogeneity "
          f"{list(config.heterogeneity)}, {len(config.seeds)} seeds from base seed {config.base_seed}, "
          f"{combos} cell x setting combinations", flush=True)
    start = time.perf_counter()
    try:
        result = worst_case_benchmark(config, progress=not args.no_progress)
    except (ValueError, RuntimeError) as err:
        return _error(str(err))
    seconds = time.perf_counter() - start
    summary = result.to_csv(args.out, args.summary)
    print()
    print(result.table())
    how = ("the minimum over attacks of the seed-averaged accuracy (ByzFL's)" if config.worst_case == "mean"
           else "the minimum over attacks per seed, averaged over seeds")
    print(f"\nworst case: {how}; settings chosen on validation data; 95% intervals over {len(config.seeds)} seeds")
    print(f"wrote {len(result.rows)} rows to {args.out} and {len(result.summary)} cells to {summary}")
    if args.heatmap:
        import matplotlib

        matplotlib.use("Agg")
        fig = result.heatmap()
        Path(args.heatmap).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.heatmap, dpi=150)
        print(f"wrote the heatmap to {args.heatmap}")
    print(f"wall time {seconds:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m robustfl_lib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one configuration, per-round progress, final summary")
    _add_config_options(run, grid=False)
    run.add_argument("--checkpoint-dir", default=None, help="save a checkpoint there every round")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    run.set_defaults(func=cmd_run)
    grid = sub.add_parser("grid", help="sweep comma-separated values; one CSV row per combination")
    _add_config_options(grid, grid=True)
    grid.add_argument("--out", default="grid.csv", help="CSV file to write (default: grid.csv)")
    grid.set_defaults(func=cmd_grid)
    worst = sub.add_parser("worst-case", help="each rule under its worst attack, tuned on validation data (a TOML config)")
    worst.add_argument("--config", required=True, help="TOML file, e.g. benchmarks/worstcase_demo.toml")
    worst.add_argument("--out", default="worstcase.csv", help="CSV of every run (default: worstcase.csv)")
    worst.add_argument("--summary", default=None, help="summary CSV (default: <out stem>_summary.csv)")
    worst.add_argument("--heatmap", default=None, help="save the heatmap there (PNG)")
    worst.add_argument("--seed", type=int, default=None, help="base seed (default: the config's, else $ROBUSTFL_SEED)")
    worst.add_argument("--full", action="store_true", help="apply the config's [full] table (the full size)")
    worst.add_argument("--no-progress", action="store_true", help="no progress bar")
    worst.set_defaults(func=cmd_worst_case)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _UsageError as err:
        return _error(str(err))
