"""Do the chapters' claims hold on other randomness? Runs chapters end to end for several
base seeds, each in a fresh kernel with ``ROBUSTFL_SEED`` set (every chapter derives all its
seeds from it, chapter ``00_introduction``), and prints one row per chapter, one column per
seed: ``ok`` or ``FAIL`` with the first line of the error (for a failed ``assert``, its
message, or the failing line when it has none), and the wall time of each run.

    python benchmarks/chapter_seeds.py                          # every chapter, seeds 0 1 2 3 4
    python benchmarks/chapter_seeds.py --chapters 07 08 --seeds 0 11 23
    python benchmarks/chapter_seeds.py --jobs 2 --timeout 900 --out seeds.md   # or seeds.csv
    python benchmarks/chapter_seeds.py --chapters 04 --seeds 5 --keep /tmp/executed

Each run converts the MyST source with jupytext to a temporary ``.ipynb`` and executes it
with nbclient in a worker process of its own (working directory: that temporary folder, as
under nbval). ``--timeout`` bounds one whole run; a run past it is reported as a failure.
The exit code is 0 when every run passed, 1 otherwise. A failure reproduces with
``ROBUSTFL_SEED=<seed>`` and ``jupytext --to ipynb`` + ``jupyter execute`` (or nbval) on the chapter.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# IPython marks the line that raised with an arrow: "----> 12 assert acc > 0.9, acc"; the
# first arrow is in the chapter's cell (outermost frame), the later ones in what it called.
ARROW = re.compile(r"^-*>\s*(\d+)\s+(.*\S)\s*$", re.M)
# Time a worker gets, beyond --timeout, to report before it is killed.
GRACE_S = 60


@dataclass
class Run:
    chapter: str
    seed: int
    ok: bool
    seconds: float
    error: str = ""       # first line, for the table
    where: str = ""       # "notebooks/<chapter>.md:N", the failing line, when it is found

    def cell(self) -> str:
        if self.ok:
            return f"ok ({self.seconds:.0f} s)"
        return f"FAIL ({self.seconds:.0f} s): {self.error}"


def chapters(selected: list[str] | None) -> list[Path]:
    """The chapter sources named by ``selected`` (a number ``07``, ``7``, or a file stem), else all."""
    every = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md"))
    if not selected:
        return every
    chosen = []
    for name in selected:
        key = name.removesuffix(".md")
        match = [p for p in every if p.stem == key or (key.isdigit() and p.name[:2] == f"{int(key):02d}")]
        if not match:
            known = ", ".join(p.name[:2] for p in every)
            raise SystemExit(f"no chapter {name!r} in {NOTEBOOKS} (chapters: {known})")
        chosen += [p for p in match if p not in chosen]
    return chosen


def error_line(ename: str, evalue: str, traceback: str) -> str:
    """One line naming a cell's error: ``ename: evalue``, or the line that raised when the
    value is empty (a bare ``assert``)."""
    value = evalue.strip().splitlines()[0].strip() if evalue.strip() else ""
    if not value:
        arrow = ARROW.search(ANSI.sub("", traceback))
        value = arrow.group(2) if arrow else ""
    line = " ".join((f"{ename}: {value}" if value else ename).split())  # aligned comments pad with spaces
    return line if len(line) <= 160 else line[:157] + "..."


def source_line(md_text: str, cell_source: str) -> int | None:
    """The line of the chapter's MyST source where a code cell's text starts (None if not found)."""
    first = next((ln for ln in cell_source.splitlines() if ln.strip()), "")
    pos = md_text.find(cell_source) if cell_source else -1
    if pos < 0 and first:
        pos = md_text.find(first)
    return md_text.count("\n", 0, pos) + 1 if pos >= 0 else None


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def worker(chapter: Path, seed: int, timeout: float, keep: Path | None) -> dict:
    """Execute one chapter with ROBUSTFL_SEED=seed in a fresh kernel (this process's environment
    already carries the seed, and the kernel inherits it); the result as a JSON-able dict."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    assert os.environ.get("ROBUSTFL_SEED") == str(seed), "the parent sets ROBUSTFL_SEED for the worker"
    start = time.perf_counter()
    deadline = start + timeout
    md_text = chapter.read_text()
    current = {"index": None}

    def on_cell_execute(cell, cell_index, **_):
        current["index"] = cell_index

    with tempfile.TemporaryDirectory(prefix=f"robustfl-{chapter.stem[:2]}-s{seed}-") as tmp:
        nb = jupytext.read(chapter)
        path = Path(tmp) / f"{chapter.stem}.ipynb"
        nbformat.write(nb, path)
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb, kernel_name="python3", resources={"metadata": {"path": tmp}},
            # what is left of the run's budget: the whole run, not each cell, is bounded
            timeout_func=lambda cell: max(1, int(deadline - time.perf_counter())),
            on_cell_execute=on_cell_execute,
        )
        result = {"ok": True, "error": "", "where": ""}
        try:
            client.execute()
        except CellExecutionError as err:
            result.update(ok=False, error=error_line(err.ename, err.evalue, err.traceback))
        except CellTimeoutError:
            result.update(ok=False, error=f"timeout: the run passed --timeout {timeout:.0f} s")
        except DeadKernelError as err:
            result.update(ok=False, error=error_line("DeadKernelError", str(err), ""))
        if not result["ok"] and current["index"] is not None:
            line = source_line(md_text, nb.cells[current["index"]].source)
            if line is not None:
                outputs = nb.cells[current["index"]].get("outputs", [])
                tb = "\n".join("\n".join(o.get("traceback", [])) for o in outputs if o.get("output_type") == "error")
                arrow = ARROW.search(ANSI.sub("", tb))
                line += int(arrow.group(1)) - 1 if arrow else 0
                result["where"] = f"{display_path(chapter)}:{line}"
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, keep / f"{chapter.stem}.seed{seed}.ipynb")
    result["seconds"] = time.perf_counter() - start
    return result


