"""Shared fixtures: the real MNIST files when present, small seeded tensors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared/data/mnist beside the checkout holds the official MNIST test files; tests skip without it.
MNIST_DIR = Path(os.environ.get("ROBUSTFL_MNIST_DIR", REPO.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST test files not found in {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="session")
def digits():
    from robustfl_lib import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one CPU thread is fastest, and on a busy machine a second one costs ten times more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def flower_task_identity():
    """Messages made outside a Flower run need the identity a SuperLink would give them (the
    Flower test modules use this fixture for every test)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
