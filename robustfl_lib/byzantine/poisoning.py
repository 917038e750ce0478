"""Attacks on a Byzantine client's training data rather than on its update: :class:`DataPoisoning`
(``poison(x, y, num_classes) -> (x, y)``, after which the client trains honestly) and label
flipping (:class:`LabelFlip`). Chapter ``03_byzantine_threats``.
"""

from __future__ import annotations

import torch

__all__ = ["DataPoisoning", "LabelFlip"]


class DataPoisoning:
    """Base class of attacks on a Byzantine client's training data (not on its update):
    ``attack.poison(x, y, num_classes) -> (x, y)``, after which the client trains
    honestly on the poisoned data."""

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} poisons a client's training data; call .poison(x, y, num_classes), "
            "or pass it to FLConfig(byzantine_attack=...)"
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class LabelFlip(DataPoisoning):
    r"""Label flipping (Tolpegin et al. 2020; Fang et al. 2020): a Byzantine client
    trains on labels :math:`y \mapsto C - 1 - y` (``mapping="reverse"``, default)
    or :math:`y \mapsto (y + 1) \bmod C` (``"shift"``), then sends its honest
    update of that poisoned model. Weaker than update attacks (the update still
    looks like training), and the only attack here that needs no knowledge of
    the other clients. Chapter ``03_byzantine_threats``."""

    def __init__(self, mapping: str = "reverse"):
        if mapping not in ("reverse", "shift"):
            raise ValueError(f"mapping must be 'reverse' or 'shift', got {mapping!r}")
        self.mapping = mapping

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
        flipped = num_classes - 1 - y if self.mapping == "reverse" else (y + 1) % num_classes
        return x, flipped
