"""train, adversarial_train and evaluate: objectives, warm-up, reproducibility, devices, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustfl_lib import (
    FGSM,
    MLP,
    PGD,
    SmallCNN,
    adversarial_train,
    evaluate,
    load_dataset,
    train,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fresh_mlp(seed: int = 0, shape=(1, 8, 8), hidden=(32,)) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(shape, 10, hidden=hidden)


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


class Invert:
    """A deterministic stand-in for an attack, ``x -> 1 - x``, that records the budgets it was scaled to."""

    def __init__(self, eps: float = 1.0, log: list | None = None):
        self.eps, self.log = eps, log if log is not None else []

    def __call__(self, model, x, y):
        self.log.append(self.eps)
        return 1.0 - x

    def scaled(self, factor: float) -> Invert:
        return Invert(self.eps * factor, self.log)


@pytest.fixture(scope="module")
def small(digits):
    return digits.x_train[:256], digits.y_train[:256]


# ----------------------------------------------------------------------------- the objective


def test_mix_zero_is_standard_training(small):
    x, y = small
    a, b = fresh_mlp(), fresh_mlp()
    la = train(a, x, y, epochs=2, lr=0.1, generator=gen())
    lb = adversarial_train(b, x, y, PGD(0.1, steps=2, seed=0), epochs=2, mix=0.0, lr=0.1, generator=gen())
    assert la == lb and same_params(a, b)


def test_mix_one_trains_on_the_adversarial_inputs_only(small):
    x, y = small
    a, b = fresh_mlp(), fresh_mlp()
    train(a, 1.0 - x, y, epochs=2, lr=0.1, generator=gen())
    adversarial_train(b, x, y, Invert(), epochs=2, mix=1.0, lr=0.1, generator=gen())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("mix", [0.5, 0.25])
def test_mix_weights_clean_and_adversarial_losses(small, mix):
    x, y = small
    a, b = fresh_mlp(), fresh_mlp()

    def mixed(m, xb, yb):
        return (1 - mix) * F.cross_entropy(m(xb), yb) + mix * F.cross_entropy(m(1.0 - xb), yb)

    la = train(a, x, y, epochs=2, lr=0.1, generator=gen(), loss_fn=mixed)
    lb = adversarial_train(b, x, y, Invert(), epochs=2, mix=mix, lr=0.1, generator=gen())
    assert la == pytest.approx(lb, rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_eps_warm_up_ramps_linearly_then_holds(small):
    x, y = small  # 256 samples, batch 64: 4 batches per epoch
    log: list[float] = []
    adversarial_train(fresh_mlp(), x, y, Invert(0.3, log), epochs=3, batch_size=64, warmup_epochs=2, generator=gen())
    assert len(log) == 12
    expected = [0.3 * k / 8 for k in range(1, 8)] + [0.3] * 5
    assert log == pytest.approx(expected)
    log.clear()
    adversarial_train(fresh_mlp(), x, y, Invert(0.3, log), epochs=1, batch_size=64, generator=gen())
    assert log == [0.3] * 4


def test_adversarial_training_is_reproducible(small):
    x, y = small
    runs = []
    for _ in range(2):
        model = fresh_mlp()
        adversarial_train(model, x, y, PGD(0.1, steps=2, generator=gen(1)), epochs=1, generator=gen(2))
        runs.append(model)
    assert same_params(*runs)
    other = fresh_mlp()
    adversarial_train(other, x, y, PGD(0.1, steps=2, generator=gen(9)), epochs=1, generator=gen(2))
    assert not same_params(runs[0], other)


def test_adversarial_training_buys_robustness(digits):
    """A few epochs of PGD training at eps=0.1 already beat standard training under PGD at 0.1."""
    x, y = digits.x_train, digits.y_train
    std, adv = fresh_mlp(hidden=(64,)), fresh_mlp(hidden=(64,))
    opt = dict(epochs=25, lr=0.05, momentum=0.9, generator=gen())
    train(std, x, y, **opt)
    adversarial_train(adv, x, y, PGD(0.1, steps=3, generator=gen(1)), mix=1.0, **opt)
    attack = PGD(0.1, steps=10, seed=0)
    r_std = evaluate(std, digits.x_test, digits.y_test, attack)
    r_adv = evaluate(adv, digits.x_test, digits.y_test, attack)
    assert r_adv["robust_accuracy"] > r_std["robust_accuracy"] + 0.15, (r_std, r_adv)
    assert r_adv["clean_accuracy"] > 0.85


def test_attack_sees_eval_mode_and_training_resumes_in_train_mode(small):
    x, y = small
    modes = []

    def spy(model, xb, yb):
        modes.append(model.training)
        return xb

    model = fresh_mlp()
    adversarial_train(model, x, y, spy, epochs=1, batch_size=128, generator=gen())
    assert modes == [True, True]  # a plain callable is called as is; PGD/FGSM switch to eval themselves
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = fresh_mlp()

        def forward(self, xb):
            seen.append(self.training)
            return self.body(xb)

    m = Spy()
    adversarial_train(m, x, y, PGD(0.1, steps=2), epochs=1, batch_size=128, mix=1.0, generator=gen())
    # per batch: two attack steps in eval mode, then the training forward in train mode
    assert seen == [False, False, True] * 2 and m.training


def test_cosine_schedule(small):
    x, y = small

    def linear_loss(m, xb, yb):  # d loss / d w = 1 for every weight, whatever the batch
        return m.weight.sum()

    for schedule, expected in [("constant", -2 * 0.1), ("cosine", -(0.1 + 0.05))]:
        model = nn.Linear(64, 1, bias=False)
        nn.init.zeros_(model.weight)
        train(model, x.flatten(1), y, epochs=1, lr=0.1, batch_size=128, generator=gen(), loss_fn=linear_loss,
              lr_schedule=schedule)
        assert torch.allclose(model.weight, torch.full_like(model.weight, expected)), schedule


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_counts_robust_only_when_clean_is_right():
    model = nn.Identity()  # logits = inputs: class = argmax of the 3 features
    x = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.0, 0.1, 0.9], [0.9, 0.0, 0.1]])
    y = torch.tensor([0, 1, 1, 2])  # the last two are misclassified

    def perfect(m, xb, yb):  # "attack" that makes every input correctly classified
        return F.one_hot(yb, 3).float()

    out = evaluate(model, x, y, perfect, batch_size=3)
    assert out == {"clean_accuracy": 0.5, "robust_accuracy": 0.5}
    assert evaluate(model, x, y) == {"clean_accuracy": 0.5, "robust_accuracy": None}


def test_evaluate_inside_no_grad_restores_mode(digits):
    model = fresh_mlp().train()
    with torch.no_grad():
        out = evaluate(model, digits.x_test, digits.y_test, PGD(0.1, steps=3, seed=0), batch_size=100)
    assert model.training
    assert 0 <= out["robust_accuracy"] <= out["clean_accuracy"] <= 1


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments(small):
    x, y = small
    model = fresh_mlp()
    with pytest.raises(ValueError, match="mix"):
        adversarial_train(model, x, y, FGSM(0.1), mix=1.5)
    with pytest.raises(ValueError, match="warmup_epochs"):
        adversarial_train(model, x, y, FGSM(0.1), warmup_epochs=-1)
    with pytest.raises(TypeError, match="scaled"):
        adversarial_train(model, x, y, lambda m, xb, yb: xb, warmup_epochs=1)
    with pytest.raises(ValueError, match="lr_schedule"):
        train(model, x, y, lr_schedule="step")
    with pytest.raises(ValueError, match="samples"):
        adversarial_train(model, x, y[:-1], FGSM(0.1))


# ----------------------------------------------------------------------------- devices and real data


@pytest.mark.parametrize("device", DEVICES)
def test_trains_a_model_on_its_device_from_cpu_tensors(small, device):
    x, y = small
    model = fresh_mlp().to(device)
    losses = adversarial_train(model, x, y, PGD(0.1, steps=2, seed=0), epochs=2, warmup_epochs=1, generator=gen())
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert next(model.parameters()).device.type == torch.device(device).type
    out = evaluate(model, x, y, PGD(0.1, steps=2, seed=0))
    assert 0 <= out["robust_accuracy"] <= out["clean_accuracy"]


def test_real_mnist_standard_cnn_is_fooled(mnist_dir):
    """On the real MNIST files: a CNN trained for one epoch is accurate, and PGD breaks it where FGSM
    does less (a few seconds on a laptop CPU)."""
    data = load_dataset("mnist", root=mnist_dir, files="t10k", test_fraction=0.2)
    assert len(data.x_train) == 8000 and len(data.x_test) == 2000
    torch.manual_seed(0)
    model = SmallCNN(data.input_shape, 10)
    train(model, data.x_train[:4000], data.y_train[:4000], epochs=1, lr=0.05, momentum=0.9, batch_size=64,
          generator=gen())
    x, y = data.x_test[:400], data.y_test[:400]
    fgsm = evaluate(model, x, y, FGSM(0.3))
    pgd = evaluate(model, x, y, PGD(0.3, steps=20, seed=0))
    assert fgsm["clean_accuracy"] > 0.85
    assert pgd["robust_accuracy"] < fgsm["robust_accuracy"]
    assert pgd["robust_accuracy"] < 0.05
