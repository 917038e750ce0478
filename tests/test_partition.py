"""Partitions: coverage, determinism, no empty client, Dirichlet skew grows as alpha shrinks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustfl_lib import label_counts, label_skew, partition


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 400),
    num_clients=st.integers(1, 20),
    num_classes=st.integers(2, 10),
    scheme=st.sampled_from(["iid", "dirichlet", "shards"]),
    alpha=st.floats(0.3, 10.0),
    seed=st.integers(0, 2**31),
)
def test_every_index_exactly_once_and_deterministic(n, num_clients, num_classes, scheme, alpha, seed):
    labels = torch.from_numpy(np.random.default_rng(seed).integers(0, num_classes, n))
    if scheme == "shards" and 2 * num_clients > n:
        return
    try:
        parts = partition(labels, num_clients, scheme, alpha=alpha, seed=seed)
    except ValueError as err:
        # The documented way out when Dirichlet draws keep leaving a client empty.
        assert scheme == "dirichlet" and "fewer than 1 sample" in str(err)
        assert n < 40 * num_clients
        return
    assert len(parts) == num_clients
    assert all(len(p) >= 1 for p in parts)
    everything = torch.cat(parts).sort().values
    assert torch.equal(everything, torch.arange(n))
    again = partition(labels, num_clients, scheme, alpha=alpha, seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_skew_grows_as_alpha_shrinks(digits):
    y = digits.y_train
    skews = {a: np.mean([label_skew(y, partition(y, 10, "dirichlet", alpha=a, seed=s)) for s in range(3)])
             for a in (0.05, 0.3, 1.0, 100.0)}
    alphas = sorted(skews)
    assert all(skews[a] > skews[b] for a, b in zip(alphas, alphas[1:])), skews
    assert label_skew(y, partition(y, 10, "iid", seed=0)) < 0.1


def test_shards_give_few_classes(digits):
    counts = label_counts(digits.y_train, partition(digits.y_train, 10, "shards", shards_per_client=2, seed=0))
    assert ((counts > 0).sum(axis=1) <= 4).all()


def test_clear_errors():
    y = torch.arange(10) % 2
    with pytest.raises(ValueError, match="num_clients"):
        partition(y, 0)
    with pytest.raises(ValueError, match="at least 1 sample"):
        partition(y, 11)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(y, 2, "zipf")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition(y, 2, "dirichlet", alpha=0)
    with pytest.raises(ValueError, match="fewer than 4"):
        partition(torch.zeros(40, dtype=torch.long), 10, "dirichlet", alpha=0.01, min_size=4, max_tries=3)
    with pytest.raises(ValueError, match="1-D"):
        partition(torch.zeros(4, 2, dtype=torch.long), 2)
