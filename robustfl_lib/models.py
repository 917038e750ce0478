"""Small models sized from a dataset's input shape and class count.

The chapters use :class:`MLP` on 8x8 digits (fast on a laptop CPU) and
:class:`SmallCNN` on 28x28 MNIST. Introduced in chapter ``00_introduction``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "build_model"]


def _check_shape(input_shape: Sequence[int], num_classes: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive dimensions, got {tuple(input_shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return shape


class MLP(nn.Sequential):
    """Flatten, then ``Linear -> ReLU`` per hidden width, then a linear classifier."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 64)):
        shape = _check_shape(input_shape, num_classes)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        self.input_shape = shape
        self.num_classes = num_classes


class SmallCNN(nn.Sequential):
    """Two ``conv3x3 -> [BatchNorm] -> ReLU -> maxpool2`` blocks, then a linear classifier.

    Inputs must be at least 4x4 (two halvings). ``batchnorm=True`` adds
    BatchNorm layers, whose integer ``num_batches_tracked`` buffers are what
    :mod:`robustfl_lib.params` keeps aside.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        batchnorm: bool = False,
    ):
        shape = _check_shape(input_shape, num_classes)
        if len(shape) != 3 or shape[1] < 4 or shape[2] < 4:
            raise ValueError(f"SmallCNN needs (C, H, W) inputs with H, W >= 4, got {shape}")
        c, h, w = shape
        layers: list[nn.Module] = []
        for out in channels[:2]:
            layers.append(nn.Conv2d(c, out, 3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(out))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, num_classes)]
        super().__init__(*layers)
        self.input_shape = shape
        self.num_classes = num_classes


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """``build_model("mlp" | "cnn", input_shape, num_classes, **kwargs)``."""
    builders = {"mlp": MLP, "cnn": SmallCNN}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(builders)}")
    return builders[name](input_shape, num_classes, **kwargs)
