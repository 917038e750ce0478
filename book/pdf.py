"""Print the built site to one PDF, offline, with the local Chromium (no LaTeX needed).

    python tasks.py pdf                        # book/_build/html -> book/_build/pdf/robustfl.pdf
    python book/pdf.py --chapters 04 05        # only these chapters (an instructor prints one)
    python book/pdf.py --solutions             # the exercises' solution dropdowns printed open
    python book/pdf.py --site DIR --toc FILE   # another build's html folder and its _toc.yml

How: the site is served from 127.0.0.1 and every other request is refused, as in the browser
check (tests/test_site.py). One page of the site is opened; its article is replaced by the
articles of every page in book/_toc.yml's order (each starting a new sheet, its links and
images resolved against its own address), the site's own MathJax typesets the whole, and
Chromium prints it once. One document rather than one PDF per page merged afterwards: the
page numbers run through the book, the headings become the PDF's outline, and no PDF library
is needed. A formula MathJax did not typeset or an image that did not load fails the run.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

BOOK = Path(__file__).resolve().parent
SITE = BOOK / "_build" / "html"
OUT = BOOK / "_build" / "pdf" / "robustfl.pdf"


class PDFError(RuntimeError):
    """The PDF cannot be made: no built site, a page the table of contents names is missing, no Chromium."""


def toc_pages(toc: Path = BOOK / "_toc.yml") -> list[str]:
    """The book's pages in reading order (root first), as paths without suffix (``chapters/04_median``)."""
    import yaml

    data = yaml.safe_load(toc.read_text()) or {}
    if "root" not in data:
        raise PDFError(f"{toc}: no 'root' entry")
    pages = [data["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                pages.append(str(entry["file"]).removesuffix(".md"))
            walk(entry.get("sections"))

    for part in data.get("parts") or [{"chapters": data.get("chapters")}]:
        walk(part.get("chapters"))
    return pages


def select(pages: list[str], chapters: list[str] | None) -> list[str]:
    """``pages`` restricted to ``chapters`` (numbers like ``4``/``04`` or file stems); all when None."""
    if not chapters:
        return pages
    chosen = []
    for want in chapters:
        stem = want.removesuffix(".md").removesuffix(".html")
        match = [p for p in pages if Path(p).name == stem
                 or (stem.isdigit() and re.match(rf"{int(stem):02d}_", Path(p).name))]
        if not match:
            numbered = ", ".join(Path(p).name[:2] for p in pages if re.match(r"\d\d_", Path(p).name))
            raise PDFError(f"no chapter {want!r} in the table of contents "
                           + (f"(chapters: {numbered})" if numbered else "(it lists no numbered chapter)"))
        chosen += [p for p in match if p not in chosen]
    return [p for p in pages if p in chosen]  # reading order, whatever order they were asked in


def check_site(site: Path, pages: list[str]) -> None:
    if not (site / "index.html").exists():
        raise PDFError(f"no built site in {site}: run `python tasks.py book` first (or pass --site DIR)")
    missing = [p for p in pages if not (site / f"{p}.html").exists()]
    if missing:
        raise PDFError(f"the site in {site} lacks pages the table of contents names: {missing} "
                       "(rebuild it with `python tasks.py book`)")


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise PDFError("Chromium not found (Debian/Ubuntu: apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    return found


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# Runs in the first page: fetch every page, take its <article>, make its relative addresses
# absolute (pages sit at different depths: intro.html, chapters/04_median.html), and put them
# one after another in place of the first page's article. Then typeset and wait for images.
_ASSEMBLE = r"""async ({urls, solutions}) => {
  const target = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  target.innerHTML = '';
  const lacking = [];
  for (const url of urls) {
    const html = await (await fetch(url)).text();
    const doc = new DOMParser().parseFromString(html, 'text/html');
    const article = doc.querySelector('article.bd-article') || doc.querySelector('main') || doc.body;
    if (!article) { lacking.push(url); continue; }
    for (const el of article.querySelectorAll('[src], [href]')) {
      for (const attr of ['src', 'href']) {
        const v = el.getAttribute(attr);
        if (v !== null && !v.startsWith('data:')) el.setAttribute(attr, new URL(v, url).href);
      }
    }
    const section = document.createElement('section');
    section.className = 'robustfl-print-page';
    section.append(...article.childNodes);
    target.append(section);
  }
  if (solutions) {
    target.querySelectorAll('details').forEach(d => d.open = true);
    target.querySelectorAll('.toggle-hidden').forEach(e => e.classList.remove('toggle-hidden'));
  }
  const style = document.createElement('style');
  style.textContent = `
    .robustfl-print-page + .robustfl-print-page { break-before: page; }
    .bd-header, .bd-header-article, .header-article, .bd-sidebar-primary, .bd-sidebar-secondary,
    .prev-next-area, .bd-footer, .bd-footer-content, footer, .toggle-button, #pst-back-to-top { display: none !important; }
    .bd-main .bd-content .bd-article-container { max-width: 100% !important; }
    img { break-inside: avoid; max-width: 100% !important; }
    /* A long code cell kept whole leaves an empty box at the foot of a sheet; Chromium never splits
       a scrolling box, so the code boxes stop scrolling (long lines wrap instead) and run on. */
    pre, div.highlight, div[class*="highlight-"], div.cell, div.cell_input, div.cell_output, div.output {
      break-inside: auto !important; overflow: visible !important; max-height: none !important; }
    /* The theme lays code boxes out as flex rows, which Chromium does not split across sheets either. */
    div.highlight, div.cell_input, div[class*="highlight-"] { display: block !important; }
    div.highlight pre { white-space: pre-wrap; }`;
  document.head.append(style);
  let typeset = 'no formulas';
  if (target.querySelector('.math')) {
    for (let i = 0; i < 300 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++) {
      await new Promise(r => setTimeout(r, 100));
    }
    if (!(window.MathJax && MathJax.typesetPromise)) return {error: 'MathJax did not start on ' + location.href};
    await MathJax.startup.promise;
    MathJax.typesetClear();
    await MathJax.typesetPromise([target]);
    typeset = 'typeset';
  }
  await Promise.all([...target.querySelectorAll('img')].map(i => i.complete ? null
    : new Promise(r => { i.onload = r; i.onerror = r; })));
  const untypeset = [...target.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container'))
    .map(e => e.textContent.trim().slice(0, 80));
  const broken = [...target.querySelectorAll('img')].filter(i => i.naturalWidth === 0).map(i => i.src);
  return {typeset, untypeset, broken, lacking, formulas: target.querySelectorAll('.math').length,
          images: target.querySelectorAll('img').length};
}"""

_FOOTER = ('<div style="font-size:8px; width:100%; text-align:center; color:#555;">'
           '{title} &middot; <span class="pageNumber"></span> / <span class="totalPages"></span></div>')


def book_title(config: Path = BOOK / "_config.yml") -> str:
    """The book's title for the footer (book/_config.yml), HTML-escaped."""
    import html

    import yaml

    try:
        title = (yaml.safe_load(config.read_text()) or {}).get("title")
    except OSError:
        title = None
    return html.escape(str(title or "robustfl"))


def page_count(pdf: bytes) -> int:
    """Pages of a PDF as Chromium writes it: the ``/Count`` of its root page tree (the largest one)."""
    counts = [int(c) for c in re.findall(rb"/Type\s*/Pages\b[^>]*?/Count\s+(\d+)", pdf)]
    counts += [int(c) for c in re.findall(rb"/Count\s+(\d+)[^>]*?/Type\s*/Pages\b", pdf)]
    if not counts:
        raise PDFError("no page tree found in the PDF Chromium wrote")
    return max(counts)


def print_pdf(site: Path = SITE, out: Path = OUT, chapters: list[str] | None = None, solutions: bool = False,
              toc: Path = BOOK / "_toc.yml") -> dict:
    """Print the site's pages (toc order, or ``chapters``) to ``out``; a report (pages, seconds, ...)."""
    start = time.perf_counter()
    site = Path(site).resolve()
    pages = select(toc_pages(toc), chapters)
    check_site(site, pages)
    browser_path = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise PDFError("the playwright package is not installed (pip install -e .[dev])") from exc

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = f"http://127.0.0.1:{httpd.server_address[1]}"
    refused: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync", "--disable-quic"])
            try:
                ctx = browser.new_context()
                # Offline by construction: what the site does not serve is refused, never fetched.
                ctx.route("**/*", lambda r: r.continue_() if r.request.url.startswith(server)
                          else (refused.append(r.request.url), r.abort()))
                tab = ctx.new_page()
                tab.goto(f"{server}/{pages[0]}.html", wait_until="load", timeout=60_000)
                report = tab.evaluate(_ASSEMBLE, {"urls": [f"{server}/{p}.html" for p in pages],
                                                  "solutions": solutions})
                if report.get("error"):
                    raise PDFError(report["error"])
                problems = {k: report[k] for k in ("untypeset", "broken", "lacking") if report[k]}
                if problems:
                    raise PDFError(f"not printed: {problems}")
                out = Path(out)
                out.parent.mkdir(parents=True, exist_ok=True)
                tab.emulate_media(media="print")
                options = dict(format="A4", print_background=True, display_header_footer=True,
                               header_template="<div></div>", footer_template=_FOOTER.format(title=book_title()),
                               margin={"top": "14mm", "bottom": "16mm", "left": "12mm", "right": "12mm"})
                try:  # the outline (bookmarks) and tags need playwright 1.42; the project admits 1.40
                    data = tab.pdf(**options, outline=True, tagged=True)
                except TypeError:
                    data = tab.pdf(**options)
                out.write_bytes(data)
            finally:
                browser.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    return {"out": str(out), "pages": page_count(data), "site_pages": len(pages), "formulas": report["formulas"],
            "images": report["images"], "refused": len(refused), "bytes": len(data),
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", type=Path, default=SITE, help=f"the built html folder (default {SITE})")
    parser.add_argument("--out", type=Path, default=OUT, help=f"the PDF to write (default {OUT})")
    parser.add_argument("--toc", type=Path, default=BOOK / "_toc.yml",
                        help="the table of contents giving the pages and their order (default book/_toc.yml)")
    parser.add_argument("--chapters", nargs="+", help="only these chapters, by number (04) or file stem")
    parser.add_argument("--solutions", action="store_true", help="print the exercises' solutions open")
    args = parser.parse_args(argv)
    try:
        r = print_pdf(args.site, args.out, args.chapters, args.solutions, args.toc)
    except PDFError as exc:
        print(f"[book/pdf.py] error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"[book/pdf.py] {r['out']}: {r['pages']} PDF pages from {r['site_pages']} site pages "
          f"({r['formulas']} formulas typeset, {r['images']} images, {r['bytes'] / 1e6:.1f} MB, "
          f"{r['refused']} non-local requests refused) in {r['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
