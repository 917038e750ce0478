"""What the two Byzantine reproductions share: the MNIST 8,000/2,000 split, the skip rule, the table."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import robustfl_lib as rfl

#: The shared MNIST folder, found the way ``benchmarks/certified.py`` finds it.
#: ``$ROBUSTFL_MNIST_DIR`` overrides it (a git worktree outside /work has no ``../shared``).
MNIST_DIR = Path(os.environ.get("ROBUSTFL_MNIST_DIR", Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"))

#: Exit status of a script that skipped because its data is absent (automake's "skipped"),
#: so a driver can tell "nothing to reproduce here" from a failure (1) or a usage error (2).
EXIT_SKIPPED = 77


def mnist_kwargs(root: Path) -> dict:
    """``load_dataset`` keywords of the 8,000/2,000 split (the t10k files, a fifth held out for test)."""
    return {"root": str(root), "files": "t10k", "test_fraction": 0.2}


def require_mnist(root: Path) -> None:
    """Exit with :data:`EXIT_SKIPPED` and a message naming the missing file if ``root`` lacks MNIST."""
    needed = root / "t10k-images-idx3-ubyte.gz"
    if not needed.exists():
        print(f"SKIPPED: MNIST not found ({needed} is missing); pass --data-root or place the t10k files there",
              file=sys.stderr)
        sys.exit(EXIT_SKIPPED)


def load_per_seed(root: Path, seeds) -> dict:
    """One seeded split per seed, so that lock-step runs at seed s share theirs."""
    return {s: rfl.load_dataset("mnist", seed=s, **mnist_kwargs(root)) for s in seeds}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
