"""Models sized from a dataset's input shape and class count.

The chapters use :class:`MLP` on 8x8 digits (fast on a laptop CPU) and :class:`SmallCNN` on
28x28 MNIST, introduced in chapter ``00_introduction``. For CIFAR-10 (3x32x32) there are
:class:`CifarCNN`, a VGG-style network, and :class:`ResNet` (He et al. 2016): ResNet-8/20/...
of the CIFAR family or a ResNet-18-style network; no chapter uses them yet (they are for runs
at the literature's scale, ``tests/test_models.py`` checks them).

Normalisation layers and federated learning: ``norm="batch"`` (BatchNorm, Ioffe & Szegedy
2015) gives each such layer float buffers (``running_mean``, ``running_var``) and an integer
one (``num_batches_tracked``). The federated loop aggregates the float buffers with the
parameters, by the same robust rule, and keeps the integer one aside
(:mod:`robustfl_lib.params` says why); such models train client by client, not in the
vectorized path.

``bn_momentum`` is BatchNorm's ``momentum`` :math:`m`: each training batch moves a running
statistic a fraction :math:`m` of the way to the batch's value, so a round of :math:`b` local
batches moves the global model's statistics only a fraction :math:`1 - (1 - m)^b` of the way
(34 % for PyTorch's default 0.1 and 4 batches), and in eval mode the global model normalises
with statistics of older weights. ``bn_momentum=None`` makes the running statistics the plain
average over the batches seen since ``num_batches_tracked`` was 0; as the federated loop keeps
the global model's counter at 0, that is the average over the client's batches of this round:
statistics of this round's weights (``FLConfig(model="resnet8", model_kwargs={"bn_momentum":
None})``). Outside federated learning it averages over all of training, so the default stays 0.1.

``norm="group"`` (GroupNorm, Wu & He 2018) has no buffers and no dependence on the batch, the
choice Hsieh et al. 2020 recommend for non-IID clients, and runs vectorized.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "CifarCNN", "ResNet", "NORMS", "build_model"]

#: The normalisation layers the CIFAR models accept.
NORMS = ("batch", "group", "none")


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


def _norm(kind: str, channels: int, bn_momentum: float | None = 0.1) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=bn_momentum)
    if kind == "group":
        # Groups of (up to) 8 channels: 2 groups at 16 channels, 64 at 512 (Wu & He use 32 groups at >= 64).
        return nn.GroupNorm(max(1, channels // 8) if channels % 8 == 0 else 1, channels)
    return nn.Identity()


def _check_norm(norm: str, bn_momentum: float | None = 0.1) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if bn_momentum is not None and (isinstance(bn_momentum, bool) or not isinstance(bn_momentum, (int, float))
                                    or not 0 < bn_momentum <= 1):
        raise ValueError(f"bn_momentum must be in (0, 1] or None (cumulative average), got {bn_momentum!r}")
    return norm


def _check_image(shape: tuple[int, ...], halvings: int, who: str) -> tuple[int, int, int]:
    side = 2 ** halvings
    if len(shape) != 3 or shape[1] < side or shape[2] < side:
        raise ValueError(f"{who} needs (C, H, W) inputs with H, W >= {side} ({halvings} halvings), got {shape}")
    return shape  # type: ignore[return-value]


class CifarCNN(nn.Sequential):
    """A VGG-style CNN (Simonyan & Zisserman 2015) for 32x32 colour images such as CIFAR-10.

    Per width ``c`` in ``channels``: ``conv3x3(c) -> norm -> ReLU -> conv3x3(c) -> norm ->
    ReLU -> maxpool2``; then ``Flatten -> Linear(hidden) -> ReLU -> Linear(num_classes)``.
    With the defaults, (32, 64, 128) and hidden 256, it has 0.8 M parameters for CIFAR-10
    (1.3 M with ``hidden=512``). Inputs must be at least ``2 ** len(channels)`` pixels on a side.
    ``norm``: ``"batch"`` (default), ``"group"`` or ``"none"``; ``bn_momentum``: BatchNorm's
    momentum, ``None`` for a cumulative average (the module docstring says what federated
    training does with BatchNorm's buffers and when ``None`` helps)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        norm: str = "batch",
        bn_momentum: float | None = 0.1,
    ):
        shape = _check_shape(input_shape, num_classes)
        norm = _check_norm(norm, bn_momentum)
        if not channels or any(int(c) < 1 for c in channels) or hidden < 1:
            raise ValueError(f"channels must be positive widths and hidden >= 1, got {tuple(channels)}, {hidden}")
        c, h, w = _check_image(shape, len(channels), "CifarCNN")
        layers: list[nn.Module] = []
        for out in channels:
            for _ in range(2):
                # A conv followed by a normalisation needs no bias: the norm's shift replaces it.
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=norm == "none"), _norm(norm, out, bn_momentum), nn.ReLU()]
                c = out
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        super().__init__(*layers)
        self.input_shape = shape
        self.num_classes = num_classes


