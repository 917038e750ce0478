"""Print, per chapter, the CPU time its execution took and the earlier chapters it refers to.

    python book/chapter_times.py                       # the table (markdown) the teaching page shows
    python book/chapter_times.py --cache DIR           # times from another build's jupyter-cache
    python book/chapter_times.py --wpm 80              # a slower reading speed

It prints two tables: one row per chapter, and the lab plan (``SESSIONS``), each 90-minute
session's run and reading time against the 60 minutes left after 30 for the exercises.

Times: where a build recorded one, the execution time jupyter-cache stored for the chapter
(``book/execute.py --jobs`` writes ``execution_seconds`` beside each notebook it executes, in
``book/_build/.jupyter_cache``); otherwise the nbval time of the fresh-clone test run that
``book/execute.py`` keeps in ``CHAPTER_SECONDS`` (two cores, one chapter per core, PyTorch on
one thread). The ``source`` column says which. A cached time recorded for an older version
of a chapter's code is not used: the cache is keyed on the code cells, as the build keys it.

Prerequisites: the chapters a chapter refers back to, read from its own cross-references
(``{ref}`ch-...``` to a chapter label, or the words "chapter N"). A reference forward (to a
later chapter) is a pointer, not a prerequisite, and is not listed.

Reading: the words of the chapter's text outside code cells (exercise and solution prose
included), divided by a reading speed that is an assumption (``--wpm``, default 100 words a
minute for text with formulas), not a measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

BOOK = Path(__file__).resolve().parent
NOTEBOOKS = BOOK.parent / "notebooks"
CACHE = BOOK / "_build" / ".jupyter_cache"


def _execute_module():
    spec = importlib.util.spec_from_file_location("robustfl_book_execute", BOOK / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # standard library only at import time
    return module


def chapters() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md"))


def cached_seconds(cache_dir: Path, sources: list[Path]) -> dict[str, float]:
    """Chapter number -> execution seconds jupyter-cache holds for the chapter's current code."""
    if not (cache_dir / "global.db").exists():
        return {}
    import jupytext
    from jupyter_cache import get_cache

    cache = get_cache(str(cache_dir))
    found = {}
    for src in sources:
        try:
            record = cache.match_cache_notebook(jupytext.read(str(src)))
        except KeyError:  # not executed by a build, or executed for other code
            continue
        seconds = (record.data or {}).get("execution_seconds")
        if seconds is not None:
            found[src.name[:2]] = float(seconds)
    return found


def labels(sources: list[Path]) -> dict[str, str]:
    """Chapter label (``ch-median``) -> chapter number (``04``), from each chapter's ``(label)=`` line."""
    found = {}
    for src in sources:
        for label in re.findall(r"^\((ch-[a-z0-9-]+)\)=\s*$", src.read_text(), flags=re.M):
            found[label] = src.name[:2]
    return found


def prerequisites(src: Path, by_label: dict[str, str]) -> list[str]:
    """The earlier chapters ``src`` refers to, by number, sorted."""
    text = src.read_text()
    me = src.name[:2]
    refs = {by_label[m] for m in re.findall(r"\{ref\}`(?:[^`<]*<)?(ch-[a-z0-9-]+)>?`", text) if m in by_label}
    refs |= {f"{int(n):02d}" for n in re.findall(r"\b[Cc]hapters? (\d{1,2})\b", text)}
    return sorted(r for r in refs if r < me)


def prose_words(src: Path) -> int:
    """Words a reader reads: the chapter's text outside code fences and front matter."""
    text = re.sub(r"\A---\n.*?\n---\n", "", src.read_text(), flags=re.S)
    # Fences of three or more backticks; ```{exercise}/{solution} blocks hold prose, code cells do not.
    text = re.sub(r"^```+\{code-cell\}.*?^```+\s*$", "", text, flags=re.S | re.M)
    # Markup nobody reads: fence lines (```{exercise}), directive options (:label: ...), labels ((ch-x)=).
    text = re.sub(r"^(```.*|:[\w-]+:.*|\([\w-]+\)=)\s*$", "", text, flags=re.M)
    return len(re.findall(r"[A-Za-z][A-Za-z'-]*", text))


def exercises(src: Path) -> int:
    return len(re.findall(r"^```+\{exercise\}", src.read_text(), flags=re.M))


def direct(prereqs: dict[str, list[str]]) -> dict[str, list[str]]:
    """The transitive reduction of the "refers back to" graph: a chapter's prerequisites that
    no other of its prerequisites already leads to (04 needs 03, and 03 needs 00: 04 -> 03)."""
    memo: dict[str, set[str]] = {}

    def reach(c: str) -> set[str]:
        if c not in memo:
            memo[c] = set()
            for p in prereqs.get(c, []):
                memo[c] |= {p} | reach(p)
        return memo[c]

    return {c: sorted(p for p in ps if not any(p in reach(q) for q in ps if q != p)) for c, ps in prereqs.items()}


def title(src: Path) -> str:
    match = re.search(r"^# (.+)$", src.read_text(), flags=re.M)
    return match.group(1).strip() if match else src.stem


REFERENCE = "CHAPTER_SECONDS (nbval, fresh-clone test run)"

