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


# ---------------------------------------------------------------- Byzantine clients (chapter 03)

from robustfl_lib import FLConfig as _FLConfig  # noqa: E402
from robustfl_lib import Krum, LabelFlip, Median, byzantine_clients  # noqa: E402

BYZ = dict(num_clients=10, rounds=3, lr=0.3, progress=False)


def test_byzantine_clients_are_fixed_by_the_seed_and_recorded(digits):
    cfg = dict(BYZ, byzantine_fraction=0.2, byzantine_attack="sign_flip", aggregator="krum", clients_per_round=6)
    r = run_federated(_FLConfig(seed=3, **cfg), data=digits)
    assert r.byzantine == byzantine_clients(10, 2, 3).tolist() and len(r.byzantine) == 2
    assert r.byzantine == run_federated(_FLConfig(seed=3, **cfg), data=digits).byzantine
    clean = run_federated(_FLConfig(seed=3, **dict(BYZ, clients_per_round=6)), data=digits)
    for h, hc in zip(r.history, clean.history):
        assert h["participants"] == hc["participants"]  # Byzantine clients do not change who participates
        assert h["byzantine"] == [c for c in h["participants"] if c in r.byzantine]
        assert len(h["aggregation"]["selected"]) == 1 and h["aggregation"]["selected"][0] in h["participants"]


def test_f_is_derived_from_the_fraction_unless_given():
    assert _FLConfig(byzantine_fraction=0.2, byzantine_attack="alie").resolved_aggregator_f == 2
    assert _FLConfig(byzantine_fraction=0.3, byzantine_attack="alie", clients_per_round=5).resolved_aggregator_f == 1
    assert _FLConfig(byzantine_fraction=0.2, byzantine_attack="alie", aggregator_f=0).resolved_aggregator_f == 0
    assert _FLConfig(num_clients=15, byzantine_fraction=0.2, byzantine_attack="alie").num_byzantine == 3


def test_byzantine_config_is_validated(digits):
    with pytest.raises(ValueError, match="byzantine_attack is None"):
        run_federated(_FLConfig(byzantine_fraction=0.2), data=digits)
    with pytest.raises(ValueError, match=r"byzantine_fraction must be in \[0, 1\)"):
        run_federated(_FLConfig(byzantine_fraction=1.0, byzantine_attack="ipm"), data=digits)
    with pytest.raises(ValueError, match="unknown attack"):
        run_federated(_FLConfig(byzantine_fraction=0.2, byzantine_attack="flip"), data=digits)
    with pytest.raises(ValueError, match=r"n > 2f \+ 2"):  # refused before any training
        run_federated(_FLConfig(num_clients=10, aggregator="krum", aggregator_f=4), data=digits)


def test_krum_rejects_sign_flippers_that_sink_fedavg(digits):
    cfg = dict(BYZ, rounds=4, byzantine_fraction=0.3, byzantine_attack="sign_flip", attack_kwargs={"scale": 3.0})
    mean = run_federated(_FLConfig(aggregator="mean", **cfg), data=digits)
    krum = run_federated(_FLConfig(aggregator="krum", **cfg), data=digits)
    assert all(not set(h["aggregation"]["selected"]) & set(h["byzantine"]) for h in krum.history)
    assert krum.metric("clean_accuracy")[-1] > 0.6 > mean.metric("clean_accuracy")[-1]


def test_nonfinite_clients_stop_fedavg_but_not_the_median(digits):
    cfg = dict(BYZ, rounds=2, byzantine_fraction=0.2, byzantine_attack="nonfinite")
    with pytest.raises(ValueError, match="non-finite update"):
        run_federated(_FLConfig(aggregator="mean", **cfg), data=digits)
    r = run_federated(_FLConfig(aggregator=Median(), **cfg), data=digits)
    assert all(sorted(h["aggregation"]["dropped"]) == h["byzantine"] for h in r.history)
    assert all(len(h["aggregation"]["kept_fraction"]) == 10 for h in r.history)
    assert torch.isfinite(torch.cat([p.flatten() for p in r.model.parameters()])).all()


def test_label_flip_poisons_training_and_update_attacks_skip_it(digits):
    seen = []

    def recording_update(model, x, y, config, generator):
        seen.append(y.clone())
        sgd_client_update(model, x, y, config, generator)

    cfg = dict(BYZ, rounds=1, byzantine_fraction=0.2, seed=0)
    r = run_federated(_FLConfig(byzantine_attack=LabelFlip(), **cfg), data=digits, client_update=recording_update)
    assert len(seen) == 10  # Byzantine clients train, on flipped labels
    parts = __import__("robustfl_lib").partition(digits.y_train, 10, "iid", alpha=0.5, seed=0)
    for cid, y in zip(r.history[0]["participants"], seen):
        truth = digits.y_train[parts[cid]]
        assert torch.equal(y, 9 - truth if cid in r.byzantine else truth)
    seen.clear()
    run_federated(_FLConfig(byzantine_attack="ipm", **cfg), data=digits, client_update=recording_update)
    assert len(seen) == 8  # forged updates need no training


