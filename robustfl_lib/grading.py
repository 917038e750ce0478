"""The student edition of the book: solutions removed, answers graded by the chapters' own checks.

Taught in ``book/instructors.md``. The chapters' exercises are QuantEcon-style: an
``{exercise}`` block, then a gated ``{solution-start} LABEL`` ... ``{solution-end}`` block
whose code cells execute at build time. Inside a solution, the *answer* (the code a student
writes) is every code cell but the last, and the *check* (what grades it) is the last code
cell, tagged ``check`` in its MyST metadata and holding only asserts and ``rfl.claim`` calls.

:func:`student_notebook` turns a chapter into the student edition: each solution block is
replaced by a markdown cell "Your answer", one answer cell with a stub per name the check
reads that the answer defines (``skew_qty = ...  # your code``), and the check cell wrapped
in :class:`check`, which *reports* ``PASS <label>`` or ``FAIL <label>: <reason>`` instead of
raising. The solution's text and code are not in the file at all. :func:`grade` executes
collected notebooks (their check cells first restored from the sources, so an edited check
grades nothing) and reads those reports back.

Why not otter-grader or nbgrader: both are built around a course service (nbgrader a
course directory, a database of students and submissions, and its exchange; otter a
grading image or a Gradescope upload), and both would duplicate the checks the chapters
already run at build time. The lab machines this is for may have no network; a context
manager of our own and ``nbclient`` (installed with Jupyter) need nothing else.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable

__all__ = ["check", "require_answers", "Unanswered", "results", "reset_results", "summary",
           "parse_reports", "solution_blocks", "student_notebook", "build_edition", "grade"]

ROOT = Path(__file__).resolve().parent.parent
CHECK_TAG = "check"
_RESULTS: dict[str, tuple[str, str]] = {}
_REPORT = re.compile(r"^(PASS|FAIL) (ex-[\w-]+)(?:: (.*))?$")
_START = re.compile(r"^```\{solution-start\}\s+(\S+)")
_END = re.compile(r"^```\{solution-end\}")


class Unanswered(AssertionError):
    """An answer variable still holds the stub's ``...``."""


class check:
    """``with check("ex-00-quantity"): <asserts>`` grades one exercise and never raises for a wrong answer.

    On leaving the block: no exception prints ``PASS <label>``; any ``Exception`` (a failed
    assert or ``rfl.claim``, a ``NameError`` for a missing answer, a ``TypeError`` from a
    stub's ``...``, ...) prints ``FAIL <label>: <type>: <first line of its message>`` and is
    swallowed, so the notebook runs on. ``KeyboardInterrupt`` and ``SystemExit`` still stop
    it. Results are kept for :func:`summary`. Chapter: ``book/instructors.md``.
    """

    def __init__(self, label: str):
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"check needs an exercise label such as 'ex-00-quantity', got {label!r}")
        self.label = label.strip()

    def __enter__(self) -> "check":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            _RESULTS[self.label] = ("PASS", "")
            print(f"PASS {self.label}", flush=True)
            return False
        if not issubclass(exc_type, Exception):
            return False
        text = str(exc).strip().splitlines()
        reason = f"{exc_type.__name__}: {text[0] if text else '(no message)'}"
        _RESULTS[self.label] = ("FAIL", reason)
        print(f"FAIL {self.label}: {reason}", flush=True)
        return True


def require_answers(namespace: dict, *names: str) -> None:
    """Raise :class:`Unanswered` naming the first of ``names`` that is missing from ``namespace``
    or still ``...`` (the stub), so an empty answer fails with a reason a student can act on."""
    for name in names:
        if name not in namespace:
            raise Unanswered(f"{name} is not defined: the answer cell must assign it")
        if namespace[name] is Ellipsis:
            raise Unanswered(f"{name} is still `...`: write your answer in the cell above")


def results() -> dict[str, tuple[str, str]]:
    """``{label: ("PASS" | "FAIL", reason)}`` of the checks run in this process."""
    return dict(_RESULTS)


def reset_results() -> None:
    _RESULTS.clear()


