"""What the site needs from the chapters' sources, checked without a build (tests/test_site.py
checks the built pages in a browser): every figure a cell draws has a MyST caption and alt
text, a chapter's set-up cell is folded on the site, no figure uses a red-green colour map,
and MathJax is served from the site itself, not a CDN.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

jupytext = pytest.importorskip("jupytext")

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.md"))

# A cell that draws: matplotlib calls, the library's plot_* helpers, a result's heatmap().
DRAWS = re.compile(r"\bplt\.|\brfl\.plot_\w+\(|\bplot_\w+\(|\.imshow\(|\bsubplots\(|\.heatmap\(")
COLAB_LINE = 'if "google.colab" in sys.modules'
FOLDED = {"hide-input", "hide-cell", "remove-input"}


def _code_cells(chapter: Path):
    return [c for c in jupytext.read(chapter).cells if c.cell_type == "code"]


def _words(text) -> int:
    return len(str(text or "").split())


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_figure_has_a_caption_and_alt_text(chapter):
    """myst-nb takes a figure's caption from ``mystnb: figure: caption:`` and its alt text from
    ``mystnb: image: alt:`` in the cell's metadata; alt text says what the figure shows (a screen
    reader reads it instead of the picture), so it is more than the caption repeated."""
    problems = []
    for cell in _code_cells(chapter):
        meta = cell.metadata.get("mystnb", {})
        if not (DRAWS.search(cell.source) or meta.get("figure") or meta.get("image")):
            continue
        where = cell.source.strip().splitlines()[0][:60]
        caption = (meta.get("figure") or {}).get("caption")
        alt = (meta.get("image") or {}).get("alt")
        if _words(caption) < 4:
            problems.append(f"no caption (mystnb: figure: caption:) on the cell starting {where!r}")
        if _words(alt) < 8:
            problems.append(f"no alt text of 8 words or more (mystnb: image: alt:) on the cell starting {where!r}")
        elif str(alt).strip() == str(caption).strip():
            problems.append(f"the alt text repeats the caption on the cell starting {where!r}")
        if not (meta.get("figure") or {}).get("name"):
            problems.append(f"no figure name (mystnb: figure: name:) to refer to, on the cell starting {where!r}")
    assert not problems, f"{chapter.name}: " + "; ".join(problems)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_setup_cell_is_folded_on_the_site(chapter):
    """The first code cell (Colab install line, imports, base seed) is tagged so the site folds it:
    a page opens with the chapter's idea and formula, not with its imports. The cell still runs."""
    first = _code_cells(chapter)[0]
    assert COLAB_LINE in first.source, f"{chapter.name}: the first code cell is not the set-up cell"
    tags = set(first.metadata.get("tags", []))
    assert tags & FOLDED, f"{chapter.name}: the set-up cell has tags {sorted(tags)}; add `:tags: [hide-input]`"
    assert "remove-cell" not in tags, f"{chapter.name}: remove-cell would drop the set-up cell's output from the site"


# Colour maps that red-green colour vision deficiency (about 1 in 12 men) cannot read in order:
# red-green diverging maps and rainbows. ColorBrewer marks RdYlGn, Spectral and RdGy unsafe.
RED_GREEN = ("RdYlGn", "Spectral", "RdGy", "jet", "rainbow", "gist_rainbow", "hsv", "nipy_spectral", "turbo",
             "brg", "gist_ncar", "gist_stern")
_NAMES = "|".join(RED_GREEN)
# The name as a string ("RdYlGn", 'jet_r') or as matplotlib.cm's attribute (cm.jet); not a word in prose.
COLORMAP = re.compile(rf"""["'](?P<s>{_NAMES})(?:_r)?["']|\bcm\.(?P<a>{_NAMES})\b""")
PLOTTING_SOURCES = CHAPTERS + sorted((REPO / "robustfl_lib").rglob("*.py"))


@pytest.mark.parametrize("source", PLOTTING_SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_red_green_colour_map(source):
    found = sorted({m.group("s") or m.group("a") for m in COLORMAP.finditer(source.read_text())})
    assert not found, (f"{source.relative_to(REPO)} uses {found}: pick a map readable with a red-green "
                       f"deficiency (cividis, viridis; PuOr or RdBu for diverging values)")


def test_colour_map_check_catches_the_spellings_used():
    """The pattern above must see the ways a map is named in matplotlib calls."""
    for text in ('cmap="RdYlGn"', "plt.get_cmap('Spectral_r')", "cmap=cm.jet", 'cmap = "turbo"'):
        assert COLORMAP.search(text), text
    for text in ('cmap="cividis"', "cmap='viridis'", 'cmap="PuOr"', "spectral norm", "# a jet of water",
                 '"""Spectral rules: they judge"'):
        assert not COLORMAP.search(text), text


def test_mathjax_is_served_by_the_site():
    """Formulas render with no network: MathJax comes from the sphinx-mathjax-offline package
    (the book extra), which copies its MathJax 3 files into the site's _static, and the pages
    load it from there (``mathjax_path`` relative to _static, not a URL)."""
    config = yaml.safe_load((REPO / "book" / "_config.yml").read_text())["sphinx"]
    assert "sphinx-mathjax-offline" in config.get("extra_extensions", []), "the extension that copies MathJax is off"
    assert "offline_math" in config.get("local_extensions", {}), "MathJax is not loaded on every page (book/_ext)"
    path = config["config"].get("mathjax_path", "")
    assert path and not re.match(r"^(https?:)?//", path), f"mathjax_path must be a path under _static, got {path!r}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"sphinx-mathjax-offline' in pyproject, "the book extra does not install sphinx-mathjax-offline"
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None:
        pytest.skip("sphinx-mathjax-offline is not installed (pip install -e .[book])")
    shipped = Path(spec.origin).parent / "static" / "mathjax"
    assert (shipped / path.removeprefix("mathjax/")).is_file(), f"the package ships no {path} ({shipped})"
    # MathJax's CHTML output loads its fonts from beside the script; without them formulas show as boxes.
    assert list((shipped / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff")), "the package ships no fonts"


def _offline_math():
    spec = importlib.util.spec_from_file_location("robustfl_offline_math", REPO / "book" / "_ext" / "offline_math.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_build_without_the_mathjax_files_fails(tmp_path):
    """book/_ext/offline_math.py fails the build when the pages would load MathJax from a file
    the site lacks, or from a URL; it passes a site that holds the file."""
    pytest.importorskip("sphinx")
    from types import SimpleNamespace

    from sphinx.errors import ExtensionError

    ext = _offline_math()

    def app(path):
        return SimpleNamespace(config=SimpleNamespace(mathjax_path=path), outdir=str(tmp_path),
                               builder=SimpleNamespace(format="html"))

    with pytest.raises(ExtensionError, match="did not copy"):
        ext._check_copied(app("mathjax/tex-chtml.js"), None)
    with pytest.raises(ExtensionError, match="URL"):
        ext._check_copied(app("https://cdn.example/mathjax/tex-chtml.js"), None)
    (tmp_path / "_static" / "mathjax").mkdir(parents=True)
    (tmp_path / "_static" / "mathjax" / "tex-chtml.js").write_text("// MathJax")
    ext._check_copied(app("mathjax/tex-chtml.js"), None)
    ext._check_copied(app("mathjax/missing.js"), RuntimeError("the build failed already"))  # not masked
