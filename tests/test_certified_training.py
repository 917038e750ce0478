"""Certified training (IBP / CROWN-IBP losses and their ramps) and verified accuracy against
attacks; the federated clients' certified local training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustfl_lib as rfl
from robustfl_lib import (
    MLP,
    PGD,
    CertifiedLoss,
    LinearRamp,
    WorstCaseEnsemble,
    adversarial_train,
    certified_loss,
    certified_sample_loss,
    gowal_schedules,
    margin_bounds,
    train,
    verified,
    verified_accuracy,
)

pytestmark = pytest.mark.usefixtures("one_thread")
EPOCHS, STEPS_PER_EPOCH = 12, 19  # 600 samples in batches of 32


def fresh() -> nn.Module:
    torch.manual_seed(0)
    return MLP((1, 8, 8), 10, hidden=(64,))


@pytest.fixture(scope="module")
def split(digits):
    return digits.x_train[:600], digits.y_train[:600], digits.x_test[:300], digits.y_test[:300]


@pytest.fixture(scope="module")
def models(split):
    """The same network and shuffling trained three ways at a training budget of 0.1."""
    x, y, _, _ = split
    out = {}
    for name in ("standard", "pgd", "ibp"):
        m, g = fresh(), torch.Generator().manual_seed(1)
        if name == "standard":
            train(m, x, y, epochs=EPOCHS, lr=0.1, generator=g)
        elif name == "pgd":
            adversarial_train(m, x, y, PGD(0.1, steps=5, seed=0), epochs=EPOCHS, mix=1.0, lr=0.1, generator=g)
        else:
            eps_s, kappa_s = gowal_schedules(0.1, warmup=STEPS_PER_EPOCH, ramp=6 * STEPS_PER_EPOCH)
            train(m, x, y, epochs=EPOCHS, lr=0.1, generator=g, loss_fn=certified_loss(eps_s, kappa_s, "ibp"))
        out[name] = m.eval()
    return out


def test_ibp_training_raises_verified_accuracy(models, split):
    """Measured at seed 0 (ibp 79/300 and 176/300 verified at 0.1 and 0.05; standard 0 and 96;
    PGD 0 and 116): the IBP-trained model is verified on many more test points."""
    _, _, xt, yt = split
    for eps, gap in ((0.1, 40), (0.05, 40)):
        count = {k: int(verified(m, xt, yt, eps, "ibp").sum()) for k, m in models.items()}
        assert count["ibp"] >= max(count["standard"], count["pgd"]) + gap, count


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_no_attack_breaks_a_verified_point(models, split, method, eps):
    """Verified implies robust, point by point, under PGD with restarts and the worst-case ensemble,
    so verified accuracy <= robust accuracy."""
    _, _, xt, yt = split
    attacks = [PGD(eps, steps=20, restarts=2, seed=0), WorstCaseEnsemble.standard(eps, steps=20, restarts=1)]
    for name, m in models.items():
        ok = verified(m, xt, yt, eps, method)
        for attack in attacks:
            with torch.no_grad():
                robust = m(attack(m, xt, yt)).argmax(1) == yt
            assert not (ok & ~robust).any(), (name, type(attack).__name__)
            assert ok.float().mean() <= robust.float().mean()
        if name == "ibp":
            assert ok.sum() > 0  # the implication is checked on verified points, not vacuously


def test_no_autoattack_point_breaks_a_verified_point(models, split):
    """The same under the library's strongest attack (AutoAttack, fast version), once per model."""
    _, _, xt, yt = split
    eps = 0.05
    for name in ("pgd", "ibp"):
        m = models[name]
        ok = verified(m, xt, yt, eps, "ibp") | verified(m, xt, yt, eps, "crown-ibp")
        with torch.no_grad():
            robust = m(rfl.AutoAttack(eps, norm="linf", version="fast")(m, xt, yt)).argmax(1) == yt
        assert ok.sum() > 0 and not (ok & ~robust).any(), name


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_eps_zero_verified_accuracy_is_clean_accuracy(models, split, method):
    _, _, xt, yt = split
    for m in models.values():
        with torch.no_grad():
            z = m(xt)
        top = z.topk(2, dim=1).values
        clear = (top[:, 0] - top[:, 1]) > 1e-4  # no near-ties, where rounding may decide
        correct = z.argmax(1) == yt
        ok = verified(m, xt, yt, 0.0, method)
        assert torch.equal(ok[clear], correct[clear])
        assert abs(verified_accuracy(m, xt, yt, 0.0, method) - correct.float().mean().item()) <= (~clear).float().mean()