def summary(graded: dict[str, tuple[str, str]] | None = None) -> str:
    """One line per exercise and a total, e.g. ``2/3 exercises pass``; printed and returned."""
    graded = results() if graded is None else graded
    lines = [f"{status} {label}" + (f": {reason}" if reason else "") for label, (status, reason) in graded.items()]
    passed = sum(status == "PASS" for status, _ in graded.values())
    lines.append(f"{passed}/{len(graded)} exercises pass")
    text = "\n".join(lines)
    print(text)
    return text


def parse_reports(text: str) -> dict[str, tuple[str, str]]:
    """The ``PASS``/``FAIL`` lines :class:`check` printed, read back from a cell's output."""
    found = {}
    for line in text.splitlines():
        match = _REPORT.match(line.strip())
        if match:
            found[match.group(2)] = (match.group(1), match.group(3) or "")
    return found


# ---- the student edition ---------------------------------------------------------------

def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _parse(source: str) -> ast.Module:
    """``ast.parse`` of a notebook cell: IPython's ``%magic`` and ``!shell`` lines read as ``pass``."""
    lines = [line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
             for line in source.splitlines()]
    return ast.parse("\n".join(lines))


def _bound_in_scopes(tree: ast.AST) -> set[str]:
    """Names bound inside comprehensions, lambdas and functions of ``tree`` (local to them)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            for gen in node.generators:
                out |= {n.id for n in ast.walk(gen.target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef)):
            out |= {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
    return out


def _free_loads(source: str) -> set[str]:
    tree = _parse(source)
    loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loads - _bound_in_scopes(tree) - _defined(source)  # a check's own loop variables are its own


def _names(source: str) -> set[str]:
    return {n.id for n in ast.walk(_parse(source)) if isinstance(n, ast.Name)}


def _defined(source: str, imports: bool = True) -> set[str]:
    """Names a cell binds at module level (assignments, loops, with, imports, def, class);
    an augmented assignment (``runs |= ...``) extends a name rather than defining it."""
    out: set[str] = set()

    def targets(node):  # x, (x, y), *x bind names; x[i] = and x.a = change an existing object
        if isinstance(node, ast.Name):
            return {node.id}
        if isinstance(node, (ast.Tuple, ast.List)):
            return set().union(*map(targets, node.elts)) if node.elts else set()
        if isinstance(node, ast.Starred):
            return targets(node.value)
        return set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    out.update(targets(t))
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                out.update(targets(node.target))
            elif isinstance(node, (ast.For, ast.AsyncFor)):
                out.update(targets(node.target))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
                continue
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and imports:
                out.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None:
                        out.update(targets(item.optional_vars))
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []) or [])

    visit(_parse(source).body)
    return out


def solution_blocks(nb) -> list[dict]:
    """Every solution of a chapter notebook (jupytext's reading of the MyST source), in order:
    ``{"label", "answer": [code cells], "check": [code cells tagged check], "text": [markdown lines]}``."""
    blocks, current = [], None
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                start, end = _START.match(line), _END.match(line)
                if start:
                    if current is not None:
                        raise ValueError(f"solution {current['label']} is not closed before {start.group(1)}")
                    current = {"label": start.group(1), "answer": [], "check": [], "text": []}
                elif end:
                    if current is None:
                        raise ValueError("a {solution-end} without a {solution-start}")
                    blocks.append(current)
                    current = None
                elif current is not None:
                    current["text"].append(line)
        elif current is not None and cell.cell_type == "code":
            current["check" if CHECK_TAG in _tags(cell) else "answer"].append(cell)
    if current is not None:
        raise ValueError(f"solution {current['label']} has no {{solution-end}}")
    return blocks


def answer_names(block: dict) -> list[str]:
    """The names the check reads that the answer defines (sorted): what the answer cell must assign.
    A check cell's metadata ``answers: [...]`` overrides the derivation."""
    if not block["check"]:
        return []
    declared = block["check"][-1].get("metadata", {}).get("answers")
    if declared is not None:
        return list(declared)
    # an import is not an answer: a stub `np = ...` would only break the check
    defined = set().union(*(_defined(c.source, imports=False) for c in block["answer"])) if block["answer"] else set()
    return sorted(_free_loads(block["check"][-1].source) & defined)


def _wrap_check(label: str, source: str, names: list[str]) -> str:
    body = [f"    rfl_grading.require_answers(globals(), {', '.join(map(repr, names))})"] if names else []
    body += ["    " + line if line.strip() else "" for line in source.rstrip().splitlines()]
    return "\n".join(["# The check: it reports PASS or FAIL and never stops the notebook. Do not edit it.",
                      "from robustfl_lib import grading as rfl_grading", "",
                      f"with rfl_grading.check({label!r}):", *body])


def student_notebook(source: Path | str, answers: str = "stub"):
    """The student edition of one chapter (an ``nbformat`` notebook).

    Each solution block becomes: a markdown cell "Your answer", an answer cell (``answers=
    "stub"``: ``name = ...  # your code`` per :func:`answer_names`; ``"solution"``: the
    solution's answer cells pasted in, which the tests use to show every check passes), and
    the check cell wrapped in :class:`check`. A solution without a check cell (a written
    answer) becomes a markdown cell to write in, graded by hand. Nothing of the solution's
    text or code is kept otherwise.
    """
    import jupytext
    import nbformat

    if answers not in ("stub", "solution"):
        raise ValueError(f"answers must be 'stub' or 'solution', got {answers!r}")
    nb = jupytext.read(str(source))
    blocks = {b["label"]: b for b in solution_blocks(nb)}
    new = nbformat.v4.new_notebook(metadata=copy.deepcopy(nb.metadata))
    pending: list[str] = []
    inside = None

    def flush(lines):
        text = "\n".join(_plain_exercises(lines)).strip("\n")
        if text.strip():
            new.cells.append(nbformat.v4.new_markdown_cell(text))

    for cell in nb.cells:
        if cell.cell_type == "code":
            if inside is None:
                new.cells.append(nbformat.v4.new_code_cell(cell.source, metadata=copy.deepcopy(cell.metadata)))
            continue
        lines = cell.source.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if inside is None:
                start = _START.match(line)
                if start:
                    inside = start.group(1)
                    flush(pending)
                    pending = []
                    i += 1
                    while i < len(lines) and lines[i].strip() != "```":  # the directive's options
                        i += 1
                else:
                    pending.append(line)
            elif _END.match(line):
                i += 1
                if i < len(lines) and lines[i].strip() == "```":
                    i += 1
                new.cells.extend(_answer_cells(blocks[inside], answers))
                inside = None
                continue
            i += 1
        if inside is None:
            flush(pending)
        pending = []
    for i, cell in enumerate(new.cells):  # fixed ids: the same sources give the same files
        cell["id"] = f"cell-{i}"
    nbformat.validate(new)
    return new


def _plain_exercises(lines: list[str]) -> list[str]:
    """``{exercise}`` directives as plain markdown (Jupyter does not render MyST directives)."""
    out, inside = [], False
    for line in lines:
        if line.startswith("```{exercise}"):
            inside = True
            out.append("**Exercise**")
        elif inside and line.startswith(":label:"):
            out[-1] += f" (`{line.split(':label:', 1)[1].strip()}`)"
        elif inside and line.startswith(":"):
            continue
        elif inside and line.strip() == "```":
            inside = False
        else:
            out.append(line)
    return out


def _answer_cells(block: dict, answers: str) -> list:
    import nbformat

    label = block["label"]
    if not block["check"]:
        return [nbformat.v4.new_markdown_cell(
            f"**Your answer** ({label}, a written answer, graded by your instructor): write it here.",
            metadata={"robustfl": {"answer": label}})]
    names = answer_names(block)
    if answers == "solution":
        code = "\n\n".join(c.source.rstrip() for c in block["answer"])
    elif names:
        code = "\n".join([f"# Your answer to {label}. The check below reads: {', '.join(names)}.",
                          *[f"{name} = ...  # your code" for name in names]])
    else:  # the answer extends the chapter's objects (runs[...] = ...) rather than defining new names
        used = set().union(*(_names(c.source) for c in block["answer"])) if block["answer"] else set()
        read = sorted(_free_loads(block["check"][-1].source) & used)
        code = (f"# Your answer to {label}. The check below reads {', '.join(read) or 'the chapter'}: "
                "add to them what the exercise asks.\n# your code")
    return [nbformat.v4.new_markdown_cell(
                f"**Your answer** ({label}): write your code in the next cell, then run it and the check after it.",
                metadata={"robustfl": {"answer": label}}),
            nbformat.v4.new_code_cell(code, metadata={"robustfl": {"answer": label}}),
            nbformat.v4.new_code_cell(_wrap_check(label, block["check"][-1].source, names),
                                      metadata={"tags": [CHECK_TAG], "editable": False, "deletable": False,
                                                "robustfl": {"check": label}})]


def chapter_sources(root: Path = ROOT) -> list[Path]:
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.md"))


def build_edition(out: Path, sources: Iterable[Path] | None = None) -> list[Path]:
    """Write the student edition of every chapter (default) to ``out/<chapter>.ipynb``."""
    import nbformat

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for src in chapter_sources() if sources is None else sources:
        target = out / (Path(src).stem + ".ipynb")
        nbformat.write(student_notebook(src), str(target))
        written.append(target)
    return written


def _official_checks(stem: str) -> dict[str, str]:
    src = ROOT / "notebooks" / f"{stem}.md"
    if not src.exists():
        return {}
    return {c.metadata["robustfl"]["check"]: c.source for c in student_notebook(src).cells
            if c.cell_type == "code" and "check" in c.metadata.get("robustfl", {})}


def grade_notebook(path: Path, timeout: int = 900, restore: bool = True) -> dict[str, tuple[str, str]]:
    """Execute one collected notebook and return ``{label: (status, reason)}`` for its exercises.
    With ``restore``, each check cell's source is first replaced by the one built from the
    sources (matched by label). A check that printed no report is ``FAIL`` with the reason."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    official = _official_checks(Path(path).stem) if restore else {}
    labels = []
    for cell in nb.cells:
        label = cell.get("metadata", {}).get("robustfl", {}).get("check")
        if cell.cell_type == "code" and label:
            labels.append(label)
            if label in official:
                cell.source = official[label]
    NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(Path(path).parent)}}).execute()
    graded = {}
    for cell in nb.cells:
        label = cell.get("metadata", {}).get("robustfl", {}).get("check")
        if cell.cell_type != "code" or not label:
            continue
        text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        report = parse_reports(text).get(label)
        if report is None:
            reason = f"{errors[0]['ename']}: {errors[0]['evalue']}" if errors else "the check printed no report"
            report = ("FAIL", reason)
        graded[label] = report
    for label in labels:
        graded.setdefault(label, ("FAIL", "check cell missing"))
    return graded


def grade(paths: Iterable[Path], timeout: int = 900) -> dict[str, dict[str, tuple[str, str]]]:
    """Grade every notebook in ``paths`` (files, or folders of ``*.ipynb``); print a table."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.ipynb"))
        elif p.suffix == ".ipynb" and p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: not a notebook (.ipynb) or a folder of them")
    table = {}
    for f in files:
        t0 = time.perf_counter()
        table[str(f)] = grade_notebook(f, timeout=timeout)
        print(f"graded {f} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    width = max([len("exercise")] + [len(label) for g in table.values() for label in g])
    names = {f: os.path.relpath(f) for f in table}  # the folder names the student: alice/00_....ipynb
    left = max([len("notebook")] + [len(n) for n in names.values()])
    print(f"{'notebook':<{left}} {'exercise':<{width}} result")
    for f, graded in table.items():
        for label, (status, reason) in graded.items():
            print(f"{names[f]:<{left}} {label:<{width}} {status}" + (f" ({reason})" if reason else ""))
    total = sum(len(g) for g in table.values())
    passed = sum(s == "PASS" for g in table.values() for s, _ in g.values())
    print(f"{passed}/{total} checks pass in {len(files)} notebook(s)")
    return table


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m robustfl_lib.grading", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "student"), help="folder of the student edition")
    parser.add_argument("--grade", nargs="+", metavar="DIR_OR_NOTEBOOK", help="execute and grade these instead")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one cell may take when grading")
    args = parser.parse_args(argv)
    if args.grade:
        table = grade(args.grade, timeout=args.timeout)
        return 0 if table else 1
    written = build_edition(Path(args.out))
    print(f"wrote the student edition of {len(written)} chapter(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
