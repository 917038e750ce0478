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
    _l2_norms,
    _one_per_point,
    _per_example,
    _project_l2,
    attack_loss,
    linf_bounds,
    logit_margin,
    targeted_dlr_loss,
)

__all__ = ["APGD", "apgd_checkpoints"]

# Targets run together as one batch of (points x targets) rows up to this many input elements (or
# the caller's batch, if larger): big enough that a CPU is not idle on per-call overhead, small enough
# that the attack's state (about 15 copies of the rows) stays within a few hundred MB.
_ROW_ELEMENTS = 2**20


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

    The targets run together, as one batch of (points x targets) rows, ``target_batch`` targets at
    a time (default ``None``: as many as fit in about :math:`2^{20}` input elements, or in the
    caller's batch if that is larger); a point's rows all leave once one of them is misclassified.
    Restarts run one after another, each over all targets. Every run's random start is drawn for
    the points correctly classified at the call, in a fixed order (restart, then target), so no
    draw depends on which points earlier runs broke: for any ``target_batch`` the same points are
    broken and each robust point gets the same point (``target_batch=1`` is the sequential
    schedule); a broken point may come from another target's run. With one target (APGD-CE,
    APGD-DLR, or ``n_target_classes=1``) and one restart the draws are those of one start per
    correctly classified point, as before batching.

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
    target_batch: int | None = None

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        _check_norm(self.norm)
        _check_bounds(self.bounds)
        _check_channels_last(self.channels_last)
        _check_int("steps", self.steps, 1)
        _check_int("restarts", self.restarts, 1)
        _check_int("n_target_classes", self.n_target_classes, 1)
        if self.target_batch is not None:
            _check_int("target_batch", self.target_batch, 1)
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
        classes = logits.shape[1]
        if self.targeted and classes < 4 and self.loss == "dlr":
            raise ValueError(f"APGD-T's targeted DLR loss needs at least 4 classes, got {classes}")
        n = x.shape[0]
        k = min(self.n_target_classes, classes - 1) if self.targeted else 1
        # targets[r, i]: the (r + 2)-th most likely clean class of point i.
        targets = logits.argsort(dim=1, descending=True)[:, 1 : k + 1].t() if self.targeted else None
        best = x.clone()
        best_margin = logit_margin(logits, y)
        # Random starts are drawn per (restart, target) for the points correctly classified now, in a
        # fixed order, so that no draw depends on which points earlier runs broke: batching targets
        # together then changes no run.
        first_todo = (best_margin <= 0).nonzero().squeeze(1)
        position = torch.full((n,), -1, dtype=torch.long, device=x.device)
        position[first_todo] = torch.arange(first_todo.numel(), device=x.device)
        noise_shape = (first_todo.numel(), *x.shape[1:])
        row_cap = max(n, _ROW_ELEMENTS // max(x[0].numel(), 1))
        for _ in range(self.restarts):
            r = 0
            while r < k:
                todo = (best_margin <= 0).nonzero().squeeze(1)
                m = todo.numel()
                if m == 0:
                    return best
                g = min(self.target_batch or max(1, row_cap // m), k - r)
                kind = "uniform" if self.norm == "linf" else "normal"
                noise = torch.cat([_draw(kind, noise_shape, x, gen)[position[todo]] for _ in range(g)])
                point = todo.repeat(g)
                rank = torch.arange(r, r + g, device=x.device).repeat_interleave(m)
                target = None if targets is None else targets[rank, point]
                cand, cand_point, cand_rank = self._run(forward, x[point], y[point], target, noise, point, rank, n)
                with torch.no_grad():
                    margin = logit_margin(forward(cand), y[cand_point])
                _keep_best(best, best_margin, cand, margin, cand_point, cand_rank)
                r += g
        return best

    # -- one run on a batch of rows (a point with one target each), every row with its own step size
    def _run(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
        noise: torch.Tensor, point: torch.Tensor, rank: torch.Tensor, n_points: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """APGD from ``noise``'s start for every row; rows of one point leave together once one of them
        is misclassified. Returns candidates (each point's misclassified iterate, from its lowest-ranked
        row that found one at that step, else every row's best point) with their points and ranks."""
        eps, linf = self.eps, self.norm == "linf"
        if linf:
            lo, hi = linf_bounds(x, eps, self.bounds)
            t = noise.mul_(2).sub_(1)
            x_adv = (x + eps * t / _per_example(t.flatten(1).abs().amax(1).clamp_min(1e-12), x)).clamp_(lo, hi)
        else:
            lo = hi = x  # unused for l2; kept so the state can be compacted alike
            t = noise
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

        rows = x.shape[0]
        logits, value, grad = value_and_grad(x_adv, y, target)
        # Per-row state; rows leave it when their point is misclassified.
        s: dict[str, torch.Tensor | None] = {
            "x": x, "lo": lo, "hi": hi, "y": y, "target": target, "point": point, "rank": rank, "x_adv": x_adv,
            "x_prev": x_adv.clone(), "grad": grad, "loss_prev": value, "x_best": x_adv.clone(),
            "grad_best": grad.clone(), "loss_best": value.clone(),
            "step": torch.full((rows,), 2.0 * eps, dtype=x.dtype, device=x.device),
            "increases": torch.zeros(rows, dtype=torch.long, device=x.device),
            "reduced_last": torch.ones(rows, dtype=torch.bool, device=x.device),
            "best_last": value.clone(),
        }
        alive = torch.ones(n_points, dtype=torch.bool, device=x.device)
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def leave(fooled: torch.Tensor) -> None:
            """Record each newly misclassified point's iterate and drop all rows of those points."""
            if not bool(fooled.any()):
                return
            f = fooled.nonzero().squeeze(1)
            pts, rk = s["point"][f], s["rank"][f]
            pick = f[_one_per_point(torch.zeros_like(rk, dtype=x.dtype), pts, rk, n_points, largest=True)]
            found.append((s["x_adv"][pick], s["point"][pick], s["rank"][pick]))
            alive[pts] = False
            keep = alive[s["point"]]
            for key, v in s.items():
                if v is not None:
                    s[key] = v[keep]

        leave(logits.argmax(1) != y)
        checkpoints = set(apgd_checkpoints(self.steps))
        previous_checkpoint = 0
        for i in range(self.steps):
            if s["point"].numel() == 0:
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
                rows_better = _per_example(better, xa)
                s["x_best"] = torch.where(rows_better, s["x_adv"], s["x_best"])
                s["grad_best"] = torch.where(rows_better, grad, s["grad_best"])
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
                    rows_halved = _per_example(halve, s["x_adv"])
                    s["x_adv"] = torch.where(rows_halved, s["x_best"], s["x_adv"])
                    s["grad"] = torch.where(rows_halved, s["grad_best"], s["grad"])
        found.append((s["x_best"], s["point"], s["rank"]))
        return tuple(torch.cat(parts) for parts in zip(*found))  # type: ignore[return-value]


def _keep_best(
    best: torch.Tensor, best_margin: torch.Tensor, cand: torch.Tensor, margin: torch.Tensor, point: torch.Tensor,
    rank: torch.Tensor,
) -> None:
    """Per point, in place: its candidate with the largest logit margin (ties: the lowest rank) replaces
    ``best`` where that margin is larger than ``best_margin``, as running the ranks one after another would."""
    chosen = _one_per_point(margin, point, rank, best_margin.shape[0], largest=True) & (margin > best_margin[point])
    best[point[chosen]] = cand[chosen]
    best_margin[point[chosen]] = margin[chosen]
