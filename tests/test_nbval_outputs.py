"""The test command executes each chapter once: nbval's outputs, kept by tests/nbval_outputs.py,
become jupyter-book's cached execution (book/execute.py). Checked here on a two-cell notebook."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("nbval")
pytest.importorskip("jupyter_cache")

SOURCE = """---
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
# A chapter

```{code-cell} ipython3
from IPython.display import Markdown, display
print("before the table")
display(Markdown("**a table**"))
print("after the table")
```

```{code-cell} ipython3
len("a; b")  # its result is shown
```

```{code-cell} ipython3
len("abc");  # a trailing ';' hides it in a notebook, and so on the page
```

```{code-cell} ipython3
%s
```
"""


def _run(tmp_path: Path, last_cell: str) -> tuple[int, Path]:
    import jupytext

    nb = tmp_path / "chapter.ipynb"
    jupytext.write(jupytext.reads(SOURCE % last_cell, fmt="md:myst"), nb, fmt="ipynb")
    out = tmp_path / "executed"
    env = dict(os.environ, ROBUSTFL_NBVAL_OUTPUTS=str(out), PYTHONPATH=str(REPO / "tests"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "nbval_outputs", str(nb),
           "--nbval-lax", "--nbval-current-env"]
    rc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True).returncode
    return rc, out / "chapter.ipynb"


def test_a_passing_chapter_is_kept_with_its_outputs_in_order(tmp_path):
    rc, kept = _run(tmp_path, "6 * 7")
    assert rc == 0
    cells = [c for c in nbformat.read(str(kept), as_version=4).cells if c.cell_type == "code"]
    first = [(o.output_type, o.get("text") or sorted(o.get("data", {}))) for o in cells[0].outputs]
    # nbval alone would merge the two prints above the table; the page needs them where they were
    assert first == [("stream", "before the table\n"), ("display_data", ["text/markdown", "text/plain"]),
                     ("stream", "after the table\n")]
    assert cells[1].outputs[0]["data"]["text/plain"] == "4"
    assert cells[2].outputs == []  # nbval alone keeps the 3
    assert cells[3].outputs[0]["data"]["text/plain"] == "42"


def test_a_failing_chapter_is_not_kept(tmp_path):
    rc, kept = _run(tmp_path, "assert False, 'a claim fails'")
    assert rc != 0
    assert not kept.exists()


def test_kept_notebooks_are_what_the_book_build_finds_in_its_cache(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("book_execute", REPO / "book" / "execute.py")
    execute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(execute)
    monkeypatch.setattr(execute, "CACHE", tmp_path / "cache")
    rc, kept = _run(tmp_path, "6 * 7")
    assert rc == 0
    source = tmp_path / "chapter.md"
    source.write_text(SOURCE % "6 * 7")
    cache = execute._cache()
    from myst_nb.core.read import read_myst_markdown_notebook

    as_the_build_reads_it = read_myst_markdown_notebook(source.read_text())  # the reader jupyter-book uses
    assert not execute._cached(cache, as_the_build_reads_it)
    execute._store(cache, nbformat.read(str(kept), as_version=4), source)
    assert execute._cached(cache, as_the_build_reads_it)
    _, merged = cache.merge_match_into_notebook(as_the_build_reads_it)
    assert [c for c in merged.cells if c.cell_type == "code"][-1].outputs[0]["data"]["text/plain"] == "42"
    edited = read_myst_markdown_notebook(source.read_text())
    edited.cells[-1].source = "6 * 8"
    assert not execute._cached(cache, edited)  # a changed chapter is executed again


def test_the_book_command_executes_uncached_chapters_into_the_cache(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("book_execute_for_test", REPO / "book" / "execute.py")
    execute = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "book_execute_for_test", execute)  # the worker processes find it by name
    spec.loader.exec_module(execute)
    from myst_nb.core.read import read_myst_markdown_notebook

    good, bad = tmp_path / "90_good.md", tmp_path / "91_bad.md"
    good.write_text(SOURCE % "6 * 7")
    bad.write_text(SOURCE % "assert False, 'a claim fails'")
    monkeypatch.setattr(execute, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(execute, "chapters", lambda: [good, bad])
    assert execute.execute(jobs=2) == 1  # one chapter failed: reported, not cached
    cache = execute._cache()
    assert execute._cached(cache, read_myst_markdown_notebook(good.read_text()))
    assert not execute._cached(cache, read_myst_markdown_notebook(bad.read_text()))
    _, merged = cache.merge_match_into_notebook(read_myst_markdown_notebook(good.read_text()))
    assert [c for c in merged.cells if c.cell_type == "code"][-1].outputs[0]["data"]["text/plain"] == "42"
