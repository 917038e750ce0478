r"""Networks and initialisation for certified training.

* :class:`GowalSmallCNN`: the "small" model of Gowal et al. 2018 ("On the effectiveness of interval
  bound propagation for training verifiably robust models", table 1): ``conv 16 4x4 stride 2 -> ReLU
  -> conv 32 4x4 stride 1 -> ReLU -> linear 100 -> ReLU -> linear classes``, no padding. Small enough
  for IBP training on a CPU (about 1.2 M multiply-adds per MNIST image, an IBP pass twice that).
* :func:`ibp_init`: the IBP initialisation of Shi et al. 2021 ("Fast certified robust training with
  short warmup", NeurIPS). With the default (Kaiming/uniform) initialisation the IBP radius of a
  layer's output is a multiple of its input's that grows with the fan-in, so the bounds explode with
  depth at the start of training and a long eps ramp is needed before the network learns anything
  under the robust loss. For an affine layer with weights :math:`W_{jk} \sim N(0, \sigma^2)` and
  fan-in :math:`n`, the radius maps as :math:`\Delta_j = \sum_k |W_{jk}| \Delta_k`, so
  :math:`E\,\Delta_j = n\,\sigma\sqrt{2/\pi}\,E\,\Delta_k`, and an unstable ReLU passes about half of
  it on; Shi et al. choose

  .. math::  \sigma = \frac{\sqrt{2\pi}}{n}

  so that :math:`E\,\Delta` stays the same from one affine + ReLU block to the next, and set the biases
  to 0. Shi et al. also add BatchNorm and two warm-up regularisers; this library's bounds refuse
  train-mode BatchNorm, so only the initialisation and the short ramp are taken.

Both are used by ``benchmarks/certified.py`` (the MNIST eps 0.3 rows) and taught beside IBP in chapter
``19_certified_linf_robustness``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["GowalSmallCNN", "ibp_init"]


class GowalSmallCNN(nn.Sequential):
    """Gowal et al. 2018's small model for (C, H, W) inputs with H, W >= 10 (module docstring).

    ``channels=(16, 32)`` and ``hidden=100`` are the paper's; chapter ``19_certified_linf_robustness``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32),
                 hidden: int = 100):
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"GowalSmallCNN needs a (C, H, W) input shape, got {tuple(input_shape)}")
        c, h, w = shape
        if h < 10 or w < 10:
            raise ValueError(f"GowalSmallCNN needs H, W >= 10 (a stride-2 and a stride-1 4x4 conv), got {shape}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if len(channels) != 2 or min(channels) < 1 or hidden < 1:
            raise ValueError(f"channels must be two positive widths and hidden >= 1, got {channels}, {hidden}")
        h1, w1 = (h - 4) // 2 + 1, (w - 4) // 2 + 1
        h2, w2 = h1 - 3, w1 - 3
        super().__init__(
            nn.Conv2d(c, channels[0], 4, stride=2), nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], 4, stride=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(channels[1] * h2 * w2, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        self.input_shape = shape
        self.num_classes = num_classes


@torch.no_grad()
def ibp_init(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Shi et al. 2021's IBP initialisation, in place: every ``Linear`` and ``Conv2d`` weight drawn
    from :math:`N(0, (\\sqrt{2\\pi}/n)^2)` with ``n`` its fan-in (``in_features``, or
    ``in_channels / groups * kernel area``), every bias set to 0 (module docstring). Other layers are
    left as they are. Returns ``model``. Chapter ``19_certified_linf_robustness``."""
    found = False
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            std = math.sqrt(2 * math.pi) / fan_in
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator, dtype=m.weight.dtype).to(m.weight.device)
                           * std)
            if m.bias is not None:
                m.bias.zero_()
            found = True
    if not found:
        raise ValueError("ibp_init found no Linear or Conv2d layer in the model")
    return model
