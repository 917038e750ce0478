"""book/chapter_times.py: the teaching page's table (times read from a jupyter-cache, the
prerequisite graph read from cross-references) and its check of the lab plan."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("robustfl_chapter_times", REPO / "book" / "chapter_times.py")
ct = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ct)


def test_direct_drops_the_arrows_another_path_implies():
    graph = {"00": [], "01": ["00"], "03": ["00"], "04": ["00", "03"], "08": ["00", "03", "04", "07"],
             "07": ["03"]}
    assert ct.direct(graph) == {"00": [], "01": ["00"], "03": ["00"], "04": ["03"], "08": ["04", "07"], "07": ["03"]}


def test_prerequisites_are_backward_references_only(tmp_path):
    src = tmp_path / "05_x.md"
    src.write_text("(ch-x)=\n# X\nAs {ref}`ch-median` showed, and {ref}`the text <ch-intro>` says; "
                   "chapter 3 too; see {ref}`ch-later` and chapter 9 for more.\n")
    labels = {"ch-median": "04", "ch-intro": "00", "ch-later": "12", "ch-x": "05"}
    assert ct.prerequisites(src, labels) == ["00", "03", "04"]


def test_prose_words_skip_code_cells_and_front_matter(tmp_path):
    src = tmp_path / "01_y.md"
    src.write_text("---\njupytext:\n  formats: md\n---\n# Title here\n\nTwo words.\n\n"
                   "```{code-cell} ipython3\nimport many, words, here\n```\n\n"
                   "```{exercise}\n:label: ex\nThink.\n```\n")
    assert ct.prose_words(src) == 5  # "Title here", "Two words", "Think": no code, front matter or markup
    assert ct.exercises(src) == 1


def test_times_come_from_the_cache_when_it_holds_the_current_code(tmp_path):
    import jupytext
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    src = ct.chapters()[0]
    cache = get_cache(str(tmp_path / "cache"))
    cache.cache_notebook_bundle(CacheBundleIn(jupytext.read(str(src)), str(src), data={"execution_seconds": 123.5}),
                                check_validity=False)
    assert ct.cached_seconds(tmp_path / "cache", [src]) == {src.name[:2]: 123.5}
    rows = {r["chapter"]: r for r in ct.rows(tmp_path / "cache")}
    assert rows[src.name[:2]]["seconds"] == 123.5 and rows[src.name[:2]]["source"] == "this build's jupyter-cache"
    other = ct.chapters()[1].name[:2]
    assert rows[other]["source"] == ct.REFERENCE  # no cached time: the recorded nbval time, labelled
    assert ct.cached_seconds(tmp_path / "none", [src]) == {}


def test_plan_flags_a_session_over_budget_and_a_missing_prerequisite(tmp_path):
    plan = ct.plan([("00",), ("04",)], tmp_path / "none", budget=1e9)
    assert plan[1]["missing"] == ["03"] and plan[0]["missing"] == []
    assert all(s["fits"] for s in plan)
    tight = ct.plan([("00",)], tmp_path / "none", budget=1.0)
    assert not tight[0]["fits"] and tight[0]["total"] > 1.0
    with pytest.raises(ValueError, match="do not exist.*'99'"):
        ct.plan([("99",)], tmp_path / "none")
    with pytest.raises(ValueError, match="reading speed must be positive"):
        ct.rows(tmp_path / "none", wpm=0)
