"""A pytest plugin that keeps what nbval executed: each chapter that passed under nbval is
written, with its outputs, to ``$ROBUSTFL_NBVAL_OUTPUTS/<name>.ipynb``.

``python tasks.py test`` loads it (``-p nbval_outputs``) and hands those notebooks to the
book build (``book/execute.py --from``), so that the test command executes every chapter
once instead of twice (nbval, then jupyter-book): the site it checks shows the outputs of
the very run that the tests passed on. Without the variable the plugin does nothing.

nbval merges every stream of a cell into one output, moving a ``print`` after a table
above it; for the page the order matters, so here only *adjacent* streams are merged.
nbval runs cells outside IPython's history, so a trailing ``;`` does not silence a cell's
result there (IPython looks for it in the history); here a cell's ``execute_result`` is
dropped when its source ends in ``;``, with IPython's own test, as a notebook would show it.
nbval compares outputs only in cells marked ``NBVAL_CHECK_OUTPUT``; no chapter has one.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

VARIABLE = "ROBUSTFL_NBVAL_OUTPUTS"


def _adjacent_only(original):
    def coalesce(outputs):
        merged, run = [], []
        for out in list(outputs) + [None]:
            if out is not None and out.get("output_type") == "stream":
                run.append(out)
                continue
            merged.extend(original(run) if run else [])
            run = []
            if out is not None:
                merged.append(out)
        return merged

    return coalesce


def _silenced(source: str) -> bool:
    from IPython.core.displayhook import DisplayHook

    try:
        return bool(DisplayHook.semicolon_at_end_of_expression(source))
    except Exception:  # a cell IPython's tokenizer cannot read (magics): keep its outputs
        return False


class _Keeper:
    def __init__(self, dest: Path):
        self.dest = dest
        self.files: dict[str, object] = {}  # nodeid of the notebook -> its IPyNbFile
        self.failed: set[str] = set()
        self.ran: dict[str, int] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if not hasattr(item, "test_outputs") or not hasattr(item, "cell"):
            return  # not an nbval cell
        parent = item.parent
        self.files[parent.nodeid] = parent
        if report.failed:
            self.failed.add(parent.nodeid)
        elif call.when == "call":
            outputs = list(item.test_outputs or [])
            if _silenced(item.cell.source):
                outputs = [out for out in outputs if out.get("output_type") != "execute_result"]
            item.cell.outputs = outputs
            self.ran[parent.nodeid] = self.ran.get(parent.nodeid, 0) + 1

    def pytest_sessionfinish(self, session):
        self.dest.mkdir(parents=True, exist_ok=True)
        for nodeid, nbfile in self.files.items():
            cells = [c for c in nbfile.nb.cells if c.cell_type == "code"]
            if nodeid in self.failed or self.ran.get(nodeid, 0) != len(cells):
                continue  # the book build executes this one itself (and reports its error)
            nbformat.write(nbfile.nb, str(self.dest / Path(str(nbfile.fspath)).name))


def pytest_configure(config):
    dest = os.environ.get(VARIABLE, "").strip()
    if not dest:
        return
    import nbval.plugin

    nbval.plugin.coalesce_streams = _adjacent_only(nbval.plugin.coalesce_streams)
    config.pluginmanager.register(_Keeper(Path(dest)), "robustfl-nbval-keeper")
