"""Formulas typeset with no network, on every page of the site.

MathJax 3 comes from the ``sphinx-mathjax-offline`` package (the book extra): that extension
copies its files into the site's ``_static/mathjax`` when the build finishes, and
``mathjax_path`` in ``_config.yml`` points the pages there instead of at a CDN.

Two things this extension adds:

* Sphinx puts MathJax only on pages whose body holds an equation, but the sidebar of every
  page lists the chapter titles, and a title may hold math (chapter 19's
  :math:`\\ell_\\infty`): without MathJax that page shows it as raw ``\\(\\ell_\\infty\\)``.
  So MathJax is loaded on every page (Sphinx's "always" assets policy).
* A build that produced pages without the MathJax files they load fails with a message
  that says so, rather than publishing a site whose formulas are raw TeX.

tests/test_site.py checks the result in a browser that refuses every non-local request.
"""

from __future__ import annotations

import re
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError


def _check_copied(app: Sphinx, exc: Exception | None) -> None:
    if exc is not None or app.builder.format != "html":
        return
    path = app.config.mathjax_path
    if re.match(r"^(https?:)?//", path):
        raise ExtensionError(f"mathjax_path is a URL ({path}): the site would need the network to show formulas")
    script = Path(app.outdir) / "_static" / path
    if not script.is_file():
        raise ExtensionError(f"the pages load MathJax from _static/{path}, but the build did not copy it there "
                             "(is sphinx-mathjax-offline installed and listed in extra_extensions?)")


def setup(app: Sphinx) -> dict:
    app.set_html_assets_policy("always")
    # After sphinx-mathjax-offline's own build-finished handler (default priority 500) has copied the files.
    app.connect("build-finished", _check_copied, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
