#!/usr/bin/env python3
"""The project's two commands, for a fresh clone with nothing but Python 3.10+.

    python tasks.py test   # set up .venv, build the site, run the unit tests, every chapter
                           # under nbval, and a headless-Chromium check of every page
    python tasks.py book   # set up .venv, execute every chapter and build the site

Both create (or reuse) the virtual environment ``.venv`` and install the
package with its extras. The torch requirement is pinned to the CPU build
(``torch==2.13.0``) unless ``ROBUSTFL_TORCH`` says otherwise, e.g.
``ROBUSTFL_TORCH="torch" python tasks.py test`` for your platform's default
(CUDA) build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
TORCH = os.environ.get("ROBUSTFL_TORCH", "torch==2.13.0")
EXTRAS = "book,dev,flower"


def sh(*cmd: str | Path, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def setup() -> None:
    """Create .venv and install the package; skipped when nothing it depends on changed."""
    if not PY.exists():
        sh(sys.executable, "-m", "venv", VENV)
    stamp = VENV / ".robustfl-installed"
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode() + EXTRAS.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == key:
        return
    pip = [PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    sh(*pip, TORCH)
    sh(*pip, "-e", f".[{EXTRAS}]")
    stamp.write_text(key)


def notebooks_to_ipynb(dest: Path) -> list[Path]:
    """Convert every chapter (MyST .md) to .ipynb in ``dest``; the .md files stay the only source."""
    sources = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.md"))
    out = []
    for src in sources:
        target = dest / (src.stem + ".ipynb")
        sh(BIN / "jupytext", "--quiet", "--to", "ipynb", "-o", target, src)
        out.append(target)
    return out


def ensure_chromium() -> None:
    """The browser check needs Chromium; on CI (root, Debian) install it, elsewhere say how."""
    if shutil.which("chromium") or shutil.which("chromium-browser") or os.environ.get("CHROMIUM"):
        return
    if os.environ.get("CI") and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        sh("apt-get", "install", "-y", "-q", "chromium", stdout=subprocess.DEVNULL)
    else:
        print("note: Chromium not found; the browser check of the site will be skipped "
              "(Debian/Ubuntu: sudo apt-get install chromium)", flush=True)


def build_book(args: list[str]) -> int:
    """Execute every chapter (cached) and build the site; -W -n: any warning fails the build."""
    cmd = [BIN / "jupyter-book", "build", "book", "-W", "-n", "--keep-going", *args]
    print("+", " ".join(map(str, cmd)), flush=True)
    start = time.perf_counter()
    rc = subprocess.run([str(c) for c in cmd], cwd=ROOT).returncode
    print(f"[tasks.py] the book build took {time.perf_counter() - start:.0f} s", flush=True)
    return rc


def test(args: list[str]) -> int:
    """Unit tests, every chapter under nbval, and a browser check of the freshly built site."""
    setup()
    ensure_chromium()
    rc_book = build_book([])
    with tempfile.TemporaryDirectory(prefix="robustfl-nb-") as tmp:
        nbs = notebooks_to_ipynb(Path(tmp))
        env = dict(os.environ, ROBUSTFL_REQUIRE_SITE="1" if os.environ.get("CI") else "0")
        cmd = [PY, "-m", "pytest", "tests", *nbs, "--nbval-lax", "--nbval-current-env",
               "--nbval-cell-timeout=900", "-p", "no:cacheprovider", *args]
        print("+", " ".join(map(str, cmd)), flush=True)
        rc_tests = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode
    if rc_book != 0:
        print("FAILED: the book build (jupyter-book build book -W -n) failed; see its errors above", flush=True)
    return rc_tests or rc_book


def book(args: list[str]) -> int:
    setup()
    rc = build_book(args)
    if rc == 0:
        print(f"\nThe site is at {ROOT / 'book' / '_build' / 'html' / 'index.html'} (open it in a browser).")
    return rc


def main(argv: list[str]) -> int:
    commands = {"test": test, "book": book}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    start = time.perf_counter()
    rc = commands[argv[0]](argv[1:])
    print(f"[tasks.py {argv[0]}] finished in {time.perf_counter() - start:.0f} s with exit code {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
