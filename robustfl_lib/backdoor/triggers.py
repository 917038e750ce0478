"""Triggers and the clients that plant them: :class:`PixelTrigger`, :func:`poison`, :class:`BackdoorPoisoning`.

Chapter ``11_exercise_backdoor_detection``.
"""

from __future__ import annotations

import math

import torch

from ..byzantine import DataPoisoning
from ..runtime import make_generator

__all__ = ["PixelTrigger", "poison", "BackdoorPoisoning"]


class PixelTrigger:
    """A ``size`` x ``size`` square of value ``value`` in the bottom-right corner (inset by ``margin``).

    ``trigger(x)`` stamps a batch ``(N, C, H, W)`` (a copy; ``x`` is unchanged).
    """

    def __init__(self, target: int = 0, size: int = 2, value: float = 1.0, margin: int = 0):
        if size < 1 or margin < 0:
            raise ValueError(f"need size >= 1 and margin >= 0, got {size}, {margin}")
        self.target, self.size, self.value, self.margin = int(target), int(size), float(value), int(margin)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"PixelTrigger expects (N, C, H, W) images, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.size + self.margin > min(h, w):
            raise ValueError(f"a {self.size}-pixel trigger with margin {self.margin} does not fit {h}x{w} images")
        out = x.clone()
        r0, c0 = h - self.margin - self.size, w - self.margin - self.size
        out[..., r0 : r0 + self.size, c0 : c0 + self.size] = self.value
        return out

    def __repr__(self) -> str:
        return f"PixelTrigger(target={self.target}, size={self.size}, value={self.value}, margin={self.margin})"


def poison(
    x: torch.Tensor, y: torch.Tensor, trigger: PixelTrigger, fraction: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A backdoor client's training set: ``fraction`` of its samples stamped and relabelled ``trigger.target``.

    The rest stay clean, so the poisoned model keeps its main-task accuracy,
    which is what makes a backdoor hard to notice.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = int(round(fraction * len(x)))
    idx = torch.randperm(len(x), generator=generator)[:k].to(x.device)
    x, y = x.clone(), y.clone()
    x[idx] = trigger(x[idx])
    y[idx] = trigger.target
    return x, y


class BackdoorPoisoning(DataPoisoning):
    r"""Backdoor clients for the FL loop: ``FLConfig(byzantine_attack=BackdoorPoisoning(trigger, fraction, boost))``.

    Each Byzantine client trains honestly on its data with ``fraction`` of it
    stamped by ``trigger`` and relabelled ``trigger.target`` (:func:`poison`),
    then the FL loop multiplies its update :math:`u` by ``boost`` :math:`\gamma`
    before sending it: model replacement (Bagdasaryan et al. 2020). With
    :math:`b` attackers among :math:`n` clients averaged by the mean,
    :math:`\gamma \approx n / b` makes the attackers' share of the aggregate as
    large as the whole honest step, so the backdoor is planted in few rounds.
    ``boost=1`` is plain data poisoning. The samples to poison are drawn from a
    generator seeded by ``seed``, so the same client data is poisoned the same
    way in every round and every run. Chapter ``11_exercise_backdoor_detection``.
    """

    def __init__(self, trigger: PixelTrigger, fraction: float = 0.5, boost: float = 1.0, seed: int = 0):
        if not isinstance(trigger, PixelTrigger):
            raise ValueError(f"trigger must be a PixelTrigger, got {type(trigger).__name__}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if not (math.isfinite(boost) and boost > 0):
            raise ValueError(f"boost must be a finite number > 0, got {boost}")
        self.trigger, self.fraction, self.boost, self.seed = trigger, float(fraction), float(boost), int(seed)

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= self.trigger.target < num_classes:
            raise ValueError(f"trigger target {self.trigger.target} is not a class of a {num_classes}-class task")
        return poison(x, y, self.trigger, self.fraction, make_generator(self.seed))
