"""A teaching ensemble: the per-example worst case over a few cheap attacks (chapter ``02``).

It is not AutoAttack (:class:`robustfl_lib.attacks.autoattack.AutoAttack` is).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from .base import InputAttack, _check_bounds, _keep_worst, logit_margin
from .gradient import FGSM, PGD

__all__ = ["WorstCaseEnsemble"]


# --------------------------------------------------------------------------- ensemble


@dataclass(frozen=True)
class WorstCaseEnsemble(InputAttack):
    r"""A teaching ensemble: per example, the worst case over several attacks (and over ``x`` itself).

    The first attack runs on the whole batch; each later one on the examples that no earlier
    attack (nor the clean input) has misclassified. Per example the candidate with the largest
    :func:`logit_margin` ``max_{j != y} z_j - z_y`` is kept, so the ensemble's accuracy is at
    most its first member's (same seed), and at most what any member achieves on its own
    candidates: robust accuracy :math:`\frac1n \sum_i 1[\forall a: f(a(x_i)) = y_i]`.
    Use :meth:`standard` for PGD with restarts on cross-entropy, PGD on the DLR margin loss
    (Croce & Hein 2020) and FGSM.

    What it is not: AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial
    robustness with an ensemble of diverse parameter-free attacks"). It borrows AutoAttack's idea
    (a per-example worst case over diverse attacks, the DLR loss) but has no APGD step-size
    schedule, no targeted attack, no FAB and no black-box Square attack, so it can overestimate
    robustness where AutoAttack does not; :class:`~robustfl_lib.attacks.autoattack.AutoAttack` is
    the book's strongest evaluation. Chapter ``02_adversarial_training`` uses this ensemble to
    teach the per-example worst case; chapters ``09`` and ``13`` evaluated with it.
    """

    attacks: tuple[Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], ...]
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attacks", tuple(self.attacks))
        if not self.attacks:
            raise ValueError("WorstCaseEnsemble needs at least one attack")
        norms = {getattr(a, "norm", None) for a in self.attacks}
        if len(norms) != 1:
            raise ValueError(f"the attacks of an ensemble must share one norm, got {sorted(map(str, norms))}")
        _check_bounds(self.bounds)

    @property
    def eps(self) -> float:  # the largest budget among the members
        return max(float(a.eps) for a in self.attacks)

    @property
    def norm(self) -> str:
        return self.attacks[0].norm

    @classmethod
    def standard(
        cls, eps: float, norm: str = "linf", steps: int = 50, restarts: int = 3, seed: int | None = 0
    ) -> WorstCaseEnsemble:
        """PGD-``steps`` on cross-entropy with ``restarts`` random starts, PGD-``steps`` on DLR,
        and (linf only) FGSM."""
        attacks: list[InputAttack] = [
            PGD(eps, steps=steps, norm=norm, restarts=restarts, seed=seed),
            PGD(eps, steps=steps, norm=norm, loss="dlr", seed=None if seed is None else seed + 1),
        ]
        if norm == "linf":
            attacks.append(FGSM(eps))
        return cls(tuple(attacks))

    def scaled(self, factor: float) -> WorstCaseEnsemble:
        return replace(self, attacks=tuple(a.scaled(factor) for a in self.attacks))

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        best = x.clone()
        with torch.no_grad():
            best_margin = logit_margin(model(x), y)
        for i, attack in enumerate(self.attacks):
            # The first member sees the whole batch, so with the same seed the ensemble is never
            # weaker than it; later members only attack what is still classified correctly.
            todo = torch.arange(len(x), device=x.device) if i == 0 else (best_margin <= 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            _keep_worst(model, best, best_margin, todo, attack(model, x[todo], y[todo]), y)
        return best
