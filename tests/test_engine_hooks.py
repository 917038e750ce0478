"""The FL engine's hooks: optional keywords reach the objects that accept them (client ids, the global
model, the previous aggregate, a client's id in data poisoning), the attack schedule, per-round metrics,
optimising attacks built against the run's own rule, and the Flower path's refusal of client momentum."""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest
import torch

import robustfl_lib as rfl
from robustfl_lib import FLConfig, run_federated
from robustfl_lib.aggregators import Aggregator, Mean, Median
from robustfl_lib.backdoor import BackdoorPoisoning, PixelTrigger, attack_success_rate, backdoor_durability
from robustfl_lib.byzantine import LabelFlip
from robustfl_lib.federated import aggregate_round
from robustfl_lib.federated.hooks import accepts_keyword
from robustfl_lib.params import flatten_state

BASE = dict(rounds=3, num_clients=6, local_epochs=1, batch_size=32, progress=False)


class Recording(Aggregator):
    """The mean, recording every keyword the engine passes."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, updates, weights=None, client_ids=None, global_model=None):
        self.calls.append({"updates": updates.clone(), "client_ids": client_ids,
                           "global_model": None if global_model is None else global_model.clone()})
        return Mean()(updates)


class Plain(Aggregator):
    """The mean with the old protocol only: a TypeError here would mean an extra keyword reached it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, updates, weights=None):
        self.calls += 1
        return Mean()(updates, weights=weights)


def _flat(model):
    return flatten_state(model.state_dict())


# -- the helper
def test_accepts_keyword_by_name_kwargs_method_object_partial():
    def named(x, *, client_id): ...
    def kwargs(x, **kw): ...
    def neither(x, y=None): ...

    assert accepts_keyword(named, "client_id") and not accepts_keyword(named, "global_model")
    assert accepts_keyword(kwargs, "anything")
    assert not accepts_keyword(neither, "client_id") and accepts_keyword(neither, "y")
    assert accepts_keyword(Recording(), "client_ids") and not accepts_keyword(Plain(), "client_ids")
    assert accepts_keyword(Recording().__call__, "global_model")
    assert not accepts_keyword(Mean(), "client_ids")
    assert accepts_keyword(functools.partial(named, 1), "client_id")
    assert not accepts_keyword(functools.partial(neither, 1), "client_id")
    assert not accepts_keyword(len, "client_id")  # a builtin without a signature: the old protocol


# -- aggregators: client ids, global model, reference
def test_aggregate_round_passes_only_accepted_keywords():
    u = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    rec = Recording()
    g = torch.arange(5.0, dtype=torch.float64)
    step, _ = aggregate_round(rec, u, counts, np.array([7, 2, 9, 4]), global_model=g)
    assert rec.calls[0]["client_ids"] == [7, 2, 9, 4] and torch.equal(rec.calls[0]["global_model"], g)
    plain = Plain()
    step, _ = aggregate_round(plain, u, counts, np.array([7, 2, 9, 4]), global_model=g, reference=g)
    assert plain.calls == 1 and torch.equal(step, Mean()(u, weights=counts))


def test_engine_passes_client_ids_and_global_model_each_round(digits):
    rec = Recording()
    store = []
    result = run_federated(FLConfig(**BASE, clients_per_round=4, aggregator=rec), data=digits,
                           metrics={"snap": lambda m: store.append(_flat(m)) or 0.0})
    calls = result.aggregator.calls
    assert [c["client_ids"] for c in calls] == [h["participants"] for h in result.history]
    # The global model given in round r is the model after round r - 1; plus the step, the next one.
    for r in (1, 2):
        assert torch.equal(calls[r]["global_model"], store[r - 1])
    assert torch.allclose(calls[2]["global_model"] + calls[2]["updates"].mean(0), _flat(result.model),
                          atol=1e-6, rtol=0)
    assert rec.calls == []  # the run used its own copy


def test_object_without_hooks_is_called_as_before(digits):
    base = run_federated(FLConfig(**BASE, clients_per_round=4, aggregator="mean"), data=digits)
    plain = run_federated(FLConfig(**BASE, clients_per_round=4, aggregator=Plain()), data=digits)
    assert plain.aggregator.calls == 3
    assert torch.equal(_flat(base.model), _flat(plain.model))


# -- data poisoning: the client's id
class IdFlip(LabelFlip):
    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def poison(self, x, y, num_classes, client_id=None):
        self.seen.append(client_id)
        return super().poison(x, y, num_classes)


