"""Update attacks: shapes, formulas, seeds, dtypes and devices; label flipping; the registry."""

from __future__ import annotations

from statistics import NormalDist

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


def test_mimic_copies_the_most_extreme_honest_client():
    h = honest_updates(n=9, d=40, seed=3) * 0.1
    h[6] += 5.0  # an outlying honest client along its own direction
    out = Mimic()(h, 2)
    assert torch.equal(out, h[6].expand(2, -1))
    assert torch.equal(Mimic(target=2)(h, 1)[0], h[2])
    with pytest.raises(ValueError, match="out of range"):
        Mimic(target=9)(h, 1)


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