def test_verified_accuracy_restores_modes_and_rejects_empty(models, split):
    _, _, xt, yt = split
    m = models["ibp"]
    m.train()
    verified_accuracy(m, xt[:10], yt[:10], 0.05)
    assert m.training
    m.eval()
    with pytest.raises(ValueError, match="empty"):
        verified_accuracy(m, xt[:0], yt[:0], 0.05)


def test_certified_loss_definition(split):
    x, y = split[0][:40], split[1][:40]
    m = fresh()
    z = m(x)
    ce = F.cross_entropy(z, y, reduction="none")
    # kappa = 1: the natural loss exactly
    assert torch.equal(certified_sample_loss(m, x, y, 0.1, kappa=1.0), ce)
    # eps = 0: the bounds are the logits, so the worst-case CE is the CE (either bound)
    for beta in (0.0, 1.0):
        assert torch.allclose(certified_sample_loss(m, x, y, 0.0, kappa=0.0, beta=beta), ce, atol=1e-5)
    # the mixture as the paper writes it: CE on minus the beta-mixed margin bounds
    mi, mc = margin_bounds(m, x, y, 0.1, "ibp"), margin_bounds(m, x, y, 0.1, "crown-ibp")
    ref = 0.3 * ce + 0.7 * F.cross_entropy(-(0.6 * mi + 0.4 * mc), y, reduction="none")
    assert torch.allclose(certified_sample_loss(m, x, y, 0.1, kappa=0.3, beta=0.4), ref, atol=1e-6)


def test_worst_case_loss_bounds_the_loss_anywhere_in_the_ball(split):
    x, y = split[0][:80], split[1][:80]
    m = fresh()
    train(m, split[0], split[1], epochs=2, generator=torch.Generator().manual_seed(0))
    x_adv = PGD(0.05, steps=20, seed=0)(m, x, y)
    with torch.no_grad():
        ce_adv = F.cross_entropy(m(x_adv), y, reduction="none")
        for beta in (0.0, 1.0):
            assert (certified_sample_loss(m, x, y, 0.05, kappa=0.0, beta=beta) >= ce_adv - 1e-5).all()


def test_schedules_and_step_counting(split):
    r = LinearRamp(0.0, 0.2, warmup=2, ramp=4)
    assert [r(t) for t in range(8)] == pytest.approx([0, 0, 0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert LinearRamp(1.0, 0.5, warmup=3)(3) == 0.5 and LinearRamp(1.0, 0.5, warmup=3)(2) == 1.0
    eps_s, kappa_s = gowal_schedules(0.3, warmup=1, ramp=2, kappa_end=0.5)
    loss = CertifiedLoss(eps_s, method="crown-ibp", kappa=kappa_s, beta=LinearRamp(1.0, 0.0, 1, 2))
    seen = []
    x, y = split[0][:8], split[1][:8]
    m = fresh()
    for _ in range(4):
        seen.append(loss.values(loss.step))
        loss(m, x, y)
    assert [v for t in seen for v in t] == pytest.approx([0, 1, 1, 0, 1, 1, 0.15, 0.75, 0.5, 0.3, 0.5, 0])
    assert loss.step == 4
    loss.reset()
    assert loss.step == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": -0.1}, "eps"), ({"eps": 0.1, "kappa": 1.5}, "kappa"), ({"eps": 0.1, "method": "lp"}, "method"),
    ({"eps": 0.1, "method": "ibp", "beta": 0.5}, "beta"), ({"eps": 0.1, "method": "crown-ibp", "beta": 2.0}, "beta"),
])
def test_certified_loss_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CertifiedLoss(**kwargs)
    with pytest.raises(ValueError, match="warmup"):
        LinearRamp(0.0, 1.0, warmup=-1)