# The lab plan of book/teaching.md: one tuple of chapters per 90-minute session, in the book's
# order. Grouped by topic; a group is checked (never assumed) against the time it needs below.
SESSIONS = [("00", "03"), ("01",), ("02",), ("04", "05"), ("06", "07"), ("08",), ("09",), ("10",), ("11",),
            ("12",), ("13",), ("14",), ("15",), ("16",), ("17",), ("18",), ("19",)]
SESSION_MINUTES = 90
# What a session keeps for the chapter's exercises and discussion: its run and reading must fit in the rest.
EXERCISE_MINUTES = 30


def rows(cache_dir: Path = CACHE, wpm: float = 100.0) -> list[dict]:
    """One dict per chapter: number, title, seconds (None if not recorded), source, words, reading
    minutes, exercises, prerequisites (every earlier chapter it refers to) and needs (the direct ones)."""
    if wpm <= 0:
        raise ValueError(f"reading speed must be positive, got {wpm} words per minute")
    sources = chapters()
    recorded = _execute_module().CHAPTER_SECONDS
    cached = cached_seconds(cache_dir, sources)
    by_label = labels(sources)
    back = {src.name[:2]: prerequisites(src, by_label) for src in sources}
    needs = direct(back)
    out = []
    for src in sources:
        n = src.name[:2]
        if n in cached:
            seconds, source = cached[n], "this build's jupyter-cache"
        elif n in recorded:
            seconds, source = float(recorded[n]), REFERENCE
        else:
            seconds, source = None, "not recorded"
        words = prose_words(src)
        out.append({"chapter": n, "title": title(src), "seconds": seconds, "source": source, "words": words,
                    "reading": words / wpm, "exercises": exercises(src),
                    "prerequisites": back[n], "needs": needs[n]})
    return out


def table(cache_dir: Path = CACHE, wpm: float = 100.0) -> str:
    """The per-chapter table (markdown)."""
    lines = [f"| chapter | CPU minutes | source of the time | words | reading minutes at {wpm:g} words/min "
             "| exercises | refers back to | builds directly on |", "| --- | ---: | --- | ---: | ---: | ---: | --- | --- |"]
    recs = rows(cache_dir, wpm)
    for r in recs:
        minutes = "?" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"
        lines.append(f"| {r['chapter']} {r['title']} | {minutes} | {r['source']} | {r['words']} | "
                     f"{r['reading']:.0f} | {r['exercises']} | {', '.join(r['prerequisites']) or '-'} | "
                     f"{', '.join(r['needs']) or '-'} |")
    total = sum(r["seconds"] or 0.0 for r in recs) / 60
    lines.append(f"| all chapters, one after another | {total:.1f} | | | {sum(r['reading'] for r in recs):.0f} | | | |")
    return "\n".join(lines)


def plan(sessions=SESSIONS, cache_dir: Path = CACHE, wpm: float = 100.0,
         budget: float = SESSION_MINUTES - EXERCISE_MINUTES) -> list[dict]:
    """Each session's run and reading minutes, whether they fit in ``budget``, and the
    prerequisites its chapters name that no earlier (or the same) session covers."""
    recs = {r["chapter"]: r for r in rows(cache_dir, wpm)}
    unknown = sorted({c for group in sessions for c in group} - set(recs))
    if unknown:
        raise ValueError(f"sessions name chapters that do not exist: {unknown}")
    covered: set[str] = set()
    out = []
    for i, group in enumerate(sessions, 1):
        covered |= set(group)
        run = [recs[c]["seconds"] for c in group]
        run_min = None if None in run else sum(run) / 60
        reading = sum(recs[c]["reading"] for c in group)
        missing = sorted({p for c in group for p in recs[c]["prerequisites"]} - covered)
        out.append({"session": i, "chapters": group, "run": run_min, "reading": reading,
                    "total": None if run_min is None else run_min + reading,
                    "fits": run_min is not None and run_min + reading <= budget,
                    "exercises": sum(recs[c]["exercises"] for c in group), "missing": missing})
    return out


def plan_table(sessions=SESSIONS, cache_dir: Path = CACHE, wpm: float = 100.0) -> str:
    budget = SESSION_MINUTES - EXERCISE_MINUTES
    lines = [f"| session | chapters | CPU minutes | reading minutes | run + reading | within {budget} min? "
             "| exercises | prerequisites not yet covered |", "| ---: | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for s in plan(sessions, cache_dir, wpm, budget):
        run = "?" if s["run"] is None else f"{s['run']:.1f}"
        total = "?" if s["total"] is None else f"{s['total']:.0f}"
        lines.append(f"| {s['session']} | {', '.join(s['chapters'])} | {run} | {s['reading']:.0f} | {total} | "
                     f"{'yes' if s['fits'] else 'NO'} | {s['exercises']} | {', '.join(s['missing']) or 'none'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"a jupyter-cache folder (default {CACHE})")
    parser.add_argument("--wpm", type=float, default=100.0,
                        help="reading speed, words per minute (an assumption, not a measurement; default 100)")
    args = parser.parse_args(argv)
    if args.wpm <= 0:
        parser.error(f"--wpm must be positive, got {args.wpm}")
    print(table(args.cache, args.wpm))
    print()
    print(plan_table(SESSIONS, args.cache, args.wpm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