def test_poisoning_is_told_its_client_id(digits):
    result = run_federated(FLConfig(**BASE, byzantine_fraction=0.34, byzantine_attack=IdFlip()), data=digits)
    assert result.attack.seen == [c for h in result.history for c in h["byzantine"]]
    assert len(result.attack.seen) == 3 * 2 and None not in result.attack.seen
    flip = run_federated(FLConfig(**BASE, byzantine_fraction=0.34, byzantine_attack=LabelFlip()), data=digits)
    assert torch.equal(_flat(flip.model), _flat(result.model))  # the id changes nothing else


# -- a backdoor's rescale: the previous aggregate
class Rescaling(BackdoorPoisoning):
    def __init__(self):
        super().__init__(PixelTrigger(target=0), fraction=0.5, boost=2.0)
        self.previous: list = []

    def rescale(self, own, honest, previous_step=None):
        self.previous.append(None if previous_step is None else previous_step.clone())
        return own * self.boost


def test_rescale_gets_the_previous_aggregate(digits):
    store = []
    result = run_federated(FLConfig(**BASE, byzantine_fraction=0.34, byzantine_attack=Rescaling()), data=digits,
                           metrics={"snap": lambda m: store.append(_flat(m)) or 0.0})
    prev = result.attack.previous
    assert len(prev) == 3 and prev[0] is None
    assert torch.allclose(prev[2], store[1] - store[0], atol=1e-6, rtol=0)
    assert not torch.equal(prev[1], prev[2])
    boosted = run_federated(FLConfig(**BASE, byzantine_fraction=0.34,
                                     byzantine_attack=BackdoorPoisoning(PixelTrigger(target=0), 0.5, 2.0)), data=digits)
    assert torch.equal(_flat(boosted.model), _flat(result.model))  # boost * own, as _boost does without rescale


# -- the attack schedule
def test_attack_schedule_no_byzantine_rows_outside(digits):
    kw = dict(BASE, rounds=4, aggregator=Recording())
    sched = run_federated(FLConfig(**kw, byzantine_fraction=0.34, byzantine_attack="sign_flip", attack_rounds=(2, 3)),
                          data=digits)
    clean = run_federated(FLConfig(**kw), data=digits)
    assert [h["attacking"] for h in sched.history] == [False, True, True, False]
    assert [bool(h["byzantine"]) for h in sched.history] == [False, True, True, False]
    assert "attacking" not in clean.history[0]  # without a schedule the record is as before
    s, c = sched.aggregator.calls, clean.aggregator.calls
    assert torch.equal(s[0]["updates"], c[0]["updates"])  # round 1: every client trains honestly on clean data
    byz = np.isin(sched.history[1]["participants"], sched.byzantine)
    assert not torch.allclose(s[1]["updates"][byz], c[1]["updates"][byz])


def test_attack_schedule_with_data_poisoning_and_validation(digits):
    kw = dict(BASE, rounds=2, aggregator=Recording())
    sched = run_federated(FLConfig(**kw, byzantine_fraction=0.34, byzantine_attack="label_flip", attack_rounds=(2, 2)),
                          data=digits)
    clean = run_federated(FLConfig(**kw), data=digits)
    s, c = sched.aggregator.calls, clean.aggregator.calls
    assert torch.equal(s[0]["updates"], c[0]["updates"]) and not torch.equal(s[1]["updates"], c[1]["updates"])
    for bad in [(0, 2), (3, 2), (1,), (1.0, 2), "1-2", (True, 2)]:
        with pytest.raises(ValueError, match="attack_rounds"):
            FLConfig(attack_rounds=bad).validate()


def test_resume_compares_attack_rounds(digits, tmp_path):
    cfg = FLConfig(**BASE, byzantine_fraction=0.34, byzantine_attack="sign_flip", attack_rounds=(1, 2),
                   aggregator="median")
    run_federated(FLConfig(**{**cfg.__dict__, "rounds": 2}), data=digits, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="attack_rounds"):
        run_federated(FLConfig(**{**cfg.__dict__, "attack_rounds": (1, 3)}), data=digits, checkpoint_dir=tmp_path,
                      resume=True)
    resumed = run_federated(cfg, data=digits, checkpoint_dir=tmp_path, resume=True)
    full = run_federated(cfg, data=digits)
    assert resumed.history == full.history and torch.equal(_flat(resumed.model), _flat(full.model))


