"""The contract every input attack keeps, its losses and its plumbing (chapter ``01_adversarial_examples``).

An untargeted attack looks, for an input ``x`` with label ``y``, for

.. math::  x_{adv} \\in \\arg\\max_{\\|x' - x\\|_p \\le \\epsilon,\\; x' \\in [0, 1]^d} L(f(x'), y),

the worst point of the eps-ball around ``x`` (intersected with the valid input box) for a
loss ``L``. Every attack here is an object configured once and called on data,
``attack(model, x, y) -> x_adv``, and keeps the same contract:

* ``x_adv`` lies in the eps-ball (linf or l2) around ``x`` and in ``bounds`` (default [0, 1]).
  In floating point the linf ball is exact: every coordinate satisfies
  ``|x_adv - x| <= eps_hat`` in exact arithmetic, with ``eps_hat`` the largest number of
  ``x``'s dtype that is ``<= eps`` (:func:`linf_bounds`), so not even rounding by one ulp
  takes a point out of the real eps-ball; the l2 ball holds up to the rounding of a norm;
* the model's train/eval mode (of every submodule) and its parameters' ``requires_grad``
  and ``.grad`` are as they were before the call; the model is run in eval mode;
* any input shape ``(N, ...)``: flat vectors, ``(C, H, W)`` images, RGB;
* it works inside ``torch.no_grad()`` (and ``torch.inference_mode()``): gradients are taken
  with ``torch.autograd.grad`` with respect to the input only, under ``torch.enable_grad()``;
* ``eps=0`` returns ``x`` unchanged; results follow the device of ``x``;
* bad settings (negative eps, ``steps < 1``, unknown norm or loss) raise ``ValueError``.

This module holds the base class :class:`InputAttack`, :func:`attack_mode`, the losses
(:func:`attack_loss`, :func:`logit_margin`) and :func:`linf_bounds`; the attacks themselves are
in the sibling modules (see :mod:`robustfl_lib.attacks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "InputAttack",
    "attack_loss",
    "targeted_dlr_loss",
    "logit_margin",
    "attack_mode",
    "linf_bounds",
    "NORMS",
    "ATTACK_LOSSES",
]

NORMS = ("linf", "l2")
ATTACK_LOSSES = ("ce", "cw", "dlr")

# What an attack's inner loop calls: the model itself, or its channels-last forward.
Forward = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- losses


def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example margin ``max_{j != y} z_j - z_y`` of logits ``z``.

    Positive exactly when another class outscores the true one (the example is
    misclassified). It is the Carlini & Wagner (2017) loss with confidence 0, and
    the score by which :class:`PGD` restarts and :class:`WorstCaseEnsemble` pick the
    worst case per example (chapter ``01_adversarial_examples``).
    """
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - z_y


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Per-example loss that an attack maximizes.

    * ``"ce"``: cross-entropy ``-log softmax(z)_y`` (Madry et al. 2018).
    * ``"cw"``: the logit margin ``max_{j != y} z_j - z_y`` (Carlini & Wagner 2017).
    * ``"dlr"``: the Difference of Logits Ratio
      ``(max_{j != y} z_j - z_y) / (z_{pi_1} - z_{pi_3} + 1e-12)`` with ``z_{pi_1} >= z_{pi_2} >= ...``
      the sorted logits (Croce & Hein 2020). It is invariant to shifting and rescaling the
      logits, so a model cannot hide behind saturated softmax outputs; it needs >= 3 classes.

    Margin losses keep a useful gradient where cross-entropy saturates, which is why the
    ensemble runs PGD on both (chapter ``01_adversarial_examples``).
    """
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "cw":
        return logit_margin(logits, y)
    if loss == "dlr":
        if logits.shape[1] < 3:
            raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
        top = logits.topk(3, dim=1).values
        return logit_margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)
    raise ValueError(f"unknown attack loss {loss!r}; choose one of {ATTACK_LOSSES}")


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Targeted Difference of Logits Ratio (Croce & Hein 2020, "Reliable evaluation of adversarial
    robustness with an ensemble of diverse parameter-free attacks", ICML), the loss of APGD-T:

    .. math::  \mathrm{DLR}_t(z, y) = -\frac{z_y - z_t}{z_{\pi_1} - (z_{\pi_3} + z_{\pi_4}) / 2 + 10^{-12}}

    with :math:`z_{\pi_1} \ge z_{\pi_2} \ge \dots` the sorted logits. Maximizing it pushes the
    target ``t`` above the true class ``y``; like DLR it is invariant to shifting and positive
    rescaling of the logits. Needs at least 4 classes. Chapter ``01_adversarial_examples``.
    """
    if logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[1]}")
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return (z_t - z_y) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