def test_certified_training_with_train_mode_batchnorm_raises(split):
    """BatchNorm in train mode normalises by the batch: no bound applies, so the loss refuses
    (documented); the network would have to be trained in eval mode or without BatchNorm."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(ValueError, match="BatchNorm1d"):
        train(net, split[0][:64], split[1][:64], loss_fn=certified_loss(0.1))


# --------------------------------------------------------------------------- federated clients


def _flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("extra", [{}, {"cert_method": "crown-ibp", "cert_beta": 0.5}])
def test_fl_certified_local_training_equals_centralized(split, arch, extra):
    """One client's local training, vectorized (vmap over the stacked weights) and client by client,
    equals train(..., loss_fn=certified_loss(...)) on its data with its generator."""
    import copy
    import dataclasses

    from robustfl_lib.federated import _train_clients
    from robustfl_lib.runtime import make_generator

    x, y = split[0][:80], split[1][:80]
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=(32,)) if arch == "mlp" else rfl.SmallCNN((1, 8, 8), 10, channels=(4, 6))
    cfg = rfl.FLConfig(local_training="certified", adv_eps=0.1, cert_kappa=0.3, local_epochs=2, batch_size=16,
                       lr=0.1, cert_warmup_rounds=1, cert_ramp_rounds=2, **extra)
    cfg.validate()
    rnd = 3  # half way up the ramp: eps 0.05, kappa 0.65
    eps, kappa, beta = cfg.certified_values(rnd)
    assert (eps, kappa) == pytest.approx((0.05, 0.65))
    central = copy.deepcopy(model)
    train(central, x, y, epochs=2, lr=0.1, batch_size=16, generator=make_generator(7),
          loss_fn=certified_loss(eps, kappa, cfg.cert_method, beta if cfg.cert_method != "ibp" else None))
    for vectorized in (True, False):
        got = _train_clients(model, [x], [y], [make_generator(7)], dataclasses.replace(cfg, vectorized=vectorized),
                             rnd, None)
        torch.testing.assert_close(got[0], _flat(central), rtol=0, atol=1e-6)
    assert not torch.allclose(_flat(central), _flat(model))


def test_fl_certified_run_with_byzantine_clients_and_grid(digits):
    """A certified FL run with Byzantine clients and a robust rule runs, is finite, and the lock-step
    grid over two seeds equals the separate runs."""
    import dataclasses

    from robustfl_lib import FLConfig, run_federated, run_grid

    cfg = FLConfig(num_clients=5, rounds=2, local_epochs=1, local_training="certified", cert_method="crown-ibp",
                   adv_eps=0.05, cert_ramp_rounds=2, aggregator="median", byzantine_fraction=0.2,
                   byzantine_attack="sign_flip", progress=False)
    configs = [dataclasses.replace(cfg, seed=s) for s in (0, 1)]
    grid = run_grid(configs, progress=False)
    for c, got in zip(configs, grid):
        want = run_federated(c)
        torch.testing.assert_close(_flat(got.model), _flat(want.model), rtol=1e-5, atol=1e-6)
        assert all(0 <= h["clean_accuracy"] <= 1 for h in want.history)
        assert torch.isfinite(_flat(want.model)).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"cert_method": "lp"}, "cert_method"), ({"cert_kappa": 1.5}, "cert_kappa"), ({"cert_beta": 0.5}, "ibp"),
    ({"cert_method": "crown-ibp", "cert_beta": -0.1}, "cert_beta"), ({"cert_ramp_rounds": -1}, "cert_ramp_rounds"),
    ({"adv_norm": "l2"}, "linf"), ({"adv_eps": -0.1}, "adv_eps"),
])
def test_fl_certified_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rfl.FLConfig(local_training="certified", **kwargs).validate()
