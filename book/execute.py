"""Fill jupyter-book's execution cache before the build, so that `jupyter-book build book`
finds every chapter executed and renders the site without running anything again.

    python book/execute.py --jobs 2          # execute the chapters not yet cached, 2 at a time
    python book/execute.py --from DIR        # cache notebooks another run executed (nbval's)

jupyter-book 1 executes the chapters one after another; the chapters pin PyTorch to one
thread, so on two cores the build would leave one idle. ``--jobs`` runs them side by side
with the same executor jupyter-book uses (jupyter-cache's ``single_nb_execution``, in the
chapter's folder, with the book's timeout) and stores them where the build looks
(``book/_build/.jupyter_cache``), keyed on the code cells' source as jupyter-book keys
them. ``--from`` takes the notebooks that ``tests/nbval_outputs.py`` wrote during the test
command's nbval run. A chapter that fails here is left out of the cache, so the build
executes it again and reports its error exactly as it would without this script.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

BOOK = Path(__file__).resolve().parent
CACHE = BOOK / "_build" / ".jupyter_cache"

# Seconds each chapter took under nbval in a fresh-clone test run (2 cores, 2026-12-02). Only
# the order of execution depends on them (here and in tasks.py's nbval queue): a long chapter
# left to the end keeps one worker busy while the other idles. An unlisted chapter is placed
# by its source's size.
CHAPTER_SECONDS = {"00": 39, "01": 106, "02": 147, "03": 42, "04": 49, "05": 51, "06": 94, "07": 66, "08": 84,
                   "09": 155, "10": 46, "11": 77, "12": 108, "13": 58, "14": 283, "15": 110, "16": 110, "17": 98,
                   "18": 115, "19": 80}


def expected_seconds(chapter: Path) -> float:
    return CHAPTER_SECONDS.get(chapter.name[:2], chapter.stat().st_size / 400)


def _config() -> dict:
    import yaml

    return (yaml.safe_load((BOOK / "_config.yml").read_text()) or {}).get("execute", {})


def chapters() -> list[Path]:
    """The chapters the book renders, as the build sees them (book/chapters/*.md)."""
    return sorted((BOOK / "chapters").glob("[0-9][0-9]_*.md"))


def _cache():
    from jupyter_cache import get_cache

    return get_cache(str(CACHE))


def _store(cache, nb, source: Path, seconds: float | None = None) -> None:
    from jupyter_cache.base import CacheBundleIn

    data = {"execution_seconds": seconds} if seconds is not None else {}
    cache.cache_notebook_bundle(CacheBundleIn(nb, str(source), data=data), check_validity=False, overwrite=True)


def _cached(cache, nb) -> bool:
    try:
        cache.match_cache_notebook(nb)
        return True
    except KeyError:
        return False


def _execute(source: str, timeout: int) -> tuple[str, object, float, str | None]:
    """One chapter, in a worker process; (source, executed notebook, seconds, error or None)."""
    import jupytext
    from jupyter_cache.executors.utils import single_nb_execution

    nb = jupytext.read(source)
    start = time.perf_counter()
    result = single_nb_execution(nb, cwd=str(Path(source).parent), allow_errors=False, timeout=timeout,
                                 meta_override=True)
    error = None if result.err is None else (result.exc_string or repr(result.err)).strip().splitlines()[-1]
    return source, nb, time.perf_counter() - start, error


def execute(jobs: int) -> int:
    import jupytext

    cache = _cache()
    todo = sorted((p for p in chapters() if not _cached(cache, jupytext.read(str(p)))), key=expected_seconds,
                  reverse=True)
    print(f"[book/execute.py] {len(chapters()) - len(todo)} chapter(s) cached, {len(todo)} to execute, "
          f"{jobs} at a time", flush=True)
    timeout = int(_config().get("timeout", 900))
    failed = 0
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        running = [pool.submit(_execute, str(p), timeout) for p in todo]
        for done in as_completed(running):
            source, nb, seconds, error = done.result()
            name = Path(source).stem
            if error is None:
                _store(cache, nb, Path(source), seconds)
                print(f"[book/execute.py] {name}: executed in {seconds:.0f} s", flush=True)
            else:
                failed += 1
                print(f"[book/execute.py] {name}: FAILED after {seconds:.0f} s ({error}); "
                      "the book build will execute it again and report it", flush=True)
    print(f"[book/execute.py] done in {time.perf_counter() - start:.0f} s, {failed} failed", flush=True)
    return 1 if failed else 0


def from_directory(folder: Path) -> int:
    import nbformat

    cache = _cache()
    by_stem = {p.stem: p for p in chapters()}
    stored = []
    for path in sorted(folder.glob("*.ipynb")):
        if path.stem in by_stem:
            _store(cache, nbformat.read(str(path), as_version=4), by_stem[path.stem])
            stored.append(path.stem)
    missing = sorted(set(by_stem) - set(stored))
    print(f"[book/execute.py] cached {len(stored)} chapter(s) executed by the nbval run"
          + (f"; the book build executes the rest: {', '.join(missing)}" if missing else ""), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--jobs", type=int, help="execute the chapters not yet cached, this many at a time")
    group.add_argument("--from", dest="folder", type=Path, help="cache the executed notebooks in this folder")
    args = parser.parse_args(argv)
    os.chdir(BOOK.parent)
    return from_directory(args.folder) if args.folder else execute(args.jobs)


if __name__ == "__main__":
    sys.exit(main())