# --------------------------------------------------------------------------- plumbing


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode with frozen parameters, then restore both exactly.

    Every submodule's ``training`` flag and every parameter's ``requires_grad`` are saved
    and put back, even on error. Freezing the parameters is what makes an attack cheap:
    autograd then neither computes weight gradients nor keeps the activations they need,
    and ``.grad`` can never be touched.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")


def _check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _check_bounds(bounds: tuple[float, float]) -> None:
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds!r}")


def _check_channels_last(setting: bool | None) -> None:
    if setting is not None and not isinstance(setting, bool):
        raise ValueError(f"channels_last must be True, False or None (automatic), got {setting!r}")


def _two_sum_error(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``a + b - s`` exactly, for ``s = fl(a + b)`` (Knuth's TwoSum, valid in any binary
    dtype with round-to-nearest and no overflow): the sign says which way the sum rounded."""
    b_virtual = s - a
    return (a - (s - b_virtual)) + (b - b_virtual)


def linf_bounds(x: torch.Tensor, eps: float, bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per coordinate ``[lo, hi]``: the linf eps-ball around ``x`` intersected with ``bounds``,
    exactly, in ``x``'s dtype.

    The budget becomes :math:`\hat\epsilon`, the largest number of the dtype with
    :math:`\hat\epsilon \le \epsilon` (float32 rounds 0.1 *up* to 0.10000000149; that is
    one ulp outside the ball, so it is stepped down). ``hi`` is the largest representable
    number :math:`\le x + \hat\epsilon`, ``lo`` the smallest :math:`\ge x - \hat\epsilon`:
    round-to-nearest of ``x + eps`` lands outside the ball for about half the coordinates of
    a uniform ``x`` in float32 (by up to half an ulp of ``x + eps``), so the rounding
    direction is read off the exact error of the sum (:func:`_two_sum_error`) and corrected
    by one ulp (``torch.nextafter``). Then ``lo >= bounds[0]``, ``hi <= bounds[1]``. Every
    point of ``[lo, hi]`` is in the real eps-ball: :math:`|x' - x| \le \hat\epsilon \le
    \epsilon` in exact arithmetic, hence also ``(x' - x).abs() <= eps_hat`` when computed in
    the dtype. FGSM and linf PGD (chapter ``01_adversarial_examples``) clamp to it after
    every step, which for linf is the exact projection onto ball and box.
    """
    e = torch.tensor(eps, dtype=torch.float64).to(x.dtype)
    if float(e) > eps:
        e = torch.nextafter(e, torch.zeros_like(e))
    e = e.to(x.device)
    hi = x + e
    hi = torch.where(_two_sum_error(x, e, hi) < 0, torch.nextafter(hi, torch.full_like(hi, -math.inf)), hi)
    lo = x - e
    lo = torch.where(_two_sum_error(x, -e, lo) > 0, torch.nextafter(lo, torch.full_like(lo, math.inf)), lo)
    return lo.clamp_(min=bounds[0]), hi.clamp_(max=bounds[1])


def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a per-example vector (N,) to broadcast against ``like`` (N, ...)."""
    return v.view(-1, *([1] * (like.ndim - 1)))


def _l2_norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _input_grad(model: Forward, x_adv: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Gradient of the summed attack loss with respect to ``x_adv`` only (a leaf requiring grad).

    The sum, not the mean: in eval mode examples are independent, so each row of the
    gradient is that example's own, at a scale that does not shrink with the batch.
    """
    value = attack_loss(model(x_adv), y, loss).sum()
    (grad,) = torch.autograd.grad(value, x_adv)
    return grad


def _keep_worst(
    model: Forward, best: torch.Tensor, best_margin: torch.Tensor, todo: torch.Tensor, cand: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Per example of ``todo``, keep ``cand`` in ``best`` (in place) where its logit margin is larger."""
    with torch.no_grad():
        cand_margin = logit_margin(model(cand), y[todo])
    better = cand_margin > best_margin[todo]
    best[todo[better]] = cand[better]
    best_margin[todo[better]] = cand_margin[better]


def _one_per_point(values: torch.Tensor, point: torch.Tensor, rank: torch.Tensor, n_points: int,
                   largest: bool) -> torch.Tensor:
    """Mask of the rows that, per point, hold the largest (or smallest) of ``values``, ties broken by
    the lowest ``rank``: one row per point among those listed in ``point``. Attacks that run several
    targets of a point as rows of one batch use it to pick what running them one after another
    (each kept only if strictly better) would have kept."""
    fill = -math.inf if largest else math.inf
    top = torch.full((n_points,), fill, dtype=values.dtype, device=values.device)
    top.scatter_reduce_(0, point, values, "amax" if largest else "amin")
    at_top = values == top[point]
    lowest = torch.full((n_points,), 2**62, dtype=torch.long, device=rank.device)
    lowest.scatter_reduce_(0, point[at_top], rank[at_top], "amin")
    return at_top & (rank == lowest[point])


def _channels_last_forward(model: nn.Module) -> Forward:
    """``model``'s forward with its 4-D (convolution) weights in channels-last layout.

    The model itself is not touched: :func:`torch.func.functional_call` runs it with
    channels-last copies of those weights (made once per attack call). Convolution outputs
    then stay channels-last through ReLU and max-pooling, whose oneDNN kernels for that
    layout are much faster on a CPU than the default ones (max-pooling was a third of a
    PGD step's time on the MNIST-shaped CNN).
    """
    fmt = torch.channels_last
    weights = {name: p.to(memory_format=fmt) for name, p in model.named_parameters() if p.ndim == 4}

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, weights, (x,))

    return forward


def _use_channels_last(model: nn.Module, x: torch.Tensor, setting: bool | None) -> bool:
    if setting is not None:
        return setting and x.ndim == 4
    # Auto: on a CPU, for image batches through a model with 2-D convolutions. Not on CUDA,
    # where cuDNN's choice for float32 is left as it is (and was not measured here).
    return x.ndim == 4 and x.device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """A fresh generator seeded with ``seed`` (same call, same draws), else ``generator`` itself."""
    if seed is not None:
        return torch.Generator().manual_seed(int(seed))
    return generator


def _check_seed(seed: int | None, generator: torch.Generator | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")


def _draw(kind: str, shape: tuple[int, ...], like: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) or standard normal draws shaped ``shape``, dtype and device of ``like``.

    Drawn on the generator's device (CPU by default) and moved, so one seed gives the same numbers
    on every device."""
    device = gen.device if gen is not None else like.device
    draw = torch.rand if kind == "uniform" else torch.randn
    return draw(shape, generator=gen, device=device, dtype=like.dtype).to(like.device)


def _project_l2(v: torch.Tensor, x: torch.Tensor, eps: float, bounds: tuple[float, float]) -> torch.Tensor:
    """``v`` projected onto the l2 eps-ball around ``x``, then clipped to ``bounds`` (in place).

    For ``x`` inside the box, clipping only moves coordinates towards ``x``, so the result stays
    in the ball."""
    delta = v.sub_(x)
    delta.mul_(_per_example((eps / _l2_norms(delta).clamp_min(1e-12)).clamp_(max=1.0), delta))
    return delta.add_(x).clamp_(*bounds)


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class InputAttack:
    """Base of the input attacks: validation, the eps=0 shortcut, eval mode and frozen parameters.

    Subclasses set ``eps``, ``norm``, ``bounds`` and ``channels_last`` and implement
    ``_attack(forward, x, y)``, which runs with gradients enabled, the model in eval mode and
    its parameters frozen; ``forward`` is the model or its channels-last forward (see
    :class:`PGD`). An attack that must see the module itself (the ensemble, which calls other
    attacks) overrides ``_perturb(model, x, y)`` instead.
    ``scaled(factor)`` returns a copy with the budget (and step size) multiplied by
    ``factor``: :func:`robustfl_lib.training.adversarial_train` uses it for its eps warm-up.
    """

    eps: float
    norm: str
    bounds: tuple[float, float]
    channels_last: bool | None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("x and y must be torch tensors")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x (N, ...) and y (N,) must agree: got {tuple(x.shape)} and {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got {y.dtype}")
        if x.numel() and (x.min() < self.bounds[0] or x.max() > self.bounds[1]):
            raise ValueError(
                f"x must lie in bounds {self.bounds} (inputs scaled to [0, 1]); "
                f"got values in [{x.min().item():.3g}, {x.max().item():.3g}]"
            )
        if self.eps == 0 or x.shape[0] == 0:
            return x.detach().clone()
        # inference_mode(False) + clone turns an inference tensor into one autograd accepts.
        with attack_mode(model), torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone() if x.is_inference() else x.detach()
            y = y.to(x.device).long()
            out = self._perturb(model, x, y).detach()
        # The caller gets its own layout back (channels-last images stay channels-last).
        channels_last = x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``_attack`` with the channels-last forward where it applies, else with ``model``.

        In automatic mode (``channels_last=None``) a model that cannot take channels-last
        activations (one that calls ``.view`` on them raises a RuntimeError) is run again with
        its own layout.
        """
        if not _use_channels_last(model, x, self.channels_last):
            return self._attack(model, x, y)
        try:
            return self._attack(_channels_last_forward(model), x.contiguous(memory_format=torch.channels_last), y)
        except RuntimeError:
            if self.channels_last:
                raise
            return self._attack(model, x, y)

    def _attack(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scaled(self, factor: float) -> InputAttack:
        raise NotImplementedError
