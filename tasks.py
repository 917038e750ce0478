#!/usr/bin/env python3
"""The project's two commands, for a fresh clone with nothing but Python 3.10+.

    python tasks.py test   # set up .venv; the unit tests and every chapter under nbval (two
                           # lanes on two cores); the site built from what nbval executed; a
                           # headless-Chromium check of every page; one chapter on another
                           # base seed (a daily rotation)
    python tasks.py book   # set up .venv, execute every chapter (two at a time) and build the site
    python tasks.py pdf    # the built site printed to book/_build/pdf/robustfl.pdf by the local
                           # Chromium, offline (book/pdf.py; --chapters 04 05, --solutions)
    python tasks.py student [--out DIR]          # the student edition (default student/): no solutions,
                                                 # an answer cell and a self-grading check per exercise
    python tasks.py student --grade DIR_OR_NBS   # execute collected notebooks, PASS/FAIL per exercise

Both create (or reuse) the virtual environment ``.venv`` and install the
package with its extras. The torch requirement is pinned to the CPU build
(``torch==2.13.0``) unless ``ROBUSTFL_TORCH`` says otherwise, e.g.
``ROBUSTFL_TORCH="torch" python tasks.py test`` for your platform's default
(CUDA) build.

The book and the nbval run use the chapters' default base seed (``ROBUSTFL_SEED`` unset,
i.e. 0). The test command then runs ONE chapter under nbval with ``ROBUSTFL_SEED`` set to
another base seed, so that a claim which holds only for seed 0 is caught over time: the
chapter is day-of-year modulo the number of chapters, the seed 1 + day-of-year modulo 97.
``ROBUSTFL_ROTATE=<chapter>:<seed>`` (e.g. ``07:13``) chooses them instead, and
``ROBUSTFL_ROTATE=none`` skips that run. ``benchmarks/chapter_seeds.py`` runs every chapter
over several seeds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
TORCH = os.environ.get("ROBUSTFL_TORCH", "torch==2.13.0")
EXTRAS = "book,dev,flower"
SEED_VARIABLE = "ROBUSTFL_SEED"
ROTATE_VARIABLE = "ROBUSTFL_ROTATE"
# Chapters executed side by side by `tasks.py book` (each pins PyTorch to one thread).
BOOK_JOBS = max(1, min(2, os.cpu_count() or 1))


def sh(*cmd: str | Path, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def setup() -> None:
    """Create .venv and install the package; skipped when nothing it depends on changed."""
    if not PY.exists():
        sh(sys.executable, "-m", "venv", VENV)
    stamp = VENV / ".robustfl-installed"
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode() + EXTRAS.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == key:
        return
    pip = [PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    sh(*pip, TORCH)
    sh(*pip, "-e", f".[{EXTRAS}]")
    stamp.write_text(key)


def chapter_sources() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.md"))


def default_seed_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) without ROBUSTFL_SEED: the book and the main test run
    use the default seed. jupyter-book's execution cache is keyed on the sources, not on the
    environment, so a site built under another seed would keep serving that seed's outputs."""
    env = dict(os.environ if env is None else env)
    env.pop(SEED_VARIABLE, None)
    return env


def rotation(chapters: list[Path], spec: str | None = None, today: date | None = None) -> tuple[Path, int] | None:
    """The chapter and base seed of the test command's extra run.

    ``spec`` (default: $ROBUSTFL_ROTATE) is ``<chapter>:<seed>``, the chapter a number (``7``,
    ``07``) or a file stem, or ``none`` to skip the run. Without it: chapter number
    day-of-year modulo the number of chapters, seed ``1 + day-of-year % 97`` (never 0, which
    the main run covers), so consecutive days pair different chapters with different seeds.
    """
    if not chapters:
        raise ValueError("no chapters to rotate over")
    spec = os.environ.get(ROTATE_VARIABLE, "") if spec is None else spec
    spec = spec.strip()
    if spec.lower() == "none":
        return None
    if not spec:
        day = (today or date.today()).timetuple().tm_yday
        return chapters[day % len(chapters)], 1 + day % 97
    name, sep, seed_text = spec.partition(":")
    if not sep or not name.strip() or not seed_text.strip().isdigit():
        raise ValueError(f"{ROTATE_VARIABLE} must be <chapter>:<seed> (e.g. 07:13) or none, got {spec!r}")
    name = name.strip().removesuffix(".md")
    match = [p for p in chapters if p.stem == name or (name.isdigit() and p.name[:2] == f"{int(name):02d}")]
    if not match:
        raise ValueError(f"{ROTATE_VARIABLE}={spec!r}: no chapter {name!r} "
                         f"(chapters: {', '.join(p.name[:2] for p in chapters)})")
    return match[0], int(seed_text)


