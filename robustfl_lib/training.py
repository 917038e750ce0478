"""Training and evaluation loops on tensors.

* :func:`train`: minibatch SGD on cross-entropy (chapter ``00_introduction``).
* :func:`evaluate`: clean accuracy, and robust accuracy under an input attack
  (chapter ``01_adversarial_examples``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["train", "evaluate", "accuracy", "iterate_minibatches"]


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch tensors")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("x and y are empty")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"y must hold integer class labels, got {y.dtype}")


def iterate_minibatches(n: int, batch_size: int, generator: torch.Generator | None, shuffle: bool = True):
    """Yield index tensors of at most ``batch_size`` covering ``range(n)`` once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    yield from order.split(batch_size)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 1,
    lr: float = 0.1,
    batch_size: int = 32,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """Train ``model`` in place with minibatch SGD; return the mean loss of each epoch.

    ``x`` and ``y`` are moved to the model's device batch by batch, so a CPU
    dataset trains a CUDA model unchanged. ``generator`` fixes the shuffling.
    ``loss_fn(model, xb, yb)`` replaces the cross-entropy (adversarial training
    plugs in here).
    """
    _check_xy(x, y)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    device = _model_device(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = loss_fn or (lambda m, xb, yb: F.cross_entropy(m(xb), yb))
    model.train()
    losses = []
    for _ in tqdm(range(epochs), desc="train", unit="epoch", disable=not progress, leave=False):
        total, count = 0.0, 0
        for idx in iterate_minibatches(len(x), batch_size, generator):
            xb, yb = x[idx.to(x.device)].to(device), y[idx.to(y.device)].to(device)
            loss = loss_fn(model, xb, yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (eval mode, restored after)."""
    _check_xy(x, y)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        correct += (model(xb).argmax(dim=1) == yb).sum().item()
    model.train(was_training)
    return correct / len(x)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Clean accuracy, and with ``attack`` the accuracy on ``attack(model, x, y)``.

    Returns ``{"clean_accuracy": ..., "robust_accuracy": ...}``; the robust
    entry is ``None`` without an attack. Evaluate on held-out data.
    """
    out: dict[str, float] = {"clean_accuracy": accuracy(model, x, y, batch_size), "robust_accuracy": None}
    if attack is not None:
        device = _model_device(model)
        advs = []
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            advs.append(attack(model, xb, yb))
        out["robust_accuracy"] = accuracy(model, torch.cat(advs), y.to(device), batch_size)
    return out
