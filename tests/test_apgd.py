"""APGD (Croce & Hein 2020): schedule, losses, strength against PGD, the attack contract."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

from attack_contract import batch, check_contract, digits_model, in_ball, robust_count
from robustfl_lib import APGD, PGD, SmallCNN, apgd_checkpoints, targeted_dlr_loss
from robustfl_lib.attacks.apgd import _halve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "attack",
    [
        APGD(0.1, steps=8),
        APGD(0.1, steps=8, loss="dlr", restarts=2),
        APGD(0.1, steps=6, targeted=True, n_target_classes=2),
        APGD(0.1, steps=6, targeted=True, loss="ce", n_target_classes=2),
        APGD(0.5, norm="l2", steps=8),
        APGD(0.5, norm="l2", steps=6, targeted=True, n_target_classes=3, seed=3),
    ],
    ids=["ce", "dlr-restarts", "t-dlr", "t-ce", "l2", "l2-t"],
)
def test_contract(attack):
    check_contract(attack)


def test_any_shape_and_a_cnn():
    cnn = SmallCNN((1, 8, 8), 10)
    x, y = batch((1, 8, 8), classes=10)
    for attack in (APGD(0.1, steps=5), APGD(0.6, norm="l2", steps=5, targeted=True, n_target_classes=2)):
        x_adv = attack(cnn, x, y)
        assert in_ball(x_adv, x, attack.eps, attack.norm) and 0 <= float(x_adv.min()) <= float(x_adv.max()) <= 1
    flat = nn.Linear(7, 5)
    x, y = batch((7,))
    assert in_ball(APGD(0.2, steps=4)(flat, x, y), x, 0.2, "linf")


def _paper_checkpoints(steps: int) -> list[int]:
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), exactly, times steps."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return [int(q * steps) for q in p[1:] if q * steps <= steps]


@pytest.mark.parametrize("steps", [100, 200, 1000])
def test_checkpoints_follow_the_paper(steps):
    assert apgd_checkpoints(steps) == _paper_checkpoints(steps)


def test_checkpoints_for_any_budget():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for steps in range(1, 60):
        points = apgd_checkpoints(steps)
        assert points and points == sorted(set(points)) and points[-1] <= steps


def test_halving_conditions():
    period, rho = 10, 0.75
    increases = torch.tensor([7, 8, 8, 8, 3])
    reduced_last = torch.tensor([False, False, True, False, True])
    best_last = torch.tensor([1.0, 2.0, 2.0, 1.0, 5.0])
    best_now = torch.tensor([1.5, 2.0, 2.0, 1.5, 5.0])
    # 0: few increases (7 <= 7.5); 1: no halving last time and no improvement; 2: halved last time,
    # so condition 2 cannot hold; 3: improved and many increases; 4: few increases.
    assert _halve(increases, period, rho, reduced_last, best_last, best_now).tolist() == [True, True, False, False, True]


class Bump(nn.Module):
    """Two logits whose cross-entropy for class 0 peaks at x = peak and is never misclassified."""

    def __init__(self, peak: float):
        super().__init__()
        self.peak = peak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z1 = -100.0 * (x[:, 0] - self.peak) ** 2
        return torch.stack([torch.full_like(z1, 10.0), z1], dim=1)


def test_step_size_halving_finds_an_interior_maximum():
    # With the step size fixed at its start (2 eps) the iterates jump between the ends of the ball,
    # 0.07 from the peak; the halving and the restarts from the best point close in on it.
    x = torch.full((6, 1), 0.5)
    y = torch.zeros(6, dtype=torch.long)
    x_adv = APGD(0.1, steps=100, seed=1)(Bump(0.53), x, y)
    assert (x_adv - 0.53).abs().max() < 3e-3


def test_targeted_dlr_is_its_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 6, generator=g, dtype=torch.float64) * 3
    y, t = torch.randint(0, 6, (40,), generator=g), torch.randint(0, 6, (40,), generator=g)
    got = targeted_dlr_loss(logits, y, t)
    for i in range(40):
        row = logits[i].tolist()
        z = sorted(row, reverse=True)
        expected = -(row[y[i]] - row[t[i]]) / (z[0] - (z[2] + z[3]) / 2 + 1e-12)
        assert got[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # Shift and positive rescaling of the logits do not change it.
    assert torch.allclose(targeted_dlr_loss(4 * logits - 2, y, t), got, atol=1e-10)
    with pytest.raises(ValueError, match="4 classes"):
        targeted_dlr_loss(logits[:, :3], y.clamp(max=2), t.clamp(max=2))


def test_apgd_at_least_as_strong_as_pgd_with_the_same_budget():
    model, data = digits_model()
    x, y = data.x_test[:300], data.y_test[:300]
    for eps in (0.05, 0.1):
        pgd = robust_count(model, PGD(eps, steps=100, seed=0)(model, x, y), y)
        apgd = robust_count(model, APGD(eps, steps=100)(model, x, y), y)
        apgd_t = robust_count(model, APGD(eps, steps=100, targeted=True, n_target_classes=3)(model, x, y), y)
        assert apgd <= pgd and apgd_t <= pgd, (eps, pgd, apgd, apgd_t)


def test_success_grows_with_eps():
    model, data = digits_model()
    x, y = data.x_test[:200], data.y_test[:200]
    counts = [robust_count(model, APGD(e, steps=30)(model, x, y), y) for e in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)]
    assert counts == sorted(counts, reverse=True) and counts[0] > 150 and counts[-1] == 0, counts


def test_agrees_with_torchattacks():
    ta = pytest.importorskip("torchattacks")
    model, data = digits_model()
    x, y = data.x_test[:200], data.y_test[:200]
    ours = robust_count(model, APGD(0.1, steps=50)(model, x, y), y)
    theirs = robust_count(model, ta.APGD(model, eps=0.1, steps=50, seed=0)(x, y), y)
    assert abs(ours - theirs) <= 2, (ours, theirs)


def test_seeds_and_misclassified_points():
    # A fixed model and batch: drawn from the global RNG, they depended on the tests run before,
    # and with some draws every correct point breaks the same way from either start.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(16, 5)
        x, y = batch((16,))
    a, b = APGD(0.2, steps=5, seed=0)(model, x, y), APGD(0.2, steps=5, seed=1)(model, x, y)
    assert not torch.equal(a, b)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(APGD(0.2, steps=5, seed=None, generator=gen)(model, x, y), a)
    # A point the model already gets wrong comes back unchanged.
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert wrong.any() and torch.equal(a[wrong], x[wrong])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(eps=-0.1), ValueError),
        (dict(eps=float("nan")), ValueError),
        (dict(eps=0.1, norm="l1"), ValueError),
        (dict(eps=0.1, steps=0), ValueError),
        (dict(eps=0.1, restarts=0), ValueError),
        (dict(eps=0.1, steps=2.5), ValueError),
        (dict(eps=0.1, loss="mse"), ValueError),
        (dict(eps=0.1, targeted=True, loss="cw"), ValueError),
        (dict(eps=0.1, targeted=1), TypeError),
        (dict(eps=0.1, n_target_classes=0), ValueError),
        (dict(eps=0.1, rho=1.0), ValueError),
        (dict(eps=0.1, targeted=True, target_batch=0), ValueError),
        (dict(eps=0.1, seed="0"), TypeError),
        (dict(eps=0.1, seed=0, generator=torch.Generator()), ValueError),
        (dict(eps=0.1, bounds=(1.0, 0.0)), ValueError),
    ],
)
def test_bad_settings(kwargs, error):
    with pytest.raises(error):
        APGD(**kwargs)


def test_bad_data():
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="4 classes"):
        APGD(0.1, steps=2, targeted=True)(model, torch.rand(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="bounds"):
        APGD(0.1, steps=2)(model, torch.rand(2, 4) + 1, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer class labels"):
        APGD(0.1, steps=2)(model, torch.rand(2, 4), torch.tensor([0.0, 1.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_the_cpu_ball():
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 5))
    x, y = batch((16,))
    got = APGD(0.1, steps=10, targeted=True, n_target_classes=2)(model.cuda(), x.cuda(), y.cuda())
    assert got.device.type == "cuda" and in_ball(got.cpu(), x, 0.1, "linf")


def test_targets_batched_together_change_no_run():
    # target_batch=1 runs APGD-T's targets one after another (each on the points no earlier target
    # broke); by default they run as one batch of (points x targets) rows. Every run's start is drawn
    # for the same points in the same order, so the same points are broken and each robust point gets
    # the same worst-margin point; a broken point may come from another target's run.
    model, data = digits_model()
    x, y = data.x_test[:150], data.y_test[:150]
    outs = [APGD(0.03, steps=15, targeted=True, n_target_classes=4, target_batch=b)(model, x, y) for b in (1, 3, None)]
    with torch.no_grad():
        masks = [model(o).argmax(1) == y for o in outs]
    assert 20 < int(masks[0].sum()) < 140, int(masks[0].sum())  # some points broken, some robust
    for o, robust in zip(outs[1:], masks[1:]):
        assert torch.equal(robust, masks[0])
        assert torch.equal(o[robust], outs[0][robust])
        assert in_ball(o, x, 0.03, "linf")
    # Restarts too (restart-major: each restart runs all targets).
    a, b = (APGD(0.03, steps=10, targeted=True, n_target_classes=3, restarts=2, target_batch=t)(model, x, y)
            for t in (1, None))
    with torch.no_grad():
        ra, rb = model(a).argmax(1) == y, model(b).argmax(1) == y
    assert torch.equal(ra, rb) and torch.equal(a[ra], b[rb])

