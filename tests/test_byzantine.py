"""Update attacks: shapes, formulas, seeds, dtypes and devices; label flipping; the registry."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import torch

from robustfl_lib import (
    ALIE,
    ATTACKS,
    IPM,
    DataPoisoning,
    GaussianNoise,
    LabelFlip,
    Mimic,
    ModelReplacement,
    NonFinite,
    Scaling,
    SignFlip,
    alie_z,
    get_attack,
)
from robustfl_lib.aggregators import Mean
from robustfl_lib.federated import apply_byzantine_attack

UPDATE_ATTACKS = [name for name in ATTACKS if name != "label_flip"]


def honest_updates(n: int = 8, d: int = 30, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.1 + torch.randn(n, d, generator=g)).to(dtype)


@pytest.mark.parametrize("name", UPDATE_ATTACKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_every_update_attack_returns_num_byzantine_rows_like_the_input(name, dtype):
    h = honest_updates(dtype=dtype)
    attack = get_attack(name)
    out = attack(h, 3, generator=torch.Generator().manual_seed(1))
    assert out.shape == (3, 30) and out.dtype == dtype and out.device == h.device
    assert attack(h, 0).shape == (0, 30)
    if name != "nonfinite":
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", UPDATE_ATTACKS)
def test_update_attacks_check_their_input(name):
    attack = get_attack(name)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        attack(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="num_byzantine"):
        attack(honest_updates(), -1)


def test_formulas_of_the_mean_based_attacks():
    h = honest_updates()
    mu = h.mean(0)
    assert torch.allclose(SignFlip()(h, 2), -mu.expand(2, -1))
    assert torch.allclose(SignFlip(scale=3)(h, 1)[0], -3 * mu)
    assert torch.allclose(Scaling(factor=7)(h, 2), 7 * mu.expand(2, -1))
    assert torch.allclose(IPM(epsilon=0.1)(h, 4), -0.1 * mu.expand(4, -1))


@pytest.mark.parametrize("b", [1, 2, 5])
def test_model_replacement_sets_the_mean_to_its_target(b):
    h = honest_updates(dtype=torch.float64)
    target = torch.linspace(-1, 1, 30, dtype=torch.float64)
    byz = ModelReplacement(target=target)(h, b)
    assert torch.allclose(torch.cat([h, byz]).mean(0), target)
    default = ModelReplacement(target_scale=2.0)(h, b)
    assert torch.allclose(torch.cat([h, default]).mean(0), -2.0 * h.mean(0))
    fn = ModelReplacement(target=lambda honest: honest[0])(h, b)
    assert torch.allclose(torch.cat([h, fn]).mean(0), h[0])
    with pytest.raises(ValueError, match="target must have shape"):
        ModelReplacement(target=torch.zeros(3))(h, b)


@pytest.mark.parametrize("n,f", [(10, 2), (20, 4), (50, 10), (7, 3), (5, 4)])
def test_alie_z_follows_baruch_et_al(n, f):
    s = max(int(n / 2 + 1) - f, 1)
    assert alie_z(n, f) == pytest.approx(NormalDist().inv_cdf((n - s) / n))
    h = honest_updates(n=n - f, dtype=torch.float64)
    std = h.std(0, correction=1 if n - f > 1 else 0)  # one honest client: zero spread
    out = ALIE()(h, f)
    assert torch.allclose(out, (h.mean(0) - alie_z(n, f) * std).expand(f, -1))
    assert torch.allclose(ALIE(z=1.5)(h, f)[0], h.mean(0) - 1.5 * std)
    with pytest.raises(ValueError):
        alie_z(3, 4)


def test_alie_stays_inside_the_honest_spread():
    """The point of ALIE: each coordinate moves by less than the honest standard deviation."""
    h = honest_updates(n=16, d=500, dtype=torch.float64)
    out = ALIE()(h, 4)[0]
    z = alie_z(20, 4)
    assert 0 < z < 1
    assert ((out - h.mean(0)).abs() <= h.std(0) + 1e-12).all()


def test_gaussian_noise_is_seeded():
    h = honest_updates()
    a = GaussianNoise(std=2.0)(h, 3, generator=torch.Generator().manual_seed(5))
    b = GaussianNoise(std=2.0)(h, 3, generator=torch.Generator().manual_seed(5))
    c = GaussianNoise(std=2.0)(h, 3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    big = GaussianNoise(std=2.0)(honest_updates(d=20_000), 2, generator=torch.Generator().manual_seed(0))
    assert big.std().item() == pytest.approx(2.0, rel=0.02) and abs(big.mean().item()) < 0.05


def spread_along(direction: torch.Tensor, coef: torch.Tensor, seed: int) -> torch.Tensor:
    """Honest updates that vary mostly along ``direction`` (coefficients ``coef``), plus small noise."""
    g = torch.Generator().manual_seed(seed)
    return coef[:, None] * direction + 0.01 * torch.randn(len(coef), len(direction), generator=g, dtype=direction.dtype)


def power_iteration_reference(rounds: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Mimic's direction after each warm-up call, written out from its docstring (a loop over clients)."""
    zs, mu, z = [], None, None
    for t, h in enumerate(rounds):
        h = h.double()
        mu = h.mean(0) if t == 0 else t / (t + 1) * mu + h.mean(0) / (t + 1)
        if t == 0:
            z = torch.randn(h.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        v = sum(float((x - mu) @ z) * (x - mu) for x in h)
        z = v / v.norm() if t == 0 else t / (t + 1) * z + v / v.norm() / (t + 1)
        z = z / z.norm()
        zs.append(z)
    return zs


def test_mimic_chooses_one_honest_row_by_the_direction_of_maximal_variance_and_keeps_it():
    d = 40
    e = torch.zeros(d, dtype=torch.float64)
    e[:5] = 1 / 5**0.5
    coef = torch.tensor([0.3, -2.0, 0.1, 1.0, 3.0, -0.5, 0.0, 0.7, -1.2], dtype=torch.float64)
    h1 = spread_along(e, coef, seed=0)
    atk = Mimic()
    out = atk(h1, 2)
    state = atk.get_state()
    z = state["z"]
    assert abs(float(z @ e)) > 0.99  # the direction of maximal variance of the honest updates
    assert atk.choice in (int(coef.argmax()), int(coef.argmin()))  # an end of it, on the side z points to
    assert atk.choice == int((h1 @ z).argmax())
    assert torch.equal(out, h1[atk.choice].expand(2, -1))
    torch.testing.assert_close(z, power_iteration_reference([h1])[0])
    chosen = atk.choice
    # Later rounds: other rows are now the extreme ones (re-picking would follow them); Mimic does not.
    for seed in range(1, 5):
        h = honest_updates(n=9, d=d, seed=seed, dtype=torch.float64)
        h[(chosen + seed) % 9] += 10.0
        assert torch.equal(atk(h, 3), h[chosen].expand(3, -1))
        assert atk.choice == chosen
    assert atk.get_state()["calls"] == 5 and torch.equal(atk.get_state()["z"], z)


def test_mimic_warmup_learns_the_direction_online_then_fixes_the_last_pick():
    g = torch.Generator().manual_seed(7)
    rounds = [torch.randn(7, 25, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, 25) for _ in range(4)]
    atk = Mimic(warmup=3, seed=11)
    zs = power_iteration_reference(rounds[:3], seed=11)
    for t in range(3):
        out = atk(rounds[t], 1)
        torch.testing.assert_close(atk.get_state()["z"], zs[t])
        pick = int((rounds[t] @ zs[t]).argmax())
        assert torch.equal(out[0], rounds[t][pick])  # during warm-up: this round's pick
        assert atk.choice == (pick if t == 2 else None)
    assert torch.equal(atk(rounds[3], 1)[0], rounds[3][atk.choice])


def test_mimic_reset_forgets_the_choice():
    a = Mimic()
    h1 = spread_along(torch.ones(12, dtype=torch.float64) / 12**0.5, torch.linspace(-1, 1, 6, dtype=torch.float64), 0)
    a(h1, 1)
    h2 = spread_along(torch.ones(12, dtype=torch.float64) / 12**0.5, torch.tensor([0.0, 0, 0, 0, 0, 4.0]).double(), 1)
    assert a.choice is not None
    a.reset()
    assert a.choice is None and a.get_state() == {"calls": 0, "mu": None, "z": None, "choice": None}
    # after reset it learns on the new run's updates, as a fresh attack does
    fresh = Mimic()
    assert torch.equal(a(h2, 2), fresh(h2, 2)) and a.choice == fresh.choice
    with pytest.raises(ValueError, match="call reset"):
        a(honest_updates(n=6, d=13), 1)  # a new model's updates without reset()


def test_mimic_state_round_trip(tmp_path):
    rounds = [honest_updates(n=8, d=30, seed=s) for s in range(5)]
    a = Mimic(warmup=2)
    a(rounds[0], 2)
    state = a.get_state()
    assert set(state) == {"calls", "mu", "z", "choice"} and state["calls"] == 1 and state["choice"] is None
    torch.save(state, tmp_path / "mimic.pt")
    b = Mimic(warmup=2)
    b.set_state(torch.load(tmp_path / "mimic.pt", weights_only=True))
    for h in rounds[1:]:
        assert torch.equal(a(h, 2), b(h, 2))
    assert a.choice == b.choice is not None
    state["z"].zero_()  # the returned state is a copy
    assert a.get_state()["z"].abs().sum() > 0
    c = Mimic(warmup=2)
    c.set_state(a.get_state())
    assert c.get_state()["choice"] == a.choice and torch.equal(c(rounds[4], 1), a(rounds[4], 1))
    with pytest.raises(ValueError, match="keys"):
        c.set_state({"calls": 0})
    with pytest.raises(ValueError, match="choice"):
        c.set_state({**a.get_state(), "choice": None})
    with pytest.raises(ValueError, match="stateless"):
        SignFlip().set_state({"calls": 1})
    assert SignFlip().get_state() == {}


def test_mimic_fixed_row_under_partial_participation_and_target():
    coef = torch.tensor([0.0, 0.1, -0.1, 0.2, 5.0, -5.0], dtype=torch.float64)
    h = spread_along(torch.ones(10, dtype=torch.float64) / 10**0.5, coef, 0)
    atk = Mimic()
    atk(h, 1)
    assert atk.choice in (4, 5)
    few = honest_updates(n=3, d=10, seed=2, dtype=torch.float64)  # fewer honest rows than the fixed index
    z = atk.get_state()["z"]
    assert torch.equal(atk(few, 1)[0], few[int((few @ z).argmax())])
    assert atk.choice in (4, 5)  # the stored choice is kept
    assert torch.equal(Mimic(target=2)(h, 1)[0], h[2])
    assert Mimic(target=2).get_state()["choice"] is None
    with pytest.raises(ValueError, match="out of range"):
        Mimic(target=9)(h, 1)
    for bad in (dict(target=-1), dict(warmup=0), dict(seed=1.5)):
        with pytest.raises(ValueError):
            Mimic(**bad)


def test_model_replacement_lands_the_weighted_mean_on_its_target():
    h = honest_updates(n=6, dtype=torch.float64)
    counts = torch.tensor([10.0, 200.0, 35.0, 80.0, 5.0, 120.0, 60.0, 15.0], dtype=torch.float64)  # honest, then 2 Byzantine
    w, wb = counts[:6], counts[6:]
    target = torch.linspace(-1, 1, 30, dtype=torch.float64)
    byz = ModelReplacement(target=target)(h, 2, weights=w, byzantine_weights=wb)
    torch.testing.assert_close(Mean()(torch.cat([h, byz]), weights=counts), target)
    # default target: minus target_scale times the weighted honest mean (the honest FedAvg step)
    byz = ModelReplacement(target_scale=2.0)(h, 2, weights=w, byzantine_weights=wb)
    torch.testing.assert_close(Mean()(torch.cat([h, byz]), weights=counts), -2.0 * Mean()(h, weights=w))
    # what it sent before, the unweighted forgery, misses the target of a weighted mean
    unweighted = ModelReplacement(target=target)(h, 2)
    assert not torch.allclose(Mean()(torch.cat([h, unweighted]), weights=counts), target, atol=1e-3)
    with pytest.raises(ValueError, match="sum to 0"):
        ModelReplacement(target=target)(h, 2, weights=w, byzantine_weights=torch.zeros(2))


def test_model_replacement_without_weights_is_unchanged():
    h = honest_updates(dtype=torch.float64)
    target = torch.linspace(-1, 1, 30, dtype=torch.float64)
    n, b = 8 + 3, 3
    assert torch.equal(ModelReplacement(target=target)(h, b)[0], (n * target - h.sum(0)) / b)
    assert torch.equal(ModelReplacement(target_scale=5.0)(h, b)[0], (n * (-5.0 * h.mean(0)) - h.sum(0)) / b)
    equal = ModelReplacement(target=target)(h, b, weights=torch.full((8,), 7.0), byzantine_weights=torch.full((3,), 7.0))
    torch.testing.assert_close(equal, ModelReplacement(target=target)(h, b))


@pytest.mark.parametrize("name", UPDATE_ATTACKS)
def test_update_attacks_check_the_servers_weights(name):
    h = honest_updates()
    attack = get_attack(name)
    with pytest.raises(ValueError, match="go together"):
        attack(h, 2, weights=torch.ones(8))
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        attack(h, 2, weights=torch.ones(7), byzantine_weights=torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        attack(h, 2, weights=torch.ones(8), byzantine_weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="all be zero"):
        attack(h, 2, weights=torch.zeros(8), byzantine_weights=torch.ones(2))
    out = attack(h, 2, generator=torch.Generator().manual_seed(0), weights=torch.arange(1.0, 9.0),
                 byzantine_weights=torch.ones(2))
    assert out.shape == (2, 30)


def test_attacks_defined_on_the_plain_mean_ignore_the_weights():
    h = honest_updates()
    w, wb = torch.arange(1.0, 9.0), torch.tensor([3.0, 4.0])
    for attack in (SignFlip(), Scaling(), ALIE(), IPM(), Mimic(target=1)):
        assert torch.equal(attack(h, 2, weights=w, byzantine_weights=wb), attack(h, 2)), attack


def test_the_fl_engine_passes_sample_counts_to_the_attack():
    h = honest_updates(n=7, dtype=torch.float64)
    updates = torch.cat([h[:3], torch.zeros(2, 30, dtype=torch.float64), h[3:]])  # Byzantine rows 3 and 4
    is_byz = np.array([False, False, False, True, True, False, False, False, False])
    counts = torch.tensor([12.0, 40.0, 7.0, 90.0, 3.0, 55.0, 20.0, 33.0, 8.0], dtype=torch.float64)
    target = torch.linspace(0, 1, 30, dtype=torch.float64)
    out = apply_byzantine_attack(updates, is_byz, ModelReplacement(target=target), torch.Generator(), counts=counts)
    torch.testing.assert_close(Mean()(out, weights=counts), target)
    assert torch.equal(out[~torch.as_tensor(is_byz)], updates[~torch.as_tensor(is_byz)])


def test_nonfinite_values():
    h = honest_updates()
    assert torch.isnan(NonFinite()(h, 2)).all()
    assert torch.isposinf(NonFinite("inf")(h, 2)).all()
    assert torch.isneginf(NonFinite("-inf")(h, 2)).all()
    with pytest.raises(ValueError, match="value must be"):
        NonFinite("zero")


def test_label_flip_poisons_labels_only():
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 7, 8, 9])
    x2, y2 = LabelFlip().poison(x, y, 10)
    assert x2 is x and y2.tolist() == [9, 8, 7, 2, 1, 0]
    assert LabelFlip("shift").poison(x, y, 10)[1].tolist() == [1, 2, 3, 8, 9, 0]
    assert isinstance(get_attack("label_flip"), DataPoisoning)
    with pytest.raises(ValueError, match="labels must lie"):
        LabelFlip().poison(x, y, 5)
    with pytest.raises(TypeError, match="poisons a client's training data"):
        LabelFlip()(honest_updates(), 2)


def test_registry_and_devices():
    assert set(ATTACKS) == {"sign_flip", "scaling", "gaussian", "model_replacement", "alie", "ipm", "mimic",
                            "nonfinite", "label_flip"}
    assert get_attack("ipm", epsilon=0.2).epsilon == 0.2
    obj = ALIE()
    assert get_attack(obj) is obj
    with pytest.raises(ValueError, match="unknown attack"):
        get_attack("sign-flip")
    with pytest.raises(ValueError, match="only used with an attack name"):
        get_attack(obj, z=1.0)
    if torch.cuda.is_available():
        h = honest_updates().cuda()
        for name in UPDATE_ATTACKS:
            out = get_attack(name)(h, 2, generator=torch.Generator().manual_seed(0))
            assert out.device == h.device