class _BasicBlock(nn.Module):
    """``x -> conv3x3 -> norm -> ReLU -> conv3x3 -> norm, + shortcut(x), -> ReLU`` (He et al. 2016);
    the shortcut is a strided 1x1 conv with a norm where the shape changes (their option B)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, bn_momentum: float | None):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(norm, cout, bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, cout, bn_momentum)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=bias),
                                       _norm(norm, cout, bn_momentum))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A residual network of basic blocks (He et al. 2016), sized from the input shape.

    ``conv3x3(widths[0]) -> norm -> ReLU``, then stage ``s`` holds ``blocks[s]`` basic blocks
    of width ``widths[s]`` (the first block of every stage after the first halves the
    resolution), then global average pooling and a linear classifier. Counting the convolutions
    on the main path and the classifier, the depth is ``2 * sum(blocks) + 2``.

    ``depth`` picks a standard shape when ``blocks`` is not given:

    * ``depth = 6n + 2`` (8, 14, 20, 32, 44, 56, 110): the CIFAR family of He et al.'s
      section 4.2, three stages of ``n`` blocks, widths (16, 32, 64). ResNet-8 (n = 1) has
      78 k parameters for CIFAR-10, ResNet-20 (n = 3) 0.27 M.
    * ``depth = 18``: ResNet-18's four stages of two blocks, widths (64, 128, 256, 512), with
      a 3x3 stem and no max-pool (the usual CIFAR adaptation of the ImageNet network), 11.2 M
      parameters for CIFAR-10.

    Global average pooling makes the classifier independent of the image size; inputs must be
    at least ``2 ** (len(blocks) - 1)`` pixels on a side. ``norm``: ``"batch"`` (default, as in
    the paper), ``"group"`` or ``"none"``; ``bn_momentum``: BatchNorm's momentum, ``None`` for a
    cumulative average (see the module docstring for BatchNorm in federated learning)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 8,
        blocks: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        norm: str = "batch",
        bn_momentum: float | None = 0.1,
    ):
        super().__init__()
        shape = _check_shape(input_shape, num_classes)
        norm = _check_norm(norm, bn_momentum)
        if blocks is None:
            if isinstance(depth, bool) or not isinstance(depth, int):
                raise ValueError(f"depth must be an integer, got {depth!r}")
            if depth == 18:
                blocks, default_widths = (2, 2, 2, 2), (64, 128, 256, 512)
            elif depth >= 8 and (depth - 2) % 6 == 0:
                n = (depth - 2) // 6
                blocks, default_widths = (n, n, n), (16, 32, 64)
            else:
                raise ValueError(f"depth must be 6n + 2 (8, 14, 20, ...: the CIFAR ResNets) or 18, got {depth}; "
                                 "pass blocks= for another shape")
            widths = default_widths if widths is None else widths
        blocks, widths = tuple(int(b) for b in blocks), tuple(int(w) for w in (widths or ()))
        if not blocks or any(b < 1 for b in blocks) or len(widths) != len(blocks) or any(w < 1 for w in widths):
            raise ValueError(f"blocks and widths must be positive and of equal length, got {blocks}, {widths}")
        c = _check_image(shape, len(blocks) - 1, "ResNet")[0]
        self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 3, padding=1, bias=norm == "none"),
                                  _norm(norm, widths[0], bn_momentum), nn.ReLU())
        stages, cin = [], widths[0]
        for s, (count, width) in enumerate(zip(blocks, widths)):
            layers = [_BasicBlock(cin if i == 0 else width, width, 2 if s > 0 and i == 0 else 1, norm, bn_momentum)
                      for i in range(count)]
            stages.append(nn.Sequential(*layers))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        self.input_shape = shape
        self.num_classes = num_classes
        self.blocks, self.widths, self.depth = blocks, widths, 2 * sum(blocks) + 2
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He et al.'s initialisation for ReLU networks
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """``build_model(name, input_shape, num_classes, **kwargs)`` for the names an
    :class:`~robustfl_lib.federated.FLConfig` gives: ``"mlp"``, ``"cnn"`` (:class:`SmallCNN`),
    ``"cifar_cnn"`` (:class:`CifarCNN`), ``"resnet8"``, ``"resnet20"``, ``"resnet18"``
    (:class:`ResNet` of that depth; ``"resnet"`` takes ``depth=`` or ``blocks=``). ``kwargs``
    reach the builder (``FLConfig.model_kwargs``)."""
    builders = {"mlp": MLP, "cnn": SmallCNN, "cifar_cnn": CifarCNN, "resnet": ResNet,
                "resnet8": functools.partial(ResNet, depth=8), "resnet20": functools.partial(ResNet, depth=20),
                "resnet18": functools.partial(ResNet, depth=18)}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(builders)}")
    return builders[name](input_shape, num_classes, **kwargs)