def notebooks_to_ipynb(dest: Path, sources: list[Path] | None = None) -> list[Path]:
    """Convert the chapters (MyST .md; default all) to .ipynb in ``dest``; the .md files stay the only source."""
    sources = chapter_sources() if sources is None else sources
    out = [dest / (src.stem + ".ipynb") for src in sources]
    # One process for all of them: a jupytext process per chapter costs a second or two each to start.
    script = ("import sys, jupytext\n"
              "for src, target in zip(sys.argv[1::2], sys.argv[2::2]):\n"
              "    jupytext.write(jupytext.read(src), target, fmt='ipynb')\n")
    pairs = [str(x) for src, target in zip(sources, out) for x in (src, target)]
    print(f"+ jupytext: {len(sources)} chapter(s) -> {dest}", flush=True)
    subprocess.run([str(PY), "-c", script, *pairs], check=True, cwd=ROOT)
    return out


def ensure_chromium() -> None:
    """The browser check needs Chromium; on CI (root, Debian) install it, elsewhere say how."""
    if shutil.which("chromium") or shutil.which("chromium-browser") or os.environ.get("CHROMIUM"):
        return
    if os.environ.get("CI") and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        sh("apt-get", "install", "-y", "-q", "chromium", stdout=subprocess.DEVNULL)
    else:
        print("note: Chromium not found; the browser check of the site will be skipped "
              "(Debian/Ubuntu: sudo apt-get install chromium)", flush=True)


def _book_command(args: list[str]) -> list[str]:
    return [str(c) for c in [BIN / "jupyter-book", "build", "book", "-W", "-n", "--keep-going", *args]]


def build_book(args: list[str]) -> int:
    """Execute every chapter (cached) and build the site; -W -n: any warning fails the build."""
    cmd = _book_command(args)
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env=default_seed_env()).returncode
    print(f"[tasks.py] the book build took {time.perf_counter() - start:.0f} s", flush=True)
    return rc


def run_rotated(chapter: Path, seed: int, tmp: Path, log: Path | None = None) -> int:
    """One chapter under nbval with ROBUSTFL_SEED=seed (output to ``log`` if given); its exit code."""
    how = (f"ROBUSTFL_ROTATE={chapter.name[:2]}:{seed} python tasks.py test, or alone: "
           f"python benchmarks/chapter_seeds.py --chapters {chapter.name[:2]} --seeds {seed}")
    print(f"[tasks.py] rotating seed: {chapter.name} with {SEED_VARIABLE}={seed} (reproduce: {how})", flush=True)
    dest = tmp / "rotated"
    dest.mkdir()
    (nb,) = notebooks_to_ipynb(dest, [chapter])
    env = dict(default_seed_env(), **{SEED_VARIABLE: str(seed)})
    cmd = [PY, "-m", "pytest", nb, "--nbval-lax", "--nbval-current-env", "--nbval-cell-timeout=900",
           "-p", "no:cacheprovider"]
    print(f"+ {SEED_VARIABLE}={seed}", " ".join(map(str, cmd)), flush=True)
    if log is None:
        rc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode
    else:
        rc = _logged(cmd, log, env)
    if rc != 0:
        print(f"FAILED: {chapter.name} does not hold at {SEED_VARIABLE}={seed}; reproduce with {how}", flush=True)
    return rc


