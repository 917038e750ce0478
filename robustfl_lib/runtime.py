"""Reproducibility and device selection.

Every chapter starts with :func:`set_seed` and :func:`get_device`
(chapter ``00_introduction``).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["set_seed", "get_device", "make_generator", "base_seed", "derive_seeds", "SEED_VARIABLE"]

#: The environment variable every chapter reads its base seed from (default 0).
SEED_VARIABLE = "ROBUSTFL_SEED"


def set_seed(seed: int = 0, deterministic: bool = True) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every CUDA device).

    With ``deterministic=True`` and CUDA present, PyTorch is asked for
    deterministic kernels where they exist (``warn_only`` so that a GPU op
    without a deterministic variant still runs), which is what "same seed, same
    machine, same numbers" needs on CUDA. CPU kernels are deterministic already,
    and the switch costs seconds on first use (it imports TorchInductor's
    configuration), so a CPU-only machine skips it.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic and torch.cuda.is_available():
        # cuBLAS needs this set before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``device`` if given, else CUDA when present, else CPU.

    Asking for CUDA on a machine without it raises a ``RuntimeError`` that
    says so, rather than failing later inside a kernel.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(dev)!r} requested but CUDA is not available on this machine")
    return dev


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``seed``, for randomness that must not
    depend on (or disturb) the global RNG state."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


def base_seed(default: int = 0) -> int:
    """The chapter's base seed: ``$ROBUSTFL_SEED`` if set, else ``default``.

    Every chapter derives all its seeds (data split, model init, clients,
    attacks, PGD starts) from this one number, so ``ROBUSTFL_SEED=7 jupyter
    nbconvert --execute ...`` re-runs a whole chapter on other randomness and
    its asserts must still hold (the evidence standard of the book's
    introduction). A value that is not a non-negative integer raises
    ``ValueError`` naming the variable.
    """
    raw = os.environ.get(SEED_VARIABLE)
    if raw is None or raw.strip() == "":
        return int(default)
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{SEED_VARIABLE} must be a non-negative integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{SEED_VARIABLE} must be a non-negative integer, got {raw!r}")
    return value


def derive_seeds(base: int, k: int, stream: int = 0) -> list[int]:
    """``k`` distinct seeds derived from ``base`` (and an optional ``stream`` number, so
    that two experiments of one chapter get unrelated seeds).

    Drawn from NumPy's ``SeedSequence([base, stream])``: distinct base seeds give
    unrelated seed lists, and the same ``(base, stream, k)`` always gives the same
    list; each is below ``2**31`` so it suits every seeded API in the library.
    """
    if isinstance(base, bool) or not isinstance(base, (int, np.integer)) or base < 0:
        raise ValueError(f"base must be a non-negative integer, got {base!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (how many seeds) must be an integer >= 1, got {k!r}")
    seq = np.random.SeedSequence([int(base), int(stream)])
    seeds: list[int] = []
    words = seq.generate_state(2 * k + 8, dtype=np.uint32)
    for w in words:
        s = int(w) % (2**31 - 1)
        if s not in seeds:
            seeds.append(s)
        if len(seeds) == k:
            break
    if len(seeds) < k:  # astronomically unlikely collisions: extend deterministically
        seeds += [max(seeds) + 1 + i for i in range(k - len(seeds))]
    return seeds
