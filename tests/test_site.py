"""Browser check of the built book: every page loads in headless Chromium with no broken
image, no error output cell, at least one figure per chapter and a dropdown for every
exercise's solution; a screenshot of
each page is saved to book/_build/screenshots/.

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
SITE = REPO / "book" / "_build" / "html"
SHOTS = REPO / "book" / "_build" / "screenshots"
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


_CHECKS = """() => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  const errors = [...document.querySelectorAll('.cell_output .output.traceback, .cell_output .output.error')]
                   .map(e => e.innerText.slice(0, 200));
  const exercises = document.querySelectorAll('div.exercise').length;
  const solutions = [...document.querySelectorAll('div.solution')];
  const dropdowns = solutions.filter(s => s.classList.contains('dropdown') || s.tagName === 'DETAILS'
                                        || s.closest('details') !== null).length;
  const figures = document.querySelectorAll('.cell_output img').length;
  return {broken, errors, exercises, solutions: solutions.length, dropdowns, figures,
          title: document.title, mainText: (document.querySelector('main') || document.body).innerText.length};
}"""


@pytest.mark.parametrize("page", _pages() or ["<no site built>"])
def test_page_renders(server, browser, page):
    SHOTS.mkdir(parents=True, exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    # The check runs offline: anything not served from localhost is refused at once.
    ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server) else route.abort())
    tab = ctx.new_page()
    try:
        response = tab.goto(f"{server}/{page}", wait_until="load", timeout=30_000)
        assert response is not None and response.ok, f"{page}: HTTP {response.status if response else 'no response'}"
        redirect = re.search(r'http-equiv="Refresh" content="0; url=([^"]+)"', (SITE / page).read_text())
        if redirect:  # e.g. index.html -> intro.html: check the page it lands on
            tab.wait_for_url(f"**/{redirect.group(1)}", timeout=10_000)
            tab.wait_for_load_state("load")
        report = tab.evaluate(_CHECKS)
        tab.screenshot(path=str(SHOTS / (page.replace("/", "__").removesuffix(".html") + ".png")), full_page=True)
    finally:
        ctx.close()
    assert report["mainText"] > 0, f"{page}: empty page"
    assert not report["broken"], f"{page}: broken images {report['broken']}"
    assert not report["errors"], f"{page}: error output cells {report['errors']}"
    assert report["solutions"] >= report["exercises"], f"{page}: {report['exercises']} exercises but {report['solutions']} solutions"
    assert report["dropdowns"] == report["solutions"], f"{page}: a solution is not in a dropdown"
    if page.startswith("chapters/"):
        # Every chapter plots; a chapter page without a figure means the kernel drew to a non-inline backend.
        assert report["figures"] > 0, f"{page}: no figure in any cell output"
