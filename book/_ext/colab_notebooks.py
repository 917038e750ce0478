"""Point each chapter's Colab button at a real notebook.

Colab opens ``.ipynb`` files only, and the chapters' source is MyST markdown. The
build already writes each executed chapter as ``_sources/<page>.ipynb`` in the site
(the download button serves it); this extension rewrites the theme's Colab link to
that generated notebook on the branch the site is published from
(``colab_branch``, default ``gh-pages``), so "Launch on Colab" opens a notebook
generated from the MyST source.
"""

from __future__ import annotations

from sphinx.application import Sphinx


def _rewrite(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    if not context.get("ipynb_source"):
        return
    repo = app.config.html_theme_options.get("repository_url", "").rstrip("/")
    if not repo.startswith("https://github.com/"):
        return
    org_repo = repo[len("https://github.com/") :]
    url = (
        f"https://colab.research.google.com/github/{org_repo}/blob/"
        f"{app.config.colab_branch}/_sources/{context['ipynb_source']}"
    )
    for group in context.get("header_buttons", []):
        for button in group.get("buttons", []) if isinstance(group, dict) else []:
            if button.get("text") == "Colab":
                button["url"] = url


def setup(app: Sphinx) -> dict:
    app.add_config_value("colab_branch", "gh-pages", "html")
    # After sphinx-book-theme adds its launch buttons (priority 501).
    app.connect("html-page-context", _rewrite, priority=502)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