def test(args: list[str]) -> int:
    """Unit tests, every chapter under nbval, the book built from what nbval executed, a
    browser check of the site, and one chapter on a rotating base seed (module docstring).

    Every chapter pins PyTorch to one thread, so the two cores hold two lanes: one runs the
    unit tests, and both take chapters from one queue (largest first), each chapter in a
    pytest process of its own. ``tests/nbval_outputs.py`` keeps each passing chapter's
    outputs; ``book/execute.py --from`` puts them in jupyter-book's cache, so the book build
    renders them instead of executing every chapter a second time (a chapter that failed
    under nbval is executed by the build and fails it too). Then the browser check and the
    rotated chapter run side by side."""
    rotated = rotation(chapter_sources())  # a bad ROBUSTFL_ROTATE fails before the long runs
    setup()
    ensure_chromium()
    build = ROOT / "book" / "_build"
    build.mkdir(parents=True, exist_ok=True)
    env = dict(default_seed_env(), ROBUSTFL_REQUIRE_SITE="1" if os.environ.get("CI") else "0")
    pytest = [PY, "-m", "pytest", "-p", "no:cacheprovider"]
    with tempfile.TemporaryDirectory(prefix="robustfl-nb-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "nb").mkdir()
        (tmp / "logs").mkdir()
        nbs = notebooks_to_ipynb(tmp / "nb")
        executed = tmp / "executed"
        nb_env = dict(env, ROBUSTFL_NBVAL_OUTPUTS=str(executed),
                      PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "tests"), env.get("PYTHONPATH", "")) if p))
        queue = sorted(nbs, key=_expected_seconds, reverse=True)  # the longest first balance the two lanes
        lock = threading.Lock()
        chapter_rc: dict[str, tuple[int, float]] = {}
        started = time.perf_counter()

        def unit_tests() -> int:
            # --durations: the unit suite is the longest single item of this command; every log says where it goes.
            cmd = [*pytest, "tests", "--ignore", "tests/test_site.py", "--durations=15", *args]
            print("+", " ".join(map(str, cmd)), flush=True)
            rc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode
            print(f"[tasks.py] unit tests: exit code {rc} after {time.perf_counter() - started:.0f} s", flush=True)
            return rc

        def lane(first=None) -> None:
            if first is not None:
                chapter_rc["unit tests"] = (first(), 0.0)
            while True:
                with lock:
                    if not queue:
                        return
                    nb = queue.pop(0)
                cmd = [*pytest, "-p", "nbval_outputs", nb, "--nbval-lax", "--nbval-current-env",
                       "--nbval-cell-timeout=900", *args]
                t0 = time.perf_counter()
                rc = _logged(cmd, tmp / "logs" / f"{nb.stem}.log", nb_env)
                chapter_rc[nb.stem] = (rc, time.perf_counter() - t0)
                print(f"[tasks.py] nbval {nb.stem}: {'ok' if rc == 0 else 'FAILED'} in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)

        print(f"[tasks.py] {len(nbs)} chapters under nbval, two at a time, beside the unit tests "
              f"(logs: {tmp / 'logs'})", flush=True)
        second = threading.Thread(target=lane, name="lane-2")
        second.start()
        lane(first=unit_tests)
        second.join()
        rc_unit = chapter_rc.pop("unit tests")[0]
        failed = sorted(name for name, (rc, _) in chapter_rc.items() if rc != 0)
        for name in failed:
            print(f"[tasks.py] nbval log of {name}:", flush=True)
            print((tmp / "logs" / f"{name}.log").read_text(errors="replace"), flush=True)
        print(f"[tasks.py] unit tests and nbval took {time.perf_counter() - started:.0f} s; chapters failed: "
              f"{', '.join(failed) or 'none'}", flush=True)
        rc_tests = rc_unit or (1 if failed or len(chapter_rc) != len(nbs) else 0)

        subprocess.run([str(PY), str(ROOT / "book" / "execute.py"), "--from", str(executed)], cwd=ROOT, env=env)
        log = build / "build.log"
        cmd = _book_command([])
        print("+", " ".join(cmd), f"> {log}", flush=True)
        t0 = time.perf_counter()
        rc_book = _logged(cmd, log, default_seed_env())
        text = log.read_text(errors="replace").splitlines()
        print(f"[tasks.py] the book build took {time.perf_counter() - t0:.0f} s (exit code {rc_book})", flush=True)
        print("\n".join(f"  [book] {line}" for line in (text if rc_book != 0 else text[-15:])), flush=True)

        last: dict[str, int] = {}
        site = threading.Thread(target=lambda: last.update(
            site=_logged([*pytest, "tests/test_site.py", *args], build / "site.log", env)))
        site.start()
        last["rotated"] = run_rotated(*rotated, tmp, build / "rotated.log") if rotated else 0
        site.join()
    for name in ("site", "rotated"):
        part = build / f"{name}.log"
        if part.exists():
            print(f"[tasks.py] {name} log ({part}):", flush=True)
            print(part.read_text(errors="replace"), flush=True)
    rc_site, rc_rotated = last.get("site", 1), last.get("rotated", 1)
    if rc_book != 0:
        print("FAILED: the book build (jupyter-book build book -W -n) failed; see its errors above", flush=True)
    if rc_site != 0:
        print("FAILED: the browser check of the site (tests/test_site.py); see its log above", flush=True)
    return rc_tests or rc_book or rc_rotated or rc_site


def _expected_seconds(notebook: Path) -> float:
    """A chapter's expected nbval time: book/execute.py's measured table (the queue's order only)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("robustfl_book_execute", ROOT / "book" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # standard library only at import time
    return module.expected_seconds(notebook)


def _logged(cmd: list, log: Path, env: dict[str, str]) -> int:
    """Run ``cmd`` with its output in ``log``; its exit code."""
    with log.open("w") as handle:
        handle.write("+ " + " ".join(map(str, cmd)) + "\n")
        handle.flush()
        return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, stdout=handle,
                              stderr=subprocess.STDOUT).returncode


def book(args: list[str]) -> int:
    setup()
    # jupyter-book executes chapters one after another; two at a time use both cores.
    subprocess.run([str(PY), str(ROOT / "book" / "execute.py"), "--jobs", str(BOOK_JOBS)], cwd=ROOT,
                   env=default_seed_env())
    rc = build_book(args)
    if rc == 0:
        print(f"\nThe site is at {ROOT / 'book' / '_build' / 'html' / 'index.html'} (open it in a browser).")
    return rc


def student(args: list[str]) -> int:
    """The student edition (default folder ``student/``): every chapter as a notebook with the
    solutions removed, an answer cell and a self-grading check cell per exercise;
    ``--grade DIR_OR_NOTEBOOKS`` executes collected notebooks and prints PASS/FAIL per exercise
    (robustfl_lib/grading.py; book/instructors.md)."""
    setup()
    start = time.perf_counter()
    rc = subprocess.run([str(PY), "-m", "robustfl_lib.grading", *args], cwd=ROOT,
                        env=dict(default_seed_env(), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))).returncode
    print(f"[tasks.py] student took {time.perf_counter() - start:.0f} s", flush=True)
    return rc


def pdf(args: list[str]) -> int:
    """The built site as one PDF (book/_build/pdf/robustfl.pdf), printed offline by the local
    Chromium; no tests run. Needs a built site (``python tasks.py book``); ``args`` go to
    book/pdf.py (``--chapters 04 05``, ``--solutions``, ``--site DIR``, ``--out FILE``)."""
    setup()
    ensure_chromium()
    start = time.perf_counter()
    rc = subprocess.run([str(PY), str(ROOT / "book" / "pdf.py"), *args], cwd=ROOT).returncode
    print(f"[tasks.py] pdf took {time.perf_counter() - start:.0f} s", flush=True)
    return rc


def main(argv: list[str]) -> int:
    commands = {"test": test, "book": book, "student": student, "pdf": pdf}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    if os.environ.get(SEED_VARIABLE, "").strip():
        print(f"note: {SEED_VARIABLE} is ignored here: the book and the chapters' test run use the default "
              f"seed; {ROTATE_VARIABLE}=<chapter>:<seed> runs one chapter on another", flush=True)
    start = time.perf_counter()
    rc = commands[argv[0]](argv[1:])
    print(f"[tasks.py {argv[0]}] finished in {time.perf_counter() - start:.0f} s with exit code {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
