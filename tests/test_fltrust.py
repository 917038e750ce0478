"""FLTrust (Cao et al. 2021): trust scores and output against a float64 formula written out per row, the
cases the paper's design rests on, bad input, and the FL loop's server data (root samples held out of the
clients' data, the server's update, resume, run_grid)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import robustfl_lib as rfl
from robustfl_lib import FLConfig, run_federated
from robustfl_lib.aggregators import FLTrust, get_aggregator
from robustfl_lib.federated import aggregate_round, sgd_client_update
from robustfl_lib.federated.simulation import _server_generator, root_indices
from robustfl_lib.models import build_model
from robustfl_lib.params import flatten_state

BASE = dict(rounds=3, num_clients=6, local_epochs=1, batch_size=32, progress=False)


def _reference_formula(updates, g0):
    """sum_i ReLU(cos(g_i, g0)) (||g0|| / ||g_i||) g_i / sum_i ReLU(cos), row by row in float64."""
    g0 = [float(v) for v in g0.double()]
    n0 = math.sqrt(sum(v * v for v in g0))
    trust, scaled = [], []
    for row in updates.double():
        r = [float(v) for v in row]
        ni = math.sqrt(sum(v * v for v in r))
        cos = sum(a * b for a, b in zip(r, g0)) / (ni * n0)
        trust.append(max(cos, 0.0))
        scaled.append([n0 / ni * v for v in r])
    total = sum(trust)
    out = [sum(t * s[j] for t, s in zip(trust, scaled)) / total for j in range(len(g0))]
    return torch.tensor(trust, dtype=torch.float64), torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trust_and_output_match_the_formula(dtype):
    gen = torch.Generator().manual_seed(3)
    g0 = torch.randn(30, generator=gen, dtype=torch.float64)
    # honest-ish rows near g0, some pointing away, different norms
    updates = torch.stack([g0 * s + torch.randn(30, generator=gen, dtype=torch.float64) * 0.8
                           for s in (1.0, 0.3, 2.0, -1.0, 5.0, -0.2)]).to(dtype)
    rule = FLTrust()
    out = rule(updates, reference=g0.to(dtype))
    trust, expected = _reference_formula(updates, g0.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert out.dtype == dtype
    assert torch.allclose(rule.last_info["trust"], trust, atol=tol, rtol=0)
    assert torch.allclose(out.double(), expected, atol=tol * 10, rtol=tol)
    assert (trust[3] == 0) and 3 not in rule.last_info["selected"].tolist()
    w = rule.last_info["weights"]  # output = sum_i w_i g_i
    assert torch.allclose(w @ updates.double(), out.double(), atol=tol * 10, rtol=tol)


def test_negative_cosine_attacker_gets_weight_zero():
    g0 = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    honest = torch.tensor([[1.1, 1.9, -0.8, 0.4], [0.9, 2.2, -1.1, 0.7]], dtype=torch.float64)
    attacker = -50.0 * g0 + torch.tensor([0.0, 0.1, 0.0, 0.0], dtype=torch.float64)
    rule = FLTrust()
    out = rule(torch.cat([honest, attacker[None]]), reference=g0)
    assert rule.last_info["trust"][2] == 0 and rule.last_info["weights"][2] == 0
    assert torch.allclose(out, FLTrust()(honest, reference=g0), atol=1e-15, rtol=0)


def test_scaled_copy_of_reference_gets_full_trust_and_its_norm():
    g0 = torch.tensor([3.0, -4.0, 0.0, 12.0], dtype=torch.float64)  # norm 13
    rule = FLTrust()
    out = rule((1e4 * g0)[None], reference=g0)
    assert torch.allclose(rule.last_info["trust"], torch.ones(1, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(out, g0, atol=1e-12) and math.isclose(float(out.norm()), 13.0, rel_tol=1e-14)
    # among others, the huge copy still moves the model by at most ||g0|| times its share
    other = torch.tensor([[1.0, -1.0, 0.5, 2.0]], dtype=torch.float64)
    mixed = rule(torch.cat([1e4 * g0[None], other]), reference=g0)
    assert float(mixed.norm()) <= 13.0 + 1e-12


def test_zero_trust_returns_zeros_and_says_so():
    g0 = torch.tensor([1.0, 0.0, 0.0])
    rule = FLTrust()
    out = rule(torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), reference=g0)  # cos -1 and 0
    assert torch.equal(out, torch.zeros(3)) and rule.last_info["zero_trust"] is True
    _, record = aggregate_round(FLTrust(), torch.tensor([[-1.0, 0.0, 0.0]]), None, [4], reference=g0)
    assert record["zero_trust"] is True and record["trust"] == [0.0]
    assert torch.equal(FLTrust()(torch.ones(2, 3), reference=torch.zeros(3)), torch.zeros(3))  # g0 = 0
    assert not FLTrust().__call__(torch.ones(1, 3), reference=g0).eq(0).all()


def test_non_finite_and_zero_rows_get_trust_zero():
    g0 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    good = torch.tensor([[1.0, 0.5, 0.2], [0.3, 1.0, -0.1]], dtype=torch.float64)
    bad = torch.tensor([[math.nan, 1.0, 1.0], [math.inf, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rule = FLTrust()
    out = rule(torch.cat([good, bad]), reference=g0)
    assert torch.isfinite(out).all()
    assert rule.last_info["trust"][2:].eq(0).all() and rule.last_info["dropped"] == [2, 3]
    assert torch.allclose(out, FLTrust()(good, reference=g0), atol=1e-15, rtol=0)


def test_huge_finite_rows_do_not_overflow():
    g0 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    x = torch.tensor([[2.0, 1.0, 3.0], [1.0, 2.5, 2.0]], dtype=torch.float64)
    out = FLTrust()(x * 1e300, reference=g0)
    assert torch.isfinite(out).all() and torch.allclose(out, FLTrust()(x, reference=g0), atol=1e-14, rtol=0)


def test_bad_inputs():
    x = torch.ones(3, 4)
    with pytest.raises(ValueError, match="reference"):
        FLTrust()(x)
    with pytest.raises(ValueError, match="shape"):
        FLTrust()(x, reference=torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        FLTrust()(x, reference=torch.tensor([1.0, math.nan, 0.0, 0.0]))
    with pytest.raises(TypeError, match="floating"):
        FLTrust()(x, reference=torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError):
        FLTrust()([[1.0]], reference=torch.ones(1))
    with pytest.raises(ValueError, match="2-D"):
        FLTrust()(torch.ones(4), reference=torch.ones(4))
    with pytest.raises(ValueError, match="Pipeline"):
        get_aggregator("nnm+fltrust", f=1)(x)


def test_config_name_and_requirement(digits):
    assert isinstance(get_aggregator("fltrust"), FLTrust) and isinstance(rfl.FLTrust(), FLTrust)
    with pytest.raises(ValueError, match="server_root_size") as err:
        run_federated(FLConfig(**BASE, aggregator="fltrust"), data=digits)
    assert "FLTrust" in str(err.value)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="server_root_size"):
            FLConfig(server_root_size=bad).validate()
    with pytest.raises(ValueError, match="server_root_size"):
        run_federated(FLConfig(**BASE, aggregator="fltrust", server_root_size=len(digits.y_train)), data=digits)


def test_root_samples_are_not_in_any_clients_data(digits):
    cfg = FLConfig(**BASE, aggregator="fltrust", server_root_size=100, partition="dirichlet")
    from robustfl_lib.federated import _Simulation

    sim = _Simulation(cfg, digits, torch.device("cpu"))
    root = sim.root.numpy()
    clients = np.concatenate([p.numpy() for p in sim.parts])
    assert len(root) == 100 and len(set(root.tolist())) == 100
    assert not np.isin(root, clients).any()
    assert np.array_equal(np.sort(np.concatenate([root, clients])), np.arange(len(digits.y_train)))
    assert torch.equal(sim.root, root_indices(cfg, len(digits.y_train)))
    other = root_indices(FLConfig(**{**cfg.__dict__, "seed": 1}), len(digits.y_train))
    assert not torch.equal(sim.root, other)


class RecordingFLTrust(FLTrust):
    def __init__(self):
        super().__init__()
        self.references: list[torch.Tensor] = []

    def __call__(self, updates, weights=None, reference=None):
        self.references.append(reference.clone())
        return super().__call__(updates, weights, reference=reference)


def test_server_update_is_local_training_on_root_data(digits):
    cfg = FLConfig(**{**BASE, "rounds": 1}, aggregator=RecordingFLTrust(), server_root_size=60, vectorized=False,
                   byzantine_fraction=0.34, byzantine_attack="sign_flip")
    result = run_federated(cfg, data=digits)
    rfl.set_seed(cfg.seed)
    model = build_model(cfg.model, digits.input_shape, digits.num_classes)
    start = flatten_state(model.state_dict())
    root = root_indices(cfg, len(digits.y_train))
    local = copy.deepcopy(model)
    sgd_client_update(local, digits.x_train[root], digits.y_train[root], cfg, _server_generator(cfg, 1))
    assert torch.allclose(result.aggregator.references[0], flatten_state(local.state_dict()) - start, atol=1e-7, rtol=0)
    trust = result.history[0]["aggregation"]["trust"]
    byz = [result.history[0]["participants"].index(c) for c in result.history[0]["byzantine"]]
    assert all(trust[i] == 0.0 for i in byz) and max(trust) > 0  # sign-flipped updates point away from g0


def test_resume_is_bitwise(digits, tmp_path):
    cfg = FLConfig(**{**BASE, "rounds": 4}, aggregator="fltrust", server_root_size=80, byzantine_fraction=0.34,
                   byzantine_attack="alie", clients_per_round=5)
    full = run_federated(cfg, data=digits)
    run_federated(FLConfig(**{**cfg.__dict__, "rounds": 2}), data=digits, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="server_root_size"):
        run_federated(FLConfig(**{**cfg.__dict__, "server_root_size": 90}), data=digits, checkpoint_dir=tmp_path,
                      resume=True)
    resumed = run_federated(cfg, data=digits, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == full.history
    assert torch.equal(flatten_state(resumed.model.state_dict()), flatten_state(full.model.state_dict()))


@pytest.mark.parametrize("local_training", ["standard", "adversarial"])
def test_run_grid_equals_run_federated(digits, local_training):
    kw = dict(BASE, server_root_size=70, byzantine_fraction=0.34, byzantine_attack="sign_flip",
              local_training=local_training, adv_steps=2, adv_norm="l2", adv_eps=0.5, rounds=2)
    cfgs = [FLConfig(**kw, aggregator="fltrust"), FLConfig(**kw, aggregator="median"),
            FLConfig(**kw, aggregator="fltrust", seed=1)]
    data = {0: digits, 1: rfl.load_dataset("digits", seed=1)}
    grid = rfl.run_grid(cfgs, data=data, progress=False)
    for cfg, g in zip(cfgs, grid):
        alone = run_federated(cfg, data=data[cfg.seed])
        assert torch.allclose(flatten_state(g.model.state_dict()), flatten_state(alone.model.state_dict()),
                              atol=1e-5, rtol=0)
        assert [h["aggregation"].get("selected") for h in g.history] == \
               [h["aggregation"].get("selected") for h in alone.history]


def test_server_data_without_fltrust_only_shrinks_the_clients_data(digits):
    cfg = FLConfig(**{**BASE, "rounds": 1}, aggregator="mean", server_root_size=100)
    result = run_federated(cfg, data=digits)
    plain = run_federated(FLConfig(**{**BASE, "rounds": 1}, aggregator="mean"), data=digits)
    assert set(result.history[0]) == set(plain.history[0])
    assert not torch.equal(flatten_state(result.model.state_dict()), flatten_state(plain.model.state_dict()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    x, g0 = torch.randn(8, 1000, generator=gen), torch.randn(1000, generator=gen)
    out = FLTrust()(x.cuda(), reference=g0.cuda())
    assert out.device.type == "cuda" and torch.allclose(out.cpu(), FLTrust()(x, reference=g0), atol=1e-5)
