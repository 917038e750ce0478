"""Browser check of the built book: every page loads in headless Chromium with no broken
image, no error output cell, at least one figure per chapter and a dropdown for every
exercise's solution; every formula is typeset by the MathJax the site serves itself (the
check refuses every request that is not to the local server, so a CDN copy would fail it)
and no raw TeX is left in the text; every figure a chapter's cell draws has a caption and
alt text. A screenshot of each page is saved to book/_build/screenshots/.

Needs the site (``python tasks.py book``) and Chromium (Debian's ``chromium`` package) with
the ``playwright`` Python package. ``python tasks.py test`` builds the site first and sets
``ROBUSTFL_REQUIRE_SITE=1``, so there a missing site or browser is a failure, not a skip.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ROBUSTFL_SITE=<folder> checks another build's html folder (e.g. a small book of two chapters);
# its screenshots go beside it.
SITE = Path(os.environ.get("ROBUSTFL_SITE") or REPO / "book" / "_build" / "html").resolve()
SHOTS = SITE.parent / "screenshots"
REQUIRED = os.environ.get("ROBUSTFL_REQUIRE_SITE") == "1"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _pages() -> list[str]:
    if not (SITE / "index.html").exists():
        return []
    skip = {"_static", "_sources", "_images", "_panels_static"}
    return sorted(
        str(p.relative_to(SITE)) for p in SITE.rglob("*.html") if not skip & set(p.relative_to(SITE).parts)
    )


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server():
    if not _pages():
        _unavailable(f"no built site in {SITE}: run `python tasks.py book` first")
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output readable
        pass


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        _unavailable("Chromium not found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e .[dev])")
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync", "--disable-quic"],
        )
        yield b
        b.close()


_CHECKS = r"""() => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  const errors = [...document.querySelectorAll('.cell_output .output.traceback, .cell_output .output.error')]
                   .map(e => e.innerText.slice(0, 200));
  const exercises = document.querySelectorAll('div.exercise').length;
  const solutions = [...document.querySelectorAll('div.solution')];
  const dropdowns = solutions.filter(s => s.classList.contains('dropdown') || s.tagName === 'DETAILS'
                                        || s.closest('details') !== null).length;
  const drawn = [...document.querySelectorAll('.cell_output img')];
  const name = i => (i.getAttribute('src') || '').split('/').pop();
  // A figure is captioned when myst-nb wrapped it in <figure> with a non-empty <figcaption>
  // (textContent: in a closed solution dropdown innerText is empty although the caption is there).
  const uncaptioned = drawn.filter(i => {
    const cap = i.closest('figure') && i.closest('figure').querySelector('figcaption');
    return !(cap && cap.textContent.trim());
  }).map(name);
  const main = document.querySelector('main') || document.body;
  const noAlt = [...main.querySelectorAll('img')].filter(i => !(i.getAttribute('alt') || '').trim()).map(name);
  // Without `mystnb: image: alt:` myst-nb writes the image's file name as its alt text: says nothing.
  const fileAlt = drawn.filter(i => /\.(png|svg|jpe?g|gif)$/i.test((i.getAttribute('alt') || '').trim())).map(name);
  // Formulas: Sphinx marks every one (inline, display, amsmath) with class "math"; typeset, it holds an
  // <mjx-container>. Raw TeX left in the text is looked for outside code, where "$$" or "\(" may be legitimate.
  const formulas = [...document.querySelectorAll('.math')];
  const untypeset = formulas.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.trim().slice(0, 80));
  const text = document.body.cloneNode(true);  // the sidebar too: it lists chapter titles that hold math
  text.querySelectorAll('pre, code, script, style, textarea, mjx-container, .highlight').forEach(e => e.remove());
  const rawTex = [];
  for (const re of [/\$\$/g, /\\\(|\\\)/g, /\\\[|\\\]/g, /\\begin\{/g, /\$[^$\n]*\\[A-Za-z]+[^$\n]*\$/g]) {
    for (const m of text.textContent.matchAll(re)) {
      const at = m.index;
      rawTex.push(text.textContent.slice(Math.max(0, at - 30), at + 40).replace(/\s+/g, ' '));
    }
  }
  const mathjax = [...document.scripts].map(s => s.src).filter(s => /mathjax/i.test(s));
  return {broken, errors, exercises, solutions: solutions.length, dropdowns, figures: drawn.length, uncaptioned,
          noAlt, fileAlt, formulas: formulas.length, untypeset, rawTex: rawTex.slice(0, 5), mathjax,
          title: document.title, mainText: main.innerText.length};
}"""

# MathJax starts after the page's load event (its script is deferred and loads its components
# itself); wait for its startup promise, which resolves once the page is typeset.
_TYPESET = """async () => {
  if (!document.querySelector('.math')) return 'no formulas';
  for (let i = 0; i < 150 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++) {
    await new Promise(r => setTimeout(r, 100));
  }
  if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) return 'MathJax did not start';
  await MathJax.startup.promise;
  return 'typeset';
}"""


@pytest.mark.parametrize("page", _pages() or ["<no site built>"])
def test_page_renders(server, browser, page):
    SHOTS.mkdir(parents=True, exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    # The check runs offline: anything not served from localhost is refused at once.
    refused: list[str] = []
    missing: list[str] = []

    def route(r):
        if r.request.url.startswith(server):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    ctx.route("**/*", route)
    tab = ctx.new_page()
    # A local 404 is a file the build did not copy (a MathJax component or font, an image).
    tab.on("response", lambda resp: missing.append(resp.url) if resp.status >= 400
           and not resp.url.endswith("/favicon.ico") else None)
    try:
        response = tab.goto(f"{server}/{page}", wait_until="load", timeout=30_000)
        assert response is not None and response.ok, f"{page}: HTTP {response.status if response else 'no response'}"
        redirect = re.search(r'http-equiv="Refresh" content="0; url=([^"]+)"', (SITE / page).read_text())
        if redirect:  # e.g. index.html -> intro.html: check the page it lands on
            tab.wait_for_url(f"**/{redirect.group(1)}", timeout=10_000)
            tab.wait_for_load_state("load")
        typeset = tab.evaluate(_TYPESET)
        report = tab.evaluate(_CHECKS)
        tab.screenshot(path=str(SHOTS / (page.replace("/", "__").removesuffix(".html") + ".png")), full_page=True)
    finally:
        ctx.close()
    assert report["mainText"] > 0, f"{page}: empty page"
    assert not report["broken"], f"{page}: broken images {report['broken']}"
    assert not report["errors"], f"{page}: error output cells {report['errors']}"
    assert report["solutions"] >= report["exercises"], f"{page}: {report['exercises']} exercises but {report['solutions']} solutions"
    assert report["dropdowns"] == report["solutions"], f"{page}: a solution is not in a dropdown"
    assert not missing, f"{page}: files the site lacks (HTTP error): {missing[:5]}"
    # Offline math: the formulas are typeset by the site's own MathJax, none is left as raw TeX.
    if report["formulas"]:
        assert report["mathjax"] and all(s.startswith(server) for s in report["mathjax"]), (
            f"{page}: MathJax is not served by the site: {report['mathjax'] or 'no MathJax script'} "
            f"(refused: {[u for u in refused if 'mathjax' in u.lower()][:3]})")
        assert typeset == "typeset", f"{page}: {report['formulas']} formulas, but {typeset}"
        assert not report["untypeset"], f"{page}: formulas MathJax did not typeset: {report['untypeset'][:5]}"
    assert not report["rawTex"], f"{page}: raw TeX in the page's text: {report['rawTex']}"
    assert not report["noAlt"], f"{page}: images without alt text: {report['noAlt']}"
    if page.startswith("chapters/"):
        # Every chapter plots; a chapter page without a figure means the kernel drew to a non-inline backend.
        assert report["figures"] > 0, f"{page}: no figure in any cell output"
        # The cell's `mystnb: figure: caption:` metadata (tests/test_site_static.py checks the sources).
        assert not report["uncaptioned"], f"{page}: figures without a caption: {report['uncaptioned']}"
        assert not report["fileAlt"], f"{page}: figures whose alt text is their file name: {report['fileAlt']}"