def run_one(chapter: Path, seed: int, timeout: float, keep: Path | None) -> Run:
    """One chapter at one base seed, in a worker process with ROBUSTFL_SEED in its environment."""
    env = dict(os.environ, ROBUSTFL_SEED=str(seed))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(chapter), str(seed), str(timeout)]
    if keep is not None:
        cmd += ["--keep", str(keep)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout + GRACE_S)
    except subprocess.TimeoutExpired:
        return Run(chapter.stem, seed, False, time.perf_counter() - start,
                   f"timeout: the worker did not report within {timeout + GRACE_S:.0f} s")
    seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Run(chapter.stem, seed, False, seconds, f"worker exited with code {proc.returncode}: {tail}")
    res = json.loads(lines[-1])
    return Run(chapter.stem, seed, res["ok"], seconds, res["error"], res["where"])


def markdown(runs: dict[tuple[str, int], Run], names: list[str], seeds: list[int]) -> str:
    head = "| chapter | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    rule = "|---|" + "---|" * len(seeds)
    rows = [f"| {n} | " + " | ".join(runs[n, s].cell().replace("|", "\\|") for s in seeds) + " |" for n in names]
    return "\n".join([head, rule, *rows])


def write_csv(path: Path, runs: dict[tuple[str, int], Run], names: list[str], seeds: list[int]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["chapter", "seed", "status", "seconds", "error", "where"])
        for n in names:
            for s in seeds:
                r = runs[n, s]
                w.writerow([n, s, "ok" if r.ok else "FAIL", f"{r.seconds:.1f}", r.error, r.where])


def seed_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a base seed must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a base seed must be a non-negative integer, got {text!r}")
    return value


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chapters", nargs="+", metavar="NN", help="chapter numbers or stems (default: all)")
    parser.add_argument("--seeds", nargs="+", type=seed_arg, default=[0, 1, 2, 3, 4], metavar="SEED",
                        help="base seeds, ROBUSTFL_SEED of each run (default: 0 1 2 3 4)")
    parser.add_argument("--jobs", type=positive(int), default=1, help="runs at once (default 1)")
    parser.add_argument("--timeout", type=positive(float), default=900.0,
                        help="seconds one whole run may take (default 900)")
    parser.add_argument("--out", type=Path, help="also write the table: .csv as CSV, anything else as markdown")
    parser.add_argument("--keep", type=Path, help="folder to save each executed notebook in")
    parser.add_argument("--worker", nargs=3, metavar=("CHAPTER", "SEED", "TIMEOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        chapter, seed, timeout = Path(args.worker[0]), int(args.worker[1]), float(args.worker[2])
        print(json.dumps(worker(chapter, seed, timeout, args.keep)), flush=True)
        return 0

    paths = chapters(args.chapters)
    seeds = list(dict.fromkeys(args.seeds))
    jobs = [(p, s) for p in paths for s in seeds]
    print(f"[chapter_seeds] {len(paths)} chapter(s) x {len(seeds)} seed(s) = {len(jobs)} run(s), "
          f"{args.jobs} at a time, at most {args.timeout:.0f} s each", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = 0

    def task(job):
        nonlocal done
        path, seed = job
        r = run_one(path, seed, args.timeout, args.keep)
        done += 1
        status = "ok" if r.ok else f"FAIL: {r.error}" + (f" ({r.where})" if r.where else "")
        print(f"[chapter_seeds {done}/{len(jobs)}] {path.stem} ROBUSTFL_SEED={seed}: {status} in {r.seconds:.0f} s",
              file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(task, jobs))
    runs = {(r.chapter, r.seed): r for r in results}
    names = [p.stem for p in paths]
    table = markdown(runs, names, seeds)
    print(table)
    failed = [r for r in results if not r.ok]
    total = time.perf_counter() - start
    print(f"\n{len(results) - len(failed)} of {len(results)} runs ok; wall time {total:.0f} s "
          f"(sum of runs {sum(r.seconds for r in results):.0f} s)")
    for r in failed:
        print(f"  ROBUSTFL_SEED={r.seed} {r.chapter}: {r.error}" + (f" ({r.where})" if r.where else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix.lower() == ".csv":
            write_csv(args.out, runs, names, seeds)
        else:
            args.out.write_text(table + "\n")
        print(f"table written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
