"""The FL loop: accuracy rises on digits, pluggable aggregator and client step, reproducible."""

from __future__ import annotations

import pytest
import torch

from robustfl_lib import FLConfig, Mean, get_aggregator, run_federated, sgd_client_update


def test_fedavg_learns_digits(digits):
    result = run_federated(FLConfig(rounds=8, lr=0.3, progress=False), data=digits)
    acc = result.metric("clean_accuracy")
    assert len(result.history) == 8 and [h["round"] for h in result.history] == list(range(1, 9))
    assert acc[-1] > 0.85 and acc[-1] > acc[0] + 0.2


def test_same_seed_same_history(digits):
    cfg = dict(rounds=3, partition="dirichlet", alpha=0.3, clients_per_round=5, progress=False)
    a = run_federated(FLConfig(seed=1, **cfg), data=digits)
    b = run_federated(FLConfig(seed=1, **cfg), data=digits)
    assert a.history == b.history
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    c = run_federated(FLConfig(seed=2, **cfg), data=digits)
    assert c.history != a.history


def test_partial_participation(digits):
    r = run_federated(FLConfig(rounds=2, num_clients=10, clients_per_round=3, progress=False), data=digits)
    assert all(len(h["participants"]) == 3 for h in r.history)


def test_pluggable_aggregator_and_client_update(digits):
    seen = {}

    class Recorder(Mean):
        def aggregate(self, updates, weights):
            seen["shape"], seen["weights"] = updates.shape, weights.clone()
            return super().aggregate(updates, weights)

    calls = []

    def counting_update(model, x, y, config, generator):
        calls.append(len(x))
        sgd_client_update(model, x, y, config, generator)

    run_federated(FLConfig(rounds=1, num_clients=4, progress=False, aggregator=Recorder()), data=digits,
                  client_update=counting_update)
    assert seen["shape"][0] == 4 and sorted(seen["weights"].tolist()) == sorted(float(c) for c in calls)
    assert sum(calls) == len(digits.x_train)


def test_mean_weights_by_sample_count_and_rejects_nan():
    u = torch.tensor([[0.0, 0.0], [3.0, 6.0]])
    assert torch.allclose(Mean()(u, weights=torch.tensor([2.0, 1.0])), torch.tensor([1.0, 2.0]))
    assert torch.allclose(Mean()(u), torch.tensor([1.5, 3.0]))
    with pytest.raises(ValueError, match="non-finite update from client row"):
        Mean()(torch.tensor([[1.0, float("nan")], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        Mean()(torch.zeros(3))
    with pytest.raises(ValueError, match="weights must have shape"):
        Mean()(u, weights=torch.ones(3))
    with pytest.raises(ValueError, match="unknown aggregator"):
        get_aggregator("nope")


def test_bad_config_is_refused(digits):
    with pytest.raises(ValueError, match="clients_per_round"):
        run_federated(FLConfig(num_clients=3, clients_per_round=5), data=digits)
    with pytest.raises(ValueError, match="lr must be > 0"):
        run_federated(FLConfig(lr=0), data=digits)
