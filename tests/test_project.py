"""Project hygiene: dependencies agree, no committed .ipynb, every chapter is a MyST notebook in the book."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

# conda and pip spell a few packages differently.
CONDA_NAMES = {"torch": "pytorch"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower()


def test_runtime_dependencies_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)}
    # What the environment's pip: section installs counts too (flwr[simulation] is there).
    conda |= {_name(p) for d in env["dependencies"] if isinstance(d, dict) for p in d.get("pip", [])}
    pip_reqs = list(project["dependencies"])
    for extra in ("book", "dev", "flower"):
        pip_reqs += project["optional-dependencies"][extra]
    missing = sorted({CONDA_NAMES.get(_name(r), _name(r)) for r in pip_reqs} - conda)
    assert not missing, f"in pyproject.toml but not environment.yml: {missing}"
    assert any(d.startswith("torch>=") for d in project["dependencies"]), "torch must stay a lower bound"


def test_no_ipynb_committed():
    try:
        out = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert out.stdout.strip() == "", f"notebooks must be committed as MyST .md only: {out.stdout.split()}"


CHAPTERS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.md"))


def test_chapters_exist():
    assert CHAPTERS, "no chapters found"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_myst_notebook_in_toc(chapter):
    text = chapter.read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["jupytext"]["text_representation"]["format_name"] == "myst"
    assert front["kernelspec"]["name"] == "python3"
    assert "```{code-cell} ipython3" in text
    # A claim is asserted by a bare assert or by rfl.claim, which asserts on an interval.
    assert re.search(r"^\s*assert |\bclaim\(", text, re.M), f"{chapter.name} asserts none of its claims"
    assert "{cite}`" in text, f"{chapter.name} cites none of the papers it implements"
    assert 'if "google.colab" in sys.modules' in text, f"{chapter.name} lacks the Colab-only install line"
    toc = (REPO / "book" / "_toc.yml").read_text()
    assert f"chapters/{chapter.stem}" in toc, f"{chapter.name} is missing from book/_toc.yml"


def test_published_branch_is_where_colab_buttons_point():
    """The Colab buttons open notebooks on ``colab_branch``; the publishing workflow must push the
    site there, built with the same command as the README's (any warning fails it)."""
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "book.yml").read_text())
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    publish = [s for s in steps if "gh-pages" in s.get("uses", "")]
    assert publish, "no step publishes the site"
    config = yaml.safe_load((REPO / "book" / "_config.yml").read_text())
    branch = config["sphinx"]["config"].get("colab_branch", "gh-pages")
    assert publish[0]["with"]["publish_branch"] == branch
    assert publish[0]["with"]["publish_dir"] == "book/_build/html"
    assert any(s.get("run", "").startswith("jupyter-book build book -W -n") for s in steps)


# A literal seed in a chapter: the forms the chapters used before they read ROBUSTFL_SEED.
LITERAL_SEED = re.compile(r"seed=[0-9]|manual_seed\([0-9]|default_rng\([0-9]|make_generator\([0-9]|set_seed\([0-9]")
CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```", re.M | re.S)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_derives_every_seed_from_its_base_seed(chapter):
    """Every chapter reads its base seed (``rfl.base_seed()``, i.e. ROBUSTFL_SEED) and seeds
    nothing with a literal, so that ``ROBUSTFL_SEED=7`` re-runs all of its randomness."""
    code = "\n".join(CODE_CELL.findall(chapter.read_text()))
    assert code, f"{chapter.name}: no code cells found"
    assert "rfl.base_seed()" in code, f"{chapter.name} does not read its base seed (SEED = rfl.base_seed())"
    literal = [line.strip() for line in code.splitlines() if LITERAL_SEED.search(line)]
    assert not literal, f"{chapter.name} seeds with literals instead of SEED: {literal}"


EXERCISE = re.compile(r"^```\{exercise\}[^\n]*\n(.*?)^```", re.M | re.S)
SOLUTION = re.compile(r"^```\{solution-start\}\s*(\S+)[^\n]*\n(.*?)^```", re.M | re.S)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_exercise_has_a_solution_in_a_dropdown(chapter):
    """QuantEcon's habit: each exercise is followed by its solution, folded so a student tries first.
    The same rule is checked on the rendered pages (tests/test_site.py); this check needs no build."""
    text = chapter.read_text()
    labels = []
    for body in EXERCISE.findall(text):
        label = re.search(r"^:label:\s*(\S+)", body, re.M)
        assert label, f"{chapter.name}: an exercise has no :label:, so no solution can refer to it:\n{body[:200]}"
        labels.append(label.group(1))
    solutions = {name: options for name, options in SOLUTION.findall(text)}
    missing = [name for name in labels if name not in solutions]
    assert not missing, f"{chapter.name}: exercises without a solution: {missing}"
    folded = [name for name, options in solutions.items() if re.search(r"^:class:.*\bdropdown\b", options, re.M)]
    assert sorted(folded) == sorted(solutions), f"{chapter.name}: solutions not in a dropdown: {set(solutions) - set(folded)}"
    assert text.count("```{solution-start}") == text.count("```{solution-end}"), f"{chapter.name}: unbalanced solution-start/end"
