"""Shared checks of the input-attack contract for the AutoAttack family (APGD, FAB, Square, AutoAttack).

Imported by test_apgd.py, test_fab_square.py and test_autoattack.py (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustfl_lib import MLP, load_dataset, train


def tiny_model(d: int = 16, classes: int = 5, seed: int = 0, dropout: bool = True) -> nn.Module:
    """A small MLP with a dropout layer, so that train/eval mode matters."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(d, 24), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(24, classes))
    return nn.Sequential(*layers)


def batch(shape: tuple[int, ...], n: int = 12, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


def in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> bool:
    """Exact in float64: linf ``|x_adv - x| <= eps`` per coordinate; l2 up to the rounding of a norm."""
    delta = (x_adv.double() - x.double()).flatten(1)
    if norm == "linf":
        return bool((delta.abs() <= eps).all())
    return bool((delta.norm(dim=1) <= eps * (1 + 1e-5)).all())


def check_contract(attack, shape: tuple[int, ...] = (1, 4, 4), classes: int = 5) -> torch.Tensor:
    """Ball, bounds, restored mode/flags/grads, determinism and no_grad for one attack; returns x_adv."""
    d = 1
    for s in shape:
        d *= s
    model = tiny_model(d, classes)
    model.train()
    model[-2].eval()  # a mixed state must come back as it was
    model[1].weight.requires_grad_(False)
    x, y = batch(shape, classes=classes)
    F.cross_entropy(model(x), y).backward()
    grads = {name: (p.grad.clone() if p.grad is not None else None) for name, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]

    x_adv = attack(model, x, y)

    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert in_ball(x_adv, x, attack.eps, attack.norm)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for name, p in model.named_parameters():
        assert (p.grad is None) == (grads[name] is None)
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name]), name
    # Seeded: the same call gives the same numbers, also inside no_grad.
    assert torch.equal(attack(model, x, y), x_adv)
    with torch.no_grad():
        assert torch.equal(attack(model, x, y), x_adv)
    return x_adv


_DIGITS: dict[str, object] = {}


def digits_model():
    """A 64-32-10 MLP trained 6 epochs on the digits training split (about a second), and the data."""
    if "model" not in _DIGITS:
        data = load_dataset("digits", seed=0)
        torch.manual_seed(0)
        model = MLP(data.input_shape, 10, hidden=(32,))
        train(model, data.x_train, data.y_train, epochs=6, lr=0.1, generator=torch.Generator().manual_seed(0))
        model.eval()
        _DIGITS.update(model=model, data=data)
    return _DIGITS["model"], _DIGITS["data"]


def robust_count(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x_adv).argmax(1) == y).sum())
