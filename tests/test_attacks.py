"""Input attacks: every contract of robustfl_lib.attacks, on tiny models (seconds in total)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustfl_lib import (
    FGSM,
    MLP,
    PGD,
    SmallCNN,
    WorstCaseEnsemble,
    attack_loss,
    evaluate,
    linf_bounds,
    logit_margin,
    train,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(shape: tuple[int, ...], seed: int = 0, dropout: bool = True) -> nn.Module:
    """A small MLP for any input shape, with a dropout layer so that train/eval mode matters."""
    torch.manual_seed(seed)
    d = 1
    for s in shape:
        d *= s
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(d, 32), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(32, 5))
    return nn.Sequential(*layers)


def batch(shape: tuple[int, ...], n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, 5, (n,), generator=g)


def all_attacks(eps: float = 0.1) -> list:
    return [
        FGSM(eps),
        PGD(eps, steps=5, seed=0),
        PGD(eps, steps=5, norm="l2", seed=0),
        PGD(eps, steps=3, restarts=3, seed=0),
        PGD(eps, steps=3, loss="dlr", seed=0),
        PGD(eps, steps=3, norm="l2", loss="cw", restarts=2, seed=0),
        WorstCaseEnsemble.standard(eps, steps=3, restarts=2),
        WorstCaseEnsemble.standard(eps, norm="l2", steps=3),
    ]


def in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> bool:
    if norm == "linf":  # exact: float32 differences are exact in float64 for inputs in [0, 1] of these sizes
        return bool(((x_adv.double() - x.double()).abs() <= eps).all())
    delta = (x_adv - x).flatten(1)
    return bool((delta.norm(dim=1) <= eps * (1 + 1e-5) + 1e-7).all())


def eps_in_dtype(eps: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` that is <= eps (NumPy's rounding, independent of the library)."""
    np_dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[dtype]
    e = np_dtype(eps)
    return float(np.nextafter(e, np_dtype(0)) if float(e) > eps else e)


ATTACK_IDS = ["fgsm", "pgd", "pgd-l2", "pgd-restarts", "pgd-dlr", "pgd-l2-cw", "ensemble", "ensemble-l2"]


# ----------------------------------------------------------------------------- ball, box, shape


@pytest.mark.parametrize("shape", [(20,), (1, 8, 8), (3, 6, 6)], ids=["flat", "CHW", "RGB"])
@pytest.mark.parametrize("attack", all_attacks(), ids=ATTACK_IDS)
def test_stays_in_ball_and_box_for_any_shape(attack, shape):
    model = tiny_model(shape)
    x, y = batch(shape)
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert in_ball(x_adv, x, attack.eps, attack.norm)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x), "the attack did not move any input"


