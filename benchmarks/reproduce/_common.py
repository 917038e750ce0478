"""What the two Byzantine reproductions share: the MNIST 8,000/2,000 split, the skip rule, the table."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

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


def parse_args(doc: str, sizes, json_help: str, argv=None) -> argparse.Namespace:
    """The options both scripts take; refuses one seed (no interval), skips without MNIST, pins one thread."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(sizes), default="cpu")
    p.add_argument("--seeds", type=int, default=3, help="number of lock-step seeds (>= 2; 3 at CPU size)")
    p.add_argument("--base-seed", type=int, default=int(os.environ.get("ROBUSTFL_SEED", 0)))
    p.add_argument("--data-root", type=Path, default=MNIST_DIR)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help=json_help)
    a = p.parse_args(argv)
    if a.seeds < 2:
        p.error(f"--seeds must be >= 2 for an interval, got {a.seeds}")
    require_mnist(a.data_root)
    torch.set_num_threads(1)
    return a
