"""TRADES (Zhang et al. 2019) and fast FGSM with a random start (Wong et al. 2020): definitions
written out independently, the ball, determinism, modes, bad settings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustfl_lib import MLP, PGD, FastFGSM, TRADES, adversarial_train, kl_divergence, trades_objective, train

pytestmark = pytest.mark.usefixtures("one_thread")


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP((1, 8, 8), 10, hidden=(32,))


@pytest.fixture(scope="module")
def batch(digits):
    return digits.x_train[:64], digits.y_train[:64]


def in_ball(x_adv, x, eps):
    return bool(((x_adv - x).abs() <= eps).all() and (x_adv >= 0).all() and (x_adv <= 1).all())


def test_fast_fgsm_is_wong_et_al_written_out(batch):
    """U[-eps, eps] start clipped to the box, one signed step of 1.25 eps, clip to ball and box."""
    x, y = batch
    model, eps = net(), 0.1
    got = FastFGSM(eps, generator=torch.Generator().manual_seed(5))(model, x, y)
    g = torch.Generator().manual_seed(5)
    x0 = (x + (torch.rand(x.shape, generator=g) * 2 * eps - eps)).clamp(x - eps, x + eps).clamp(0, 1)
    x0.requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)
    ref = (x0.detach() + 1.25 * eps * grad.sign()).clamp(x - eps, x + eps).clamp(0, 1)
    assert torch.allclose(got, ref, atol=1e-6)
    assert in_ball(got, x, eps)
    assert (got - x).abs().max() > 0.9 * eps  # it moved: the corner step, not a no-op


def test_fast_fgsm_defaults_seed_and_settings(batch):
    x, y = batch
    a = FastFGSM(0.2)
    assert a.alpha == pytest.approx(0.25) and a.steps == 1
    assert a.scaled(0.5).alpha == pytest.approx(0.125)
    m = net()
    assert torch.equal(FastFGSM(0.1, seed=3)(m, x, y), FastFGSM(0.1, seed=3)(m, x, y))
    assert not torch.equal(FastFGSM(0.1, seed=3)(m, x, y), FastFGSM(0.1, seed=4)(m, x, y))
    # one step of PGD with the same start is the same attack
    assert torch.equal(FastFGSM(0.1, seed=3)(m, x, y), PGD(0.1, alpha=0.125, steps=1, seed=3)(m, x, y))
    assert torch.equal(FastFGSM(0.0)(m, x, y), x)
    for bad in ({"steps": 2}, {"norm": "l2"}, {"random_start": False}):
        with pytest.raises(ValueError, match="FastFGSM"):
            FastFGSM(0.1, **bad)


def test_fast_adversarial_training_is_deterministic(batch):
    x, y = batch
    runs = []
    for _ in range(2):
        m = net(1)
        adversarial_train(m, x, y, FastFGSM(0.1, generator=torch.Generator().manual_seed(0)), epochs=2, mix=1.0,
                          generator=torch.Generator().manual_seed(1))
        runs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_kl_divergence_against_float64_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 7, generator=g), torch.randn(20, 7, generator=g)
    p, q = a.double().softmax(1), b.double().softmax(1)
    ref = (p * (p.log() - q.log())).sum(1)
    got = kl_divergence(a, b)
    assert torch.allclose(got.double(), ref, atol=1e-6)
    assert (got >= -1e-7).all() and (ref > 0).all()
    assert torch.allclose(kl_divergence(a, a), torch.zeros(20), atol=1e-7)


def test_trades_beta_zero_is_cross_entropy(batch):
    x, y = batch
    m = net()
    assert torch.equal(TRADES(0.1, beta=0.0)(m, x, y), F.cross_entropy(m(x), y))
    # and at x' = x the KL term vanishes whatever beta
    z = m(x)
    assert torch.allclose(trades_objective(z, z, y, 6.0), F.cross_entropy(z, y, reduction="none"), atol=1e-6)


def test_trades_loss_is_ce_plus_beta_kl_at_its_own_perturbation(batch):
    x, y = batch
    m = net()
    loss = TRADES(0.1, beta=6.0, seed=2)
    x_adv = loss.perturb(m, x)
    assert in_ball(x_adv, x, 0.1)
    z, za = m(x), m(x_adv)
    p, q = z.double().softmax(1), za.double().softmax(1)
    ref = F.cross_entropy(z.double(), y) + 6.0 * (p * (p.log() - q.log())).sum(1).mean()
    got = loss(m, x, y)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    # both terms are differentiated, the natural logits in the KL included (the reference code's choice)
    grads = torch.autograd.grad(got, list(m.parameters()))
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    assert all(torch.allclose(a, b.float(), atol=1e-5) for a, b in zip(grads, ref_grads))


def test_trades_inner_maximisation_raises_the_kl(batch):
    x, y = batch
    m = net()
    loss = TRADES(0.1, steps=10, seed=0)
    with torch.no_grad():
        z = m(x)
        start = loss._start(x, torch.Generator().manual_seed(0)).clamp(x - 0.1, x + 0.1).clamp(0, 1)
        kl_start = kl_divergence(z, m(start)).mean()
        kl_adv = kl_divergence(z, m(loss.perturb(m, x))).mean()
    assert kl_adv > 10 * kl_start


def test_trades_seed_modes_and_gradients(batch):
    x, y = batch
    m = net()
    m.train()
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    a, b = TRADES(0.1, seed=1).perturb(m, x), TRADES(0.1, seed=1).perturb(m, x)
    assert torch.equal(a, b) and not torch.equal(a, TRADES(0.1, seed=2).perturb(m, x))
    assert m.training and all(torch.equal(p.grad, torch.ones_like(p)) and p.requires_grad for p in m.parameters())
    assert torch.equal(TRADES(0.0).perturb(m, x), x)


def test_trades_training_is_deterministic(batch):
    x, y = batch
    runs = []
    for _ in range(2):
        m = net(2)
        train(m, x, y, epochs=1, loss_fn=TRADES(0.1, steps=3, generator=torch.Generator().manual_seed(0)),
              generator=torch.Generator().manual_seed(1))
        runs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("bad,match", [
    ({"eps": -1.0}, "eps"), ({"beta": -1.0}, "beta"), ({"steps": 0}, "steps"), ({"alpha": 0.0}, "alpha"),
    ({"seed": 1, "generator": torch.Generator()}, "seed"),
])
def test_trades_bad_settings(bad, match):
    kwargs = {"eps": 0.1, **bad}
    with pytest.raises(ValueError, match=match):
        TRADES(**kwargs)


def test_trades_rejects_inputs_outside_the_box(batch):
    x, y = batch
    with pytest.raises(ValueError, match="bounds"):
        TRADES(0.1)(net(), x + 2, y)


# --------------------------------------------------------------------------- federated clients


def _flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("local_training", ["trades", "fast_fgsm"])
def test_fl_local_training_equals_centralized(digits, local_training):
    """One client's vectorized local training equals train / adversarial_train with the same
    minibatch and random-start streams (to rounding: a sign step can flip on a near-zero gradient)."""
    import copy

    from robustfl_lib import FLConfig
    from robustfl_lib.federated import _train_clients
    from robustfl_lib.federated.clients import _pgd_start_generator
    from robustfl_lib.runtime import make_generator

    x, y = digits.x_train[:96], digits.y_train[:96]  # 6 full batches: no padded rows draw noise
    model = net(0)
    cfg = FLConfig(local_training=local_training, adv_eps=0.1, adv_steps=3, adv_mix=1.0, local_epochs=2,
                   batch_size=16, lr=0.1, seed=3)
    cfg.validate()
    got = _train_clients(model, [x], [y], [make_generator(5)], cfg, 2, None)[0]
    central = copy.deepcopy(model)
    starts = _pgd_start_generator(3, 2)
    if local_training == "trades":
        train(central, x, y, epochs=2, lr=0.1, batch_size=16, generator=make_generator(5),
              loss_fn=TRADES(0.1, steps=3, generator=starts))
    else:
        adversarial_train(central, x, y, FastFGSM(0.1, generator=starts), epochs=2, mix=1.0, lr=0.1, batch_size=16,
                          generator=make_generator(5))
    torch.testing.assert_close(got, _flat(central), rtol=0, atol=1e-4)
    assert (got - _flat(model)).abs().max() > 1e-2


@pytest.mark.parametrize("local_training", ["trades", "fast_fgsm"])
def test_fl_grid_equals_separate_runs(local_training):
    """Two seeds in lock step draw each simulation's starts from its own stream, as alone."""
    import dataclasses

    from robustfl_lib import FLConfig, run_federated, run_grid

    cfg = FLConfig(num_clients=4, rounds=2, local_epochs=1, local_training=local_training, adv_eps=0.1, adv_steps=2,
                   progress=False)
    configs = [dataclasses.replace(cfg, seed=s) for s in (0, 1)]
    for c, got in zip(configs, run_grid(configs, progress=False)):
        torch.testing.assert_close(_flat(got.model), _flat(run_federated(c).model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"local_training": "trades", "trades_beta": -1.0}, "trades_beta"),
    ({"local_training": "trades", "adv_norm": "l2"}, "linf"),
    ({"local_training": "fast_fgsm", "adv_norm": "l2"}, "linf"),
    ({"local_training": "fast_fgsm", "adv_eps": -0.1}, "eps"),
    ({"local_training": "pgd"}, "local_training"),
])
def test_fl_config_validation(kwargs, match):
    from robustfl_lib import FLConfig

    with pytest.raises(ValueError, match=match):
        FLConfig(**kwargs).validate()