@settings(max_examples=25, deadline=None)
@given(
    eps=st.floats(0.0, 2.0),
    norm=st.sampled_from(["linf", "l2"]),
    steps=st.integers(1, 4),
    random_start=st.booleans(),
    n=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_property_ball_and_box(eps, norm, steps, random_start, n, seed):
    shape = (2, 3, 3)
    model = tiny_model(shape, dropout=False)
    x, y = batch(shape, n=n, seed=seed)
    x_adv = PGD(eps, steps=steps, norm=norm, random_start=random_start, seed=seed)(model, x, y)
    assert in_ball(x_adv, x, eps, norm)
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_cnn_on_images():
    model = SmallCNN((1, 8, 8), 10, batchnorm=True)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    x_adv = WorstCaseEnsemble.standard(0.2, steps=3)(model, x, y)
    assert in_ball(x_adv, x, 0.2, "linf") and x_adv.shape == x.shape


# ----------------------------------------------------------------------------- channels-last fast path


def _second_conv_layouts(model: nn.Module) -> list[bool]:
    """Record, for each call, whether the second convolution received channels-last activations."""
    seen: list[bool] = []
    model[3].register_forward_hook(lambda m, inp, out: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    return seen


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_channels_last_path_agrees_with_the_plain_one_and_leaves_the_model_alone(channels, batchnorm):
    torch.manual_seed(0)
    model = SmallCNN((channels, 12, 12), 10, batchnorm=batchnorm)
    seen = _second_conv_layouts(model)
    state = {name: (t.clone(), t.stride(), t.data_ptr()) for name, t in model.state_dict().items()}
    x, y = torch.rand(32, channels, 12, 12), torch.randint(0, 10, (32,))

    fast = PGD(0.2, steps=5, seed=0)(model, x, y)
    assert seen and all(seen), "automatic mode should run a CNN on CPU channels-last"
    seen.clear()
    plain = PGD(0.2, steps=5, seed=0, channels_last=False)(model, x, y)
    assert seen and not any(seen)

    assert fast.shape == x.shape and fast.is_contiguous()
    # The layouts round differently, so a gradient coordinate near zero may change sign; rarely.
    assert (fast != plain).float().mean() < 0.01
    assert in_ball(fast, x, 0.2, "linf")
    for name, t in model.state_dict().items():
        value, stride, ptr = state[name]
        assert torch.equal(t, value) and t.stride() == stride and t.data_ptr() == ptr, name


def test_channels_last_output_keeps_the_inputs_layout():
    torch.manual_seed(0)
    model = SmallCNN((3, 8, 8), 10)
    x = torch.rand(8, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    for attack in (FGSM(0.1), PGD(0.1, steps=2, seed=0)):
        x_adv = attack(model, x, y)
        assert x_adv.is_contiguous(memory_format=torch.channels_last) and in_ball(x_adv, x, 0.1, "linf")


class _ViewNet(nn.Module):
    """A CNN whose forward calls ``.view`` on its activations, which channels-last ones refuse."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        h = self.conv(x).relu()
        return self.fc(h.view(h.shape[0], -1))


def test_model_that_needs_its_own_layout_falls_back_or_raises_when_forced():
    torch.manual_seed(0)
    model = _ViewNet()
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 5, (8,))
    auto = PGD(0.1, steps=3, seed=0)(model, x, y)
    assert torch.equal(auto, PGD(0.1, steps=3, seed=0, channels_last=False)(model, x, y))
    with pytest.raises(RuntimeError, match="view"):
        PGD(0.1, steps=3, seed=0, channels_last=True)(model, x, y)
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- side effects


@pytest.mark.parametrize("attack", all_attacks(), ids=ATTACK_IDS)
def test_restores_modes_requires_grad_and_grads(attack):
    shape = (1, 4, 4)
    model = tiny_model(shape)
    model.train()
    model[-2].eval()  # a mixed state (dropout in eval, the rest training) must come back as it was
    model[1].weight.requires_grad_(False)  # so must a frozen parameter
    x, y = batch(shape)
    F.cross_entropy(model(x), y).backward()
    before = {name: (p.grad.clone() if p.grad is not None else None) for name, p in model.named_parameters()}
    grad_objects = {name: p.grad for name, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]

    attack(model, x, y)

    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for name, p in model.named_parameters():
        assert p.grad is grad_objects[name]
        if before[name] is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, before[name]), name


def test_restores_state_when_the_model_raises():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        PGD(0.1, steps=2)(model, torch.rand(2, 4), torch.tensor([0, 1]))
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_runs_the_model_in_eval_mode():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            seen.append(self.training)
            return self.lin(x)

    model = Spy().train()
    PGD(0.1, steps=3)(model, torch.rand(2, 4), torch.tensor([0, 1]))
    assert seen == [False, False, False] and model.training


@pytest.mark.parametrize("attack", all_attacks(), ids=ATTACK_IDS)
def test_works_inside_no_grad_and_inference_mode(attack):
    shape = (1, 4, 4)
    model = tiny_model(shape)
    x, y = batch(shape)
    expected = attack(model, x, y)
    with torch.no_grad():
        got = attack(model, x, y)
    with torch.inference_mode():
        got_inf = attack(model, x, y)
    if getattr(attack, "seed", 0) is not None:  # seeded (or deterministic): same result in every context
        assert torch.equal(got, expected) and torch.equal(got_inf, expected)
    assert in_ball(got_inf, x, attack.eps, attack.norm)
    assert not got.requires_grad


def test_does_not_touch_global_rng_when_seeded():
    shape = (1, 4, 4)
    model = tiny_model(shape)
    x, y = batch(shape)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    PGD(0.1, steps=2, seed=7)(model, x, y)
    assert torch.equal(torch.rand(3), expected)


# The eps-ball in floating point: x' is in it when |x' - x| <= eps_hat in exact arithmetic, with eps_hat
# the largest number of x's dtype that is <= eps. Checked twice: in float32, as a user would check it,
# and in float64 against the real eps (exact here: both inputs are float32 in [0, 1]).
@settings(max_examples=30, deadline=None)
@given(eps=st.sampled_from([0.1, 0.3, 1 / 255, 8 / 255]) | st.floats(1e-6, 1.0), seed=st.integers(0, 10_000))
@example(eps=0.1, seed=0)  # round-to-nearest of x + 0.1 leaves the float32 ball for half the coordinates
@example(eps=0.3, seed=0)  # float32(0.3) > 0.3: x + float32(eps) leaves the real ball
@example(eps=1 / 255, seed=1)
@example(eps=8 / 255, seed=2)
def test_fgsm_and_linf_pgd_never_leave_the_ball_by_one_ulp(eps, seed):
    shape = (40,)
    model = tiny_model(shape, dropout=False)
    x, y = batch(shape, n=32, seed=seed)
    # the edges of the box and of float32: 0, 1, the float below 1, the smallest subnormal
    x[0, :4] = torch.tensor([0.0, 1.0, float(np.nextafter(np.float32(1), np.float32(0))), 1e-45])
    eps_hat = eps_in_dtype(eps, torch.float32)
    for attack in (FGSM(eps), PGD(eps, steps=2, seed=seed), PGD(eps, steps=2, random_start=False)):
        x_adv = attack(model, x, y)
        assert ((x_adv - x).abs() <= eps_hat).all(), attack
        assert ((x_adv.double() - x.double()).abs() <= eps).all(), attack
        assert x_adv.min() >= 0 and x_adv.max() <= 1


@settings(max_examples=30, deadline=None)
@given(
    eps=st.sampled_from([0.1, 0.3, 1 / 255, 8 / 255]) | st.floats(1e-6, 2.0),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
)
def test_linf_bounds_are_the_exact_ball_rounded_inwards(eps, seed, dtype):
    x = torch.rand(2_000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    x[:3] = torch.tensor([0.0, 1.0, 0.5], dtype=dtype)
    lo, hi = linf_bounds(x, eps)
    assert lo.dtype == hi.dtype == dtype
    eps_hat = eps_in_dtype(eps, dtype)
    # inside: exact for float16/float32 in float64; for float64 inputs the check rounds once
    assert ((hi.double() - x.double()) <= eps_hat).all() and ((x.double() - lo.double()) <= eps_hat).all()
    assert (lo >= 0).all() and (hi <= 1).all() and (lo <= x).all() and (x <= hi).all()
    # and tight: the next number outwards is outside the ball or the box
    up = torch.nextafter(hi, torch.full_like(hi, 2.0))
    down = torch.nextafter(lo, torch.full_like(lo, -1.0))
    if dtype != torch.float64:
        assert ((up.double() - x.double() > eps_hat) | (hi == 1)).all()
        assert ((x.double() - down.double() > eps_hat) | (lo == 0)).all()


# ----------------------------------------------------------------------------- the update rule


def test_pgd_linf_without_random_start_is_the_standard_update():
    shape = (1, 5, 5)
    model = tiny_model(shape, dropout=False).eval()
    x, y = batch(shape, n=12)
    eps, alpha, steps = 0.1, 0.03, 4
    ref = x.clone()
    for _ in range(steps):
        ref.requires_grad_(True)
        F.cross_entropy(model(ref), y).backward()
        ref = torch.clamp(ref.detach() + alpha * ref.grad.sign(), x - eps, x + eps).clamp(0, 1)
    model.zero_grad()
    got = PGD(eps, alpha=alpha, steps=steps, random_start=False)(model, x, y)
    assert torch.allclose(got, ref, atol=1e-7, rtol=0)


def test_pgd_l2_without_random_start_is_the_standard_update():
    shape = (6,)
    model = tiny_model(shape, dropout=False).eval()
    x, y = batch(shape, n=10)
    eps, alpha, steps = 0.3, 0.1, 5
    ref = x.clone()
    for _ in range(steps):
        ref.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(ref), y), ref)
        ref = ref.detach() + alpha * g / g.norm(dim=1, keepdim=True)
        delta = ref - x
        delta = delta * torch.clamp(eps / delta.norm(dim=1, keepdim=True), max=1.0)
        ref = (x + delta).clamp(0, 1)
    got = PGD(eps, alpha=alpha, steps=steps, norm="l2", random_start=False)(model, x, y)
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)


def test_fgsm_is_one_signed_step_of_size_eps():
    shape = (8,)
    model = tiny_model(shape, dropout=False).eval()
    x, y = batch(shape)
    x_ref = x.clone().requires_grad_(True)
    F.cross_entropy(model(x_ref), y).backward()
    expected = (x + 0.2 * x_ref.grad.sign()).clamp(0, 1)
    assert torch.allclose(FGSM(0.2)(model, x, y), expected, atol=1e-7, rtol=0)
    # and it equals PGD with one step of size eps from x
    assert torch.allclose(PGD(0.2, alpha=0.2, steps=1, random_start=False)(model, x, y), expected, atol=1e-7)


def test_eps_zero_returns_x():
    shape = (1, 4, 4)
    model = tiny_model(shape)
    x, y = batch(shape)
    for attack in (FGSM(0.0), PGD(0.0), PGD(0.0, norm="l2", alpha=0.1), WorstCaseEnsemble.standard(0.0, steps=2)):
        out = attack(model, x, y)
        assert torch.equal(out, x)


def test_random_start_is_reproducible():
    shape = (1, 4, 4)
    model = tiny_model(shape)
    x, y = batch(shape)
    a = PGD(0.1, steps=2, seed=3)
    assert torch.equal(a(model, x, y), a(model, x, y))
    assert not torch.equal(a(model, x, y), PGD(0.1, steps=2, seed=4)(model, x, y))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out1 = PGD(0.1, steps=2, generator=g1)(model, x, y)
    out2 = PGD(0.1, steps=2, generator=g2)(model, x, y)
    assert torch.equal(out1, out2)
    assert not torch.equal(PGD(0.1, steps=2, generator=g1)(model, x, y), out1)  # the generator advanced


@pytest.mark.parametrize("device", DEVICES)
def test_follows_the_inputs_device(device):
    shape = (1, 4, 4)
    model = tiny_model(shape).to(device)
    x, y = batch(shape)
    x, y = x.to(device), y.to(device)
    for attack in all_attacks():
        out = attack(model, x, y)
        assert out.device == x.device
        assert in_ball(out, x, attack.eps, attack.norm)
    # a seeded start does not depend on the device
    cpu_model = tiny_model(shape)
    a = PGD(0.1, steps=1, seed=0, alpha=1e-9)
    assert torch.allclose(a(model, x, y).cpu(), a(cpu_model, x.cpu(), y.cpu()), atol=1e-6)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FGSM(-0.1), "eps"),
        (lambda: PGD(-1e-3), "eps"),
        (lambda: PGD(float("nan")), "eps"),
        (lambda: PGD(0.1, steps=0), "steps"),
        (lambda: PGD(0.1, restarts=0), "restarts"),
        (lambda: PGD(0.1, norm="l1"), "norm"),
        (lambda: PGD(0.1, loss="hinge"), "loss"),
        (lambda: PGD(0.1, alpha=0.0), "alpha"),
        (lambda: PGD(0.1, seed=0, generator=torch.Generator()), "seed or generator"),
        (lambda: PGD(0.1, bounds=(1.0, 0.0)), "bounds"),
        (lambda: PGD(0.1, channels_last="yes"), "channels_last"),
        (lambda: FGSM(0.1, channels_last=1), "channels_last"),
        (lambda: WorstCaseEnsemble(()), "at least one"),
        (lambda: WorstCaseEnsemble((PGD(0.1), PGD(0.1, norm="l2"))), "one norm"),
    ],
)
def test_bad_settings_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_data_raises_value_error():
    model = tiny_model((4,))
    attack = PGD(0.1, steps=1)
    x, y = torch.rand(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="bounds"):
        attack(model, x * 3, y)
    with pytest.raises(ValueError, match="agree"):
        attack(model, x, y[:2])
    with pytest.raises(ValueError, match="integer class labels"):
        attack(model, x, y.float())
    with pytest.raises(ValueError, match="floating-point"):
        attack(model, (x * 0).long(), y)
    with pytest.raises(ValueError, match="3 classes"):
        attack_loss(torch.randn(3, 2), torch.tensor([0, 1, 0]), "dlr")


# ----------------------------------------------------------------------------- losses and selection


def test_margin_and_losses():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    m = logit_margin(logits, y)
    assert torch.allclose(m, torch.tensor([-2.0, 2.0]))
    assert ((m > 0) == (logits.argmax(1) != y)).all()
    assert torch.equal(attack_loss(logits, y, "cw"), m)
    assert torch.allclose(attack_loss(logits, y, "ce"), F.cross_entropy(logits, y, reduction="none"))
    dlr = attack_loss(logits, y, "dlr")
    assert torch.allclose(dlr, torch.tensor([-2.0 / 3.0, 2.0 / 2.0]))
    # DLR is invariant to shifting and positively rescaling the logits
    assert torch.allclose(attack_loss(5.0 * logits - 7.0, y, "dlr"), dlr, atol=1e-6)


def test_scaled_scales_eps_and_step():
    a = PGD(0.2, steps=4)
    s = a.scaled(0.5)
    assert s.eps == pytest.approx(0.1) and s.alpha == pytest.approx(a.alpha / 2) and s.steps == 4
    assert FGSM(0.3).scaled(1 / 3).eps == pytest.approx(0.1)
    e = WorstCaseEnsemble.standard(0.2, steps=2).scaled(0.5)
    assert all(m.eps == pytest.approx(0.1) for m in e.attacks) and e.eps == pytest.approx(0.1)


@pytest.fixture(scope="module")
def trained_digits_mlp(digits):
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, hidden=(64,))
    train(model, digits.x_train, digits.y_train, epochs=8, lr=0.1, generator=torch.Generator().manual_seed(0))
    return model


def test_attacks_hurt_a_trained_model_and_pgd_beats_fgsm(trained_digits_mlp, digits):
    model, x, y = trained_digits_mlp, digits.x_test, digits.y_test
    clean = evaluate(model, x, y)["clean_accuracy"]
    fgsm = evaluate(model, x, y, FGSM(0.1))["robust_accuracy"]
    pgd = evaluate(model, x, y, PGD(0.1, steps=20, seed=0))["robust_accuracy"]
    assert clean > 0.9
    assert pgd <= fgsm < clean
    assert evaluate(model, x, y, PGD(0.5, steps=20, seed=0))["robust_accuracy"] < 0.02


def test_restarts_and_ensemble_are_never_weaker(trained_digits_mlp, digits):
    model, x, y = trained_digits_mlp, digits.x_test, digits.y_test

    def fooled(attack):
        with torch.no_grad():
            return logit_margin(model(attack(model, x, y)), y) > 0

    one = fooled(PGD(0.08, steps=5, seed=1))
    three = fooled(PGD(0.08, steps=5, restarts=3, seed=1))
    assert (three | ~one).all(), "an example fooled with one restart must stay fooled with three"
    assert three.sum() >= one.sum()
    first = PGD(0.08, steps=5, restarts=2, seed=2)
    ens = fooled(WorstCaseEnsemble((first, PGD(0.08, steps=5, loss="dlr", seed=3), FGSM(0.08))))
    assert (ens | ~fooled(first)).all() and (ens | ~fooled(FGSM(0.08))).all()