def test_durability_end_to_end(digits):
    trigger = PixelTrigger(target=0, size=3)
    x, y = digits.x_test, digits.y_test
    cfg = FLConfig(**{**BASE, "rounds": 5}, byzantine_fraction=0.34, attack_rounds=(1, 2),
                   byzantine_attack=BackdoorPoisoning(trigger, fraction=0.5, boost=3.0))
    result = run_federated(cfg, data=digits, metrics={"attack_success_rate": lambda m: attack_success_rate(m, x, y, trigger)})
    asr = [h["attack_success_rate"] for h in result.history]
    assert all(isinstance(a, float) for a in asr)
    assert asr[-1] == attack_success_rate(result.model, x, y, trigger)
    threshold = 0.5 * max(asr[:2]) + 0.5 * min(asr)
    expected = next((r - 2 for r in range(3, 6) if asr[r - 1] < threshold), float("inf"))
    assert backdoor_durability(result.history, stop_round=2, threshold=threshold) == expected


# -- metrics
def test_metrics_recorded_at_eval_rounds_and_checked(digits):
    modes = []

    def metric(model):
        modes.append(model.training)
        return torch.tensor(0.25)

    result = run_federated(FLConfig(**{**BASE, "rounds": 3}, eval_every=2), data=digits, metrics={"m": metric})
    assert [h["m"] for h in result.history] == [None, 0.25, 0.25] and modes == [False, False]
    assert result.model.training  # the mode is restored
    with pytest.raises(ValueError, match="clean_accuracy"):
        run_federated(FLConfig(**BASE), data=digits, metrics={"clean_accuracy": metric})
    with pytest.raises(TypeError, match="callable"):
        run_federated(FLConfig(**BASE), data=digits, metrics={"m": 3})
    with pytest.raises(TypeError, match="number"):
        run_federated(FLConfig(**{**BASE, "rounds": 1}), data=digits, metrics={"m": lambda m: "high"})


def test_run_grid_metrics_equal_run_federated(digits):
    cfgs = [FLConfig(**BASE, aggregator=a) for a in ("mean", "median")]
    metric = {"norm": lambda m: float(_flat(m).norm())}
    grid = rfl.run_grid(cfgs, data=digits, progress=False, metrics=metric)
    for cfg, g in zip(cfgs, grid):
        alone = run_federated(cfg, data=digits, metrics=metric)
        assert np.allclose([h["norm"] for h in g.history], [h["norm"] for h in alone.history], rtol=1e-5)


# -- optimising attacks against the run's own rule
def test_scale_search_gets_a_copy_of_the_runs_aggregator(digits):
    cfg = FLConfig(**{**BASE, "rounds": 1}, aggregator="median", byzantine_fraction=0.34, byzantine_attack="optimal_alie")
    result = run_federated(cfg, data=digits)
    assert isinstance(result.attack.aggregator, Median) and result.attack.aggregator is not result.aggregator
    assert result.attack.last_scale is not None
    given = run_federated(FLConfig(**{**cfg.__dict__, "attack_kwargs": {"aggregator": "mean", "f": 0}}), data=digits)
    assert type(given.attack.aggregator).__name__ == "Mean"  # an aggregator in attack_kwargs is kept


# -- Flower
@pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="Flower is not installed")
def test_flower_refuses_what_it_cannot_run():
    from robustfl_lib.flower import make_client_app, make_server_app, run_flower_simulation
    from robustfl_lib.flower.federation import check_flower_config

    for cfg, word in [(FLConfig(client_momentum=0.9), "client_momentum"),
                      (FLConfig(server_root_size=50, aggregator="fltrust"), "server_root_size")]:
        with pytest.raises(ValueError, match=word):
            run_flower_simulation(cfg)
        with pytest.raises(ValueError, match=word):
            make_server_app(cfg)
        with pytest.raises(ValueError, match=word):
            make_client_app(cfg)
    check_flower_config(FLConfig())  # the default runs


def test_dba_parts_follow_client_ids(digits):
    from robustfl_lib.backdoor import DBA

    result = run_federated(FLConfig(**{**BASE, "rounds": 1}, byzantine_fraction=0.34,
                                    byzantine_attack=DBA(PixelTrigger(size=2), boost=3.0, seed=1)), data=digits)
    # told each attacker's id, DBA gives the j-th attacker by id part j
    assert [result.attack.part_of(None, None, client_id=c) for c in result.byzantine] == [0, 1]


@pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="Flower is not installed")
def test_flower_strategy_passes_ids_and_global_weights_and_refuses_fltrust():
    from flwr.app import Message, MetricRecord, RecordDict  # noqa: F401
    from robustfl_lib.flower import RobustStrategy

    with pytest.raises(ValueError, match="server_root_size"):
        RobustStrategy(aggregator="fltrust")
    rec = Recording()
    strategy = RobustStrategy(aggregator=rec)
    assert strategy.aggregator is rec
    step, _ = aggregate_round(strategy.aggregator, torch.ones(2, 3), None, [5, 1], global_model=torch.zeros(3))
    assert rec.calls[-1]["client_ids"] == [5, 1]
