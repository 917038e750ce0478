"""AutoAttack (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T and Square in sequence.

The field's standard evaluation of empirical robustness; taught in chapters
``01_adversarial_examples`` and ``02_adversarial_training``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .apgd import APGD
from .base import InputAttack, _check_bounds, _check_eps, _check_norm, _check_seed
from .fab import FAB
from .square import Square

__all__ = ["AutoAttack", "AUTOATTACK_VERSIONS"]

AUTOATTACK_VERSIONS = ("standard", "fast")


@dataclass(frozen=True)
class AutoAttack(InputAttack):
    r"""AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks", ICML): a fixed sequence of attacks, each run on
    the points that all earlier ones left correctly classified.

    ``version="standard"`` is the reference's: APGD-CE (100 steps), APGD-T (targeted DLR, 100
    steps, 9 target classes), FAB-T (100 steps, 9 target classes) and Square (5000 queries), one
    restart each. ``"fast"`` is APGD-CE + APGD-T, the book's CPU budget. Robust accuracy under it is
    :math:`\frac1n \sum_i 1[\forall a: f(a(x_i)) = y_i]`, the per-point worst case over the
    components; like any attack's it is an upper bound on the true robust accuracy. For
    ``norm="l2"`` the standard version runs the same four attacks in their l2 versions.

    ``steps``, ``queries`` and ``n_target_classes`` shrink the budget (defaults: the reference's).
    After each call :attr:`last_info` holds, per component, how many points it broke
    (``"broken"``), how many were left robust after it, and its wall time, plus the clean count:
    the numbers chapters print. Each component is seeded with ``seed`` (default 0) as in the
    reference. Chapters ``01_adversarial_examples`` and ``02_adversarial_training`` evaluate with
    it; it replaces :class:`~robustfl_lib.attacks.ensemble.WorstCaseEnsemble` as the strongest
    evaluation of the book.
    """

    eps: float
    norm: str = "linf"
    version: str = "standard"
    seed: int = 0
    steps: int = 100
    queries: int = 5000
    n_target_classes: int = 9
    bounds: tuple[float, float] = (0.0, 1.0)
    channels_last: bool | None = None
    last_info: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        _check_norm(self.norm)
        _check_bounds(self.bounds)
        _check_seed(self.seed, None)
        if self.seed is None:
            raise TypeError("AutoAttack needs an integer seed")
        if self.version not in AUTOATTACK_VERSIONS:
            raise ValueError(f"unknown AutoAttack version {self.version!r}; choose one of {AUTOATTACK_VERSIONS}")
        self.components()  # validates steps, queries and n_target_classes through the components

    def scaled(self, factor: float) -> AutoAttack:
        return replace(self, eps=self.eps * factor, last_info={})

    def components(self) -> list[tuple[str, InputAttack]]:
        """The attacks in the order they run, with their names."""
        common = dict(norm=self.norm, seed=self.seed, bounds=self.bounds, channels_last=self.channels_last)
        parts: list[tuple[str, InputAttack]] = [
            ("apgd-ce", APGD(self.eps, steps=self.steps, loss="ce", **common)),
            ("apgd-t", APGD(self.eps, steps=self.steps, targeted=True, n_target_classes=self.n_target_classes,
                            **common)),
        ]
        if self.version == "standard":
            parts.append(("fab-t", FAB(self.eps, targeted=True, steps=self.steps,
                                       n_target_classes=self.n_target_classes, **common)))
            parts.append(("square", Square(self.eps, norm=self.norm, queries=self.queries, seed=self.seed,
                                           bounds=self.bounds, channels_last=self.channels_last)))
        return parts

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        info = self.last_info
        info.clear()
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        info["points"] = len(x)
        info["clean"] = int(robust.sum())
        info["components"] = {}
        x_adv = x.clone()
        for name, attack in self.components():
            todo = robust.nonzero().squeeze(1)
            start = time.perf_counter()
            broken = 0
            if todo.numel():
                cand = attack(model, x[todo], y[todo])
                with torch.no_grad():
                    fooled = model(cand).argmax(1) != y[todo]
                x_adv[todo[fooled]] = cand[fooled]
                robust[todo[fooled]] = False
                broken = int(fooled.sum())
            info["components"][name] = {
                "broken": broken, "robust_after": int(robust.sum()), "seconds": time.perf_counter() - start,
            }
        info["robust"] = int(robust.sum())
        return x_adv
