"""book/pdf.py (``python tasks.py pdf``): the site printed to one PDF by the local Chromium.

The cheap tests need no build: the table of contents, chapter selection, the errors a
missing site or page raises, the page count. The browser tests print a tiny two-page site
(with the MathJax the book extra installs) and skip where Chromium or playwright is absent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("robustfl_book_pdf", REPO / "book" / "pdf.py")
pdf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pdf)

TOC = """format: jb-book
root: intro
parts:
  - caption: One
    chapters:
      - file: chapters/00_first
      - file: chapters/01_second
        sections:
          - file: chapters/01a_inner
"""


def test_toc_pages_follow_the_book_order(tmp_path):
    (tmp_path / "_toc.yml").write_text(TOC)
    assert pdf.toc_pages(tmp_path / "_toc.yml") == ["intro", "chapters/00_first", "chapters/01_second",
                                                    "chapters/01a_inner"]
    real = pdf.toc_pages()
    assert real[0] == "intro" and "chapters/00_introduction" in real
    assert real.index("chapters/04_median") < real.index("chapters/05_trimmed_mean")


def test_select_by_number_or_stem_keeps_reading_order():
    pages = ["intro", "chapters/00_first", "chapters/01_second", "chapters/04_median"]
    assert pdf.select(pages, None) == pages
    assert pdf.select(pages, ["4", "00"]) == ["chapters/00_first", "chapters/04_median"]
    assert pdf.select(pages, ["01_second.md"]) == ["chapters/01_second"]
    with pytest.raises(pdf.PDFError, match=r"no chapter '07'.*00, 01, 04"):
        pdf.select(pages, ["07"])


def test_no_site_and_missing_pages_are_named(tmp_path):
    with pytest.raises(pdf.PDFError, match="no built site.*tasks.py book"):
        pdf.check_site(tmp_path, ["intro"])
    (tmp_path / "index.html").write_text("<html></html>")
    (tmp_path / "intro.html").write_text("<html></html>")
    with pytest.raises(pdf.PDFError, match=r"lacks pages.*chapters/00_first"):
        pdf.check_site(tmp_path, ["intro", "chapters/00_first"])
    pdf.check_site(tmp_path, ["intro"])  # complete: no error
    # print_pdf checks the site before it looks for a browser: the message is the site's.
    with pytest.raises(pdf.PDFError, match="no built site"):
        pdf.print_pdf(tmp_path / "nothing", tmp_path / "x.pdf")


def test_page_count_reads_the_root_page_tree():
    fake = b"%PDF-1.4\n1 0 obj << /Type /Pages /Kids [3 0 R 4 0 R] /Count 2 >> endobj\n" \
           b"2 0 obj << /Count 7 /Type /Pages /Kids [] >> endobj\n"
    assert pdf.page_count(fake) == 7
    with pytest.raises(pdf.PDFError, match="no page tree"):
        pdf.page_count(b"%PDF-1.4\n")


def _mathjax_dir() -> Path | None:
    try:
        files = metadata.files("sphinx-mathjax-offline") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith("static/mathjax/tex-chtml.js"):
            return Path(f.locate()).parent
    return None


PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title>
<script>window.MathJax = {{"options": {{"processHtmlClass": "math"}}}}</script>
<script defer src="{up}_static/mathjax/tex-chtml.js"></script></head>
<body><main><article class="bd-article"><h1>{title}</h1>{body}</article></main></body></html>"""


def _tiny_site(root: Path, second_body: str) -> Path:
    site = root / "html"
    (site / "chapters").mkdir(parents=True)
    (site / "_static").mkdir()
    os.symlink(_mathjax_dir(), site / "_static" / "mathjax")
    (site / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=intro.html" />')
    (site / "intro.html").write_text(PAGE.format(title="Intro", up="", body='<p>Inline <span class="math">'
                                                 r"\(x^2 + \frac{a}{b}\)</span>.</p>"))
    (site / "chapters" / "00_first.html").write_text(PAGE.format(title="First", up="../", body=second_body))
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapters/00_first\n")
    return site


def _need_browser():
    try:
        pdf.chromium()
        import playwright.sync_api  # noqa: F401
    except (pdf.PDFError, ImportError) as exc:
        pytest.skip(f"no browser to print with: {exc}")
    if _mathjax_dir() is None:
        pytest.skip("sphinx-mathjax-offline (the book extra) is not installed")


def test_prints_a_tiny_site_with_formulas_typeset(tmp_path):
    _need_browser()
    body = '<div class="math notranslate">\\[\\sum_{i=1}^n u_i\\]</div><p>Second page.</p>'
    site = _tiny_site(tmp_path, body)
    report = pdf.print_pdf(site, tmp_path / "out" / "book.pdf", toc=tmp_path / "_toc.yml")
    data = (tmp_path / "out" / "book.pdf").read_bytes()
    assert data.startswith(b"%PDF-")
    assert report["site_pages"] == 2 and report["formulas"] == 2
    assert report["pages"] >= 2, "each page of the site starts a new sheet"
    assert report["refused"] == 0
    one = pdf.print_pdf(site, tmp_path / "one.pdf", chapters=["00"], toc=tmp_path / "_toc.yml")
    assert one["site_pages"] == 1 and one["formulas"] == 1


def test_a_broken_image_fails_the_print(tmp_path):
    _need_browser()
    site = _tiny_site(tmp_path, '<img alt="a plot" src="../_images/missing.png">')
    with pytest.raises(pdf.PDFError, match="broken.*missing.png"):
        pdf.print_pdf(site, tmp_path / "book.pdf", toc=tmp_path / "_toc.yml")
    assert not (tmp_path / "book.pdf").exists()
