"""Auto-PGD (Croce & Hein 2020): PGD with momentum and a step size that adapts per example.

Taught in chapter ``01_adversarial_examples`` (why a fixed step size makes PGD overestimate
robustness) and used by :class:`robustfl_lib.attacks.autoattack.AutoAttack`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .base import (
    ATTACK_LOSSES,
    Forward,
    InputAttack,
    _check_bounds,
    _check_channels_last,
    _check_eps,
    _check_int,
    _check_norm,
    _check_seed,
    _draw,
    _generator,
    _keep_worst,
    _l2_norms,
    _per_example,
    _project_l2,
    attack_loss,
    linf_bounds,
    logit_margin,
    targeted_dlr_loss,
)

__all__ = ["APGD", "apgd_checkpoints"]


def apgd_checkpoints(steps: int) -> list[int]:
    r"""The iterations after which APGD checks its step size, :math:`w_j \approx p_j N` for
    ``N = steps`` with :math:`p_0 = 0`, :math:`p_1 = 0.22` and
    :math:`p_{j+1} = p_j + \max(p_j - p_{j-1} - 0.03, 0.06)` (Croce & Hein 2020, section 3.2).

    In integers, as the reference implementation counts them: the first period is
    ``max(int(0.22 N), 1)`` iterations, each next one ``max(int(0.03 N), 1)`` shorter, never
    shorter than ``max(int(0.06 N), 1)``; for ``N = 100``: 22, 41, 57, 70, 80, 87, 93, 99.
    """
    _check_int("steps", steps, 1)
    period = max(int(0.22 * steps), 1)
    shrink, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, at = [], period
    while at <= steps:
        points.append(at)
        period = max(period - shrink, shortest)
        at += period
    return points


def _halve(
    increases: torch.Tensor, period: int, rho: float, reduced_last: torch.Tensor, best_last: torch.Tensor,
    best_now: torch.Tensor,
) -> torch.Tensor:
    """Per example, whether APGD halves its step size at a checkpoint (Croce & Hein 2020, eq. 2-3).

    Condition 1: the loss went up in at most ``rho * period`` of the period's steps (the
    reference's ``<=``; the paper writes ``<``, the same for periods where ``rho * period`` is not
    an integer). Condition 2: the step size was not halved at the previous checkpoint and the
    best loss has not improved since it.
    """
    return (increases <= rho * period) | (~reduced_last & (best_last >= best_now))


@dataclass(frozen=True)
class APGD(InputAttack):
    r"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks", ICML), linf or l2; APGD-CE, APGD-DLR and, with
    ``targeted=True``, APGD-T.

    From a random point :math:`x^{(0)}` of the ball (linf: a corner-scaled uniform draw, l2: a
    point of the sphere), with :math:`P` the projection onto ball and box and
    :math:`\eta^{(0)} = 2\epsilon` per example:

    .. math::

        z^{(k+1)} &= P\big(x^{(k)} + \eta^{(k)} s(\nabla L(x^{(k)}))\big), \\
        x^{(k+1)} &= P\big(x^{(k)} + \alpha (z^{(k+1)} - x^{(k)}) + (1 - \alpha)(x^{(k)} - x^{(k-1)})\big),

    with :math:`s` the sign (linf) or the normalized gradient (l2), momentum :math:`\alpha = 0.75`
    (1 for the first step). At each checkpoint :math:`w_j` (:func:`apgd_checkpoints`) the step
    size of an example is halved, and it restarts from its best point so far, when the loss went up
    in at most :math:`\rho = 0.75` of the period's steps, or when its step size was not halved at
    the previous checkpoint and its best loss has not improved since.

    ``loss``: ``"ce"`` (default) or ``"dlr"`` (:func:`~robustfl_lib.attacks.base.attack_loss`;
    ``"cw"`` too) untargeted; with ``targeted=True``, ``"dlr"`` (default: the targeted DLR loss
    :func:`~robustfl_lib.attacks.base.targeted_dlr_loss`, APGD-T) or ``"ce"`` (minus the
    cross-entropy of the target), run once per target: the 2nd, 3rd, ... most likely class on the
    clean input, ``n_target_classes`` of them (at most ``C - 1``). Every run (each target, each of
    ``restarts``) attacks only the points that no earlier run has misclassified, as the reference.
    Per example the result is the first misclassified iterate found, else the point with the
    largest logit margin over all runs. Points leave a run as soon as they are misclassified (the
    others' iterates are unchanged by that; it only saves work).

    Randomness: ``seed`` (default 0) seeds a fresh generator per call; or pass ``generator``; with
    ``seed=None`` and no generator the global RNG is used. Taught in chapter
    ``01_adversarial_examples``; :class:`robustfl_lib.attacks.autoattack.AutoAttack` runs it.
    """

    eps: float
    norm: str = "linf"
    steps: int = 100
    restarts: int = 1
    loss: str | None = None
    targeted: bool = False
    n_target_classes: int = 9
    rho: float = 0.75
    seed: int | None = 0
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    bounds: tuple[float, float] = (0.0, 1.0)
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        _check_norm(self.norm)
        _check_bounds(self.bounds)
        _check_channels_last(self.channels_last)
        _check_int("steps", self.steps, 1)
        _check_int("restarts", self.restarts, 1)
        _check_int("n_target_classes", self.n_target_classes, 1)
        _check_seed(self.seed, self.generator)
        if not isinstance(self.targeted, bool):
            raise TypeError(f"targeted must be True or False, got {self.targeted!r}")
        if not (isinstance(self.rho, (int, float)) and 0 < self.rho < 1):
            raise ValueError(f"rho must be in (0, 1), got {self.rho!r}")
        if self.loss is None:
            object.__setattr__(self, "loss", "dlr" if self.targeted else "ce")
        allowed = ("ce", "dlr") if self.targeted else ATTACK_LOSSES
        if self.loss not in allowed:
            kind = "targeted" if self.targeted else "untargeted"
            raise ValueError(f"unknown {kind} APGD loss {self.loss!r}; choose one of {allowed}")

    def scaled(self, factor: float) -> APGD:
        return replace(self, eps=self.eps * factor)

    # -- the loss of one run
    def _loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        if target is None:
            return attack_loss(logits, y, self.loss)
        if self.loss == "dlr":
            return targeted_dlr_loss(logits, y, target)
        return -F.cross_entropy(logits, target, reduction="none")

    def _attack(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = _generator(self.seed, self.generator)
        with torch.no_grad():
            logits = forward(x)
        if self.targeted and logits.shape[1] < 4 and self.loss == "dlr":
            raise ValueError(f"APGD-T's targeted DLR loss needs at least 4 classes, got {logits.shape[1]}")
        targets: list[torch.Tensor | None] = [None]
        if self.targeted:
            ranked = logits.argsort(dim=1, descending=True)
            targets = [ranked[:, r] for r in range(1, min(self.n_target_classes, logits.shape[1] - 1) + 1)]
        best = x.clone()
        best_margin = logit_margin(logits, y)
        for target in targets:
            for _ in range(self.restarts):
                todo = (best_margin <= 0).nonzero().squeeze(1)
                if todo.numel() == 0:
                    return best
                t = None if target is None else target[todo]
                _keep_worst(forward, best, best_margin, todo, self._run(forward, x[todo], y[todo], t, gen), y)
        return best

    # -- one run on a batch, every example with its own step size and checkpoints
    def _run(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
        gen: torch.Generator | None,
    ) -> torch.Tensor:
        eps, linf = self.eps, self.norm == "linf"
        if linf:
            lo, hi = linf_bounds(x, eps, self.bounds)
            t = _draw("uniform", x.shape, x, gen).mul_(2).sub_(1)
            x_adv = (x + eps * t / _per_example(t.flatten(1).abs().amax(1).clamp_min(1e-12), x)).clamp_(lo, hi)
        else:
            lo = hi = x  # unused for l2; kept so the state can be compacted alike
            t = _draw("normal", x.shape, x, gen)
            x_adv = (x + eps * t / _per_example(_l2_norms(t).clamp_min(1e-12), x)).clamp_(*self.bounds)

        def project(v: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
            return v.clamp_(lo, hi) if linf else _project_l2(v, x, eps, self.bounds)

        def value_and_grad(
            point: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            point = point.detach().requires_grad_(True)
            logits = forward(point)
            value = self._loss(logits, y, target)
            (grad,) = torch.autograd.grad(value.sum(), point)
            return logits.detach(), value.detach(), grad

        n = x.shape[0]
        out = torch.empty_like(x)
        idx = torch.arange(n, device=x.device)
        logits, value, grad = value_and_grad(x_adv, y, target)
        # Per-example state; rows leave it when their example is misclassified.
        s: dict[str, torch.Tensor | None] = {
            "x": x, "lo": lo, "hi": hi, "y": y, "target": target, "idx": idx, "x_adv": x_adv,
            "x_prev": x_adv.clone(), "grad": grad, "loss_prev": value, "x_best": x_adv.clone(),
            "grad_best": grad.clone(), "loss_best": value.clone(),
            "step": torch.full((n,), 2.0 * eps, dtype=x.dtype, device=x.device),
            "increases": torch.zeros(n, dtype=torch.long, device=x.device),
            "reduced_last": torch.ones(n, dtype=torch.bool, device=x.device),
            "best_last": value.clone(),
        }

        def leave(fooled: torch.Tensor) -> None:
            """Record the misclassified iterates and drop their rows from the state."""
            if not bool(fooled.any()):
                return
            out[s["idx"][fooled]] = s["x_adv"][fooled]
            keep = ~fooled
            for key, v in s.items():
                if v is not None:
                    s[key] = v[keep]

        leave(logits.argmax(1) != y)
        checkpoints = set(apgd_checkpoints(self.steps))
        previous_checkpoint = 0
        for i in range(self.steps):
            if s["idx"].numel() == 0:
                break
            with torch.no_grad():
                xa, xs = s["x_adv"], s["x"]
                step = _per_example(s["step"], xa)
                direction = s["grad"].sign() if linf else s["grad"] / _per_example(
                    _l2_norms(s["grad"]) + 1e-12, xa
                )
                z = project(xa + step * direction, xs, s["lo"], s["hi"])
                alpha = 1.0 if i == 0 else 0.75
                moved = xa + alpha * (z - xa) + (1.0 - alpha) * (xa - s["x_prev"])
                s["x_prev"], s["x_adv"] = xa, project(moved, xs, s["lo"], s["hi"])
            logits, value, grad = value_and_grad(s["x_adv"], s["y"], s["target"])
            with torch.no_grad():
                s["grad"] = grad
                s["increases"] = s["increases"] + (value > s["loss_prev"])
                s["loss_prev"] = value
                better = value > s["loss_best"]
                rows = _per_example(better, xa)
                s["x_best"] = torch.where(rows, s["x_adv"], s["x_best"])
                s["grad_best"] = torch.where(rows, grad, s["grad_best"])
                s["loss_best"] = torch.where(better, value, s["loss_best"])
                leave(logits.argmax(1) != s["y"])
                if i + 1 in checkpoints:
                    halve = _halve(
                        s["increases"], i + 1 - previous_checkpoint, self.rho, s["reduced_last"], s["best_last"],
                        s["loss_best"],
                    )
                    previous_checkpoint = i + 1
                    s["reduced_last"], s["best_last"] = halve, s["loss_best"].clone()
                    s["step"] = torch.where(halve, s["step"] / 2, s["step"])
                    s["increases"] = torch.zeros_like(s["increases"])
                    rows = _per_example(halve, s["x_adv"])
                    s["x_adv"] = torch.where(rows, s["x_best"], s["x_adv"])
                    s["grad"] = torch.where(rows, s["grad_best"], s["grad"])
        if s["idx"].numel():
            out[s["idx"]] = s["x_best"]
        return out