def test_byzantine_runs_are_reproducible(digits):
    cfg = dict(BYZ, rounds=2, byzantine_fraction=0.2, byzantine_attack="gaussian", aggregator=Krum(2), seed=4)
    a = run_federated(_FLConfig(**cfg), data=digits)
    b = run_federated(_FLConfig(**cfg), data=digits)
    assert a.history == b.history
    c = run_federated(_FLConfig(**dict(cfg, seed=5)), data=digits)
    assert a.history != c.history


# ---------------------------------------------------------------- the chapters' experiment grid (03-08)

import math  # noqa: E402

from robustfl_lib import (  # noqa: E402
    RunFailure,
    accuracy_table,
    byzantine_selection_rate,
    final_accuracy,
    kept_share,
    run_attacks,
    toy_updates,
)


def test_run_attacks_records_failures_and_equals_single_runs(digits):
    cfg = _FLConfig(num_clients=6, rounds=2, lr=0.3, aggregator="mean", byzantine_fraction=0.2, progress=False)
    runs = run_attacks(cfg, attacks=["nonfinite", "sign_flip"], data=digits)
    assert list(runs) == ["none", "nonfinite", "sign_flip"]
    assert isinstance(runs["nonfinite"], RunFailure) and runs["nonfinite"].kind == "refused"
    assert runs["nonfinite"].history == [] and "non-finite" in runs["nonfinite"].error
    single = run_federated(_FLConfig(**{**vars(cfg), "byzantine_attack": "sign_flip"}), data=digits)
    assert runs["sign_flip"].history == single.history
    assert runs["none"].byzantine == [] and runs["sign_flip"].byzantine == single.byzantine
    assert math.isnan(final_accuracy(runs["nonfinite"]))
    assert final_accuracy(single, last=1) == single.history[-1]["clean_accuracy"]
    table = accuracy_table({"mean": runs})
    assert "| mean |" in table and "refused" in table


def test_batched_attack_grid_matches_one_run_at_a_time(digits):
    cfg = _FLConfig(num_clients=6, rounds=2, lr=0.3, aggregator="median", byzantine_fraction=0.2, progress=False)
    runs = run_attacks(cfg, attacks=["alie", "gaussian"], data=digits)  # no failure: trained in lock step
    for name in ("alie", "gaussian"):
        single = run_federated(_FLConfig(**{**vars(cfg), "byzantine_attack": name}), data=digits)
        assert [h["participants"] for h in runs[name].history] == [h["participants"] for h in single.history]
        assert abs(final_accuracy(runs[name]) - final_accuracy(single)) < 0.02
    byz, honest = kept_share(runs["gaussian"])
    assert byz < 0.01 < honest  # noise is never the median
    with pytest.raises(ValueError, match="no selection"):
        byzantine_selection_rate(runs["alie"])


def test_toy_updates():
    honest, byz = toy_updates(12, 3, "ipm", seed=1)
    assert honest.shape == (12, 2) and torch.allclose(byz, -0.5 * honest.mean(0).expand(3, -1))
    assert toy_updates(5, 2, None)[1].shape == (0, 2)
    with pytest.raises(ValueError, match="no 2-D picture"):
        toy_updates(5, 2, "label_flip")


def test_run_attacks_over_seeds_pairs_every_attack_with_the_baseline(digits):
    from robustfl_lib import FLConfig
    from robustfl_lib.experiments import attack_configs, run_attacks

    cfg = FLConfig(rounds=2, num_clients=5, local_epochs=1, aggregator="median", byzantine_fraction=0.2,
                   progress=False)
    configs = attack_configs(cfg, ["sign_flip", "nonfinite"])
    assert list(configs) == ["none", "sign_flip", "nonfinite"]
    assert configs["none"].byzantine_fraction == 0 and configs["none"].aggregator_f == 1
    runs = run_attacks(cfg, ["sign_flip", "nonfinite"], seeds=[3, 4])
    assert list(runs) == ["none", "sign_flip", "nonfinite"]
    assert [[r.config.seed for r in v] for v in runs.values()] == [[3, 4]] * 3
    assert all(r.config.byzantine_attack == name for name, v in runs.items() if name != "none" for r in v)
