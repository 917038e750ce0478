"""Reproducibility and device selection.

Every chapter starts with :func:`set_seed` and :func:`get_device`
(chapter ``00_introduction``).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["set_seed", "get_device", "make_generator"]


def set_seed(seed: int = 0, deterministic: bool = True) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every CUDA device).

    With ``deterministic=True`` PyTorch is asked for deterministic kernels
    where they exist (``warn_only`` so that a GPU op without a deterministic
    variant still runs), which is what "same seed, same machine, same numbers"
    needs on CUDA.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
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
