"""Training and evaluation loops on tensors.

* :func:`train`: minibatch SGD on cross-entropy (chapter ``00_introduction``).
* :func:`adversarial_train`: SGD on a mix of clean and adversarial loss, with an eps
  warm-up (Goodfellow et al. 2015; Madry et al. 2018; chapter ``02_adversarial_training``).
* :func:`evaluate`: clean accuracy, and robust accuracy under an input attack
  (chapter ``01_adversarial_examples``).
* :class:`TRADES` (Zhang et al. 2019), a loss for :func:`train`'s ``loss_fn`` hook, and
  :class:`FastFGSM` (Wong et al. 2020), an attack for :func:`adversarial_train`: adversarial
  training as practised (chapter ``02_adversarial_training``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .attacks import PGD, attack_mode, linf_bounds

__all__ = ["train", "adversarial_train", "evaluate", "accuracy", "iterate_minibatches", "DIGITS_RECIPE",
           "TRADES", "FastFGSM", "trades_objective", "kl_divergence"]

#: The digits recipe behind the book's adversarial-training numbers (chapter ``02_adversarial_training``,
#: ``benchmarks/adversarial_targets.py``): ``MLP(hidden=(256, 256))``, plain SGD with a cosine learning
#: rate, and for adversarial training PGD-10 at a training budget 20% above the evaluation budget
#: of 0.1 (a margin that the evaluation's stronger attack, PGD-50 with restarts, eats into).
#: Standard training is the same recipe without the attack.
DIGITS_RECIPE: dict = {
    "hidden": (256, 256),
    "epochs": 60,
    "lr": 0.1,
    "batch_size": 16,
    "lr_schedule": "cosine",
    "mix": 1.0,
    "train_eps": 0.12,
    "train_steps": 10,
}


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch tensors")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("x and y are empty")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"y must hold integer class labels, got {y.dtype}")


def iterate_minibatches(n: int, batch_size: int, generator: torch.Generator | None, shuffle: bool = True):
    """Yield index tensors of at most ``batch_size`` covering ``range(n)`` once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    yield from order.split(batch_size)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 1,
    lr: float = 0.1,
    batch_size: int = 32,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    desc: str = "train",
    lr_schedule: str = "constant",
) -> list[float]:
    """Train ``model`` in place with minibatch SGD; return the mean loss of each epoch.

    ``x`` and ``y`` are moved to the model's device batch by batch, so a CPU
    dataset trains a CUDA model unchanged. ``generator`` fixes the shuffling.
    ``loss_fn(model, xb, yb)`` replaces the cross-entropy (adversarial training
    plugs in here). ``lr_schedule="cosine"`` anneals the learning rate batch by
    batch as ``lr * (1 + cos(pi * t / T)) / 2`` over the ``T`` steps of training
    (Loshchilov & Hutter 2017); ``"constant"`` keeps it.
    """
    _check_xy(x, y)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    device = _model_device(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = loss_fn or (lambda m, xb, yb: F.cross_entropy(m(xb), yb))
    total_steps, step = epochs * math.ceil(len(x) / max(batch_size, 1)), 0
    model.train()
    losses = []
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        total, count = 0.0, 0
        for idx in iterate_minibatches(len(x), batch_size, generator):
            if lr_schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            step += 1
            xb, yb = x[idx.to(x.device)].to(device), y[idx.to(y.device)].to(device)
            loss = loss_fn(model, xb, yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (eval mode, restored after)."""
    _check_xy(x, y)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        correct += (model(xb).argmax(dim=1) == yb).sum().item()
    model.train(was_training)
    return correct / len(x)


def mixed_adversarial_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack, mix: float) -> torch.Tensor:
    """``(1 - mix) * CE(model(x), y) + mix * CE(model(attack(model, x, y)), y)``, the loss of
    :func:`adversarial_train` on one batch: ``mix=0`` never calls the attack, ``mix=1`` uses only
    the adversarial batch, and in between the clean and adversarial halves go through the model as
    one batch. Shared by :func:`adversarial_train` and the federated clients' local steps."""
    if mix == 0.0:
        return F.cross_entropy(model(x), y)
    x_adv = attack(model, x, y)
    if mix == 1.0:
        return F.cross_entropy(model(x_adv), y)
    losses = F.cross_entropy(model(torch.cat([x, x_adv])), torch.cat([y, y]), reduction="none")
    clean, adv = losses.split(len(y))
    return (1.0 - mix) * clean.mean() + mix * adv.mean()


def adversarial_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int = 1,
    mix: float = 0.5,
    warmup_epochs: float = 0.0,
    lr: float = 0.1,
    batch_size: int = 32,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    lr_schedule: str = "constant",
) -> list[float]:
    """Adversarial training: minibatch SGD on a mix of clean and adversarial cross-entropy.

    Each minibatch ``(x_b, y_b)`` is attacked, ``x_adv = attack(model, x_b, y_b)``, and the
    step minimizes

    .. math::  (1 - mix)\\, \\mathrm{CE}(f(x_b), y_b) + mix\\, \\mathrm{CE}(f(x_{adv}), y_b).

    ``mix=0.5`` is the 50/50 objective of Goodfellow et al. (2015), Tutorial 157's
    recipe; ``mix=1.0`` is the min-max objective of Madry et al. (2018), which trains on the
    worst case only; ``mix=0`` is standard training. With ``0 < mix < 1`` the clean and
    adversarial halves go through the model as one batch.

    ``warmup_epochs`` ramps the attack's budget linearly, batch by batch, from
    ``eps / warmup_batches`` up to ``eps`` over that many epochs (``attack.scaled(factor)``
    scales eps and the step size), then keeps it at ``eps``. A large budget from the first
    step (eps=0.3 on MNIST) can stall training at chance accuracy; the warm-up avoids it.

    The attack runs with the model in eval mode (it restores train mode); everything else
    is :func:`train`'s, which this calls with a ``loss_fn``: the same shuffling from
    ``generator``, the same device handling (a CUDA model trains from CPU tensors unchanged),
    the same per-epoch mean loss returned. ``progress=True`` shows a progress bar. Taught in
    chapter ``02_adversarial_training``.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    if not warmup_epochs >= 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if warmup_epochs > 0 and not hasattr(attack, "scaled"):
        raise TypeError("an eps warm-up needs an attack with a .scaled(factor) method (FGSM, PGD, WorstCaseEnsemble)")
    warmup_batches = warmup_epochs * math.ceil(len(x) / batch_size)
    seen = 0

    def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        seen += 1
        atk = attack
        if seen < warmup_batches:
            atk = attack.scaled(seen / warmup_batches)
        return mixed_adversarial_loss(m, xb, yb, atk, mix)

    return train(
        model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, weight_decay=weight_decay,
        generator=generator, progress=progress, loss_fn=loss_fn, desc="adversarial train", lr_schedule=lr_schedule,
    )


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 1024,
    progress: bool = False,
) -> dict[str, float | None]:
    """Clean accuracy, and with ``attack`` the robust accuracy, on held-out ``(x, y)``.

    Returns ``{"clean_accuracy": ..., "robust_accuracy": ...}`` (``None`` without an attack).
    An example counts as robust when the model classifies both ``x`` and
    ``attack(model, x, y)`` correctly: ``x`` itself lies in the eps-ball, so robust accuracy
    never exceeds clean accuracy. Works inside ``torch.no_grad()``; the model's mode is
    restored. Chapters ``01_adversarial_examples`` and ``02_adversarial_training``.
    """
    _check_xy(x, y)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    clean_ok, robust_ok = 0, 0
    starts = range(0, len(x), batch_size)
    bar = tqdm(starts, desc="evaluate", unit="batch", disable=not progress, leave=False)
    try:
        for start in bar:
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            with torch.no_grad():
                ok = model(xb).argmax(dim=1) == yb
            clean_ok += int(ok.sum())
            if attack is not None:
                x_adv = attack(model, xb, yb)
                with torch.no_grad():
                    ok &= model(x_adv).argmax(dim=1) == yb
                robust_ok += int(ok.sum())
    finally:
        model.train(was_training)
    return {
        "clean_accuracy": clean_ok / len(x),
        "robust_accuracy": robust_ok / len(x) if attack is not None else None,
    }


# --------------------------------------------------------------------------- adversarial training as practised


@dataclass(frozen=True)
class FastFGSM(PGD):
    """FGSM with a random start, the attack of "fast" adversarial training (Wong, Rice & Kolter
    2020 ICLR, "Fast is better than free: revisiting adversarial training").

    .. math::  x_0 = \\mathrm{clip}_{B}(x + \\delta),\\ \\delta \\sim U[-\\epsilon, \\epsilon]^d; \\qquad
               x_{adv} = \\mathrm{clip}_{B}\\big(x_0 + \\alpha\\, \\mathrm{sign}(\\nabla_x L(f(x_0), y))\\big),

    with :math:`B` the linf ball intersected with ``[0, 1]`` and :math:`\\alpha = 1.25\\epsilon` by
    default (the paper's choice; with larger steps, 2 eps, its CIFAR-10 runs overfit catastrophically). It is
    one step of :class:`~robustfl_lib.attacks.PGD` with a random start, so it shares PGD's contract
    (ball, modes, ``seed``/``generator``). Fast adversarial training is
    ``adversarial_train(model, x, y, FastFGSM(eps, generator=g), mix=1.0)``. Chapter
    ``02_adversarial_training``.
    """

    steps: int = 1

    def __post_init__(self) -> None:
        if self.alpha is None and isinstance(self.eps, (int, float)) and self.eps > 0:
            object.__setattr__(self, "alpha", 1.25 * self.eps)
        super().__post_init__()
        if self.steps != 1 or self.norm != "linf" or not self.random_start or self.restarts != 1:
            raise ValueError("FastFGSM is one linf step from a random start (steps=1, norm='linf', "
                             "random_start=True, restarts=1); use PGD for anything else")


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-sample :math:`\\mathrm{KL}(p \\,\\|\\, q) = \\sum_k p_k (\\log p_k - \\log q_k)` of the softmaxes of two
    logit batches (N, K) -> (N,)."""
    return F.kl_div(F.log_softmax(logits_q, dim=1), F.log_softmax(logits_p, dim=1), reduction="none",
                    log_target=True).sum(dim=1)


def trades_objective(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                     beta: float) -> torch.Tensor:
    """Per-sample TRADES loss :math:`\\mathrm{CE}(f(x), y) + \\beta\\, \\mathrm{KL}(f(x) \\,\\|\\, f(x'))`
    (:class:`TRADES`)."""
    return F.cross_entropy(logits_clean, y, reduction="none") + beta * kl_divergence(logits_clean, logits_adv)


@dataclass(frozen=True)
class TRADES:
    """The TRADES loss (Zhang et al. 2019 ICML, "Theoretically principled trade-off between
    robustness and accuracy"), a ``loss_fn(model, x, y)`` for :func:`train`:

    .. math::  \\mathrm{CE}(f(x), y) + \\beta\\, \\mathrm{KL}\\big(f(x) \\,\\|\\, f(x')\\big), \\qquad
               x' \\approx \\arg\\max_{x' \\in B} \\mathrm{KL}\\big(f(x) \\,\\|\\, f(x')\\big),

    :math:`f` the softmax output and :math:`B` the linf eps-ball intersected with ``[0, 1]``. The
    inner maximisation is the paper's: start at :math:`x + 0.001\\,\\mathcal N(0, I)` (here clipped to
    :math:`B`; the KL and its gradient vanish at :math:`x' = x`), then ``steps`` sign-gradient steps of
    size ``alpha`` (default ``2.5 * eps / steps``, as :class:`~robustfl_lib.attacks.PGD`), each
    projected onto :math:`B`, with the model in eval mode and :math:`f(x)` held fixed. The loss then
    differentiates both terms, :math:`f(x)` included, as the reference implementation does.
    ``beta=6`` is the paper's choice; ``beta=0`` is plain cross-entropy (the inner maximisation is
    skipped). Randomness: ``seed`` (same call, same start) or ``generator``, never the global RNG
    unless neither is given. Chapter ``02_adversarial_training``:
    ``train(model, x, y, loss_fn=TRADES(0.1, generator=g))``.
    """

    eps: float
    beta: float = 6.0
    steps: int = 10
    alpha: float | None = None
    start_std: float = 0.001
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) \
                or self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta) \
                or self.beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not self.start_std >= 0:
            raise ValueError(f"start_std must be >= 0, got {self.start_std!r}")
        if self.seed is not None and self.generator is not None:
            raise ValueError("give either seed or generator, not both")
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2.5 * self.eps / self.steps)
        elif not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha (the step size) must be > 0, got {self.alpha!r}")

    def scaled(self, factor: float) -> TRADES:
        """A copy with eps and the step size multiplied by ``factor`` (eps warm-ups)."""
        return replace(self, eps=self.eps * factor, alpha=self.alpha * factor)

    def _generator(self) -> torch.Generator | None:
        return torch.Generator().manual_seed(int(self.seed)) if self.seed is not None else self.generator

    def _start(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        device = gen.device if gen is not None else x.device
        noise = torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype).to(x.device)
        return x + self.start_std * noise

    def perturb(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The inner maximisation: :math:`x'` in the ball, approximately maximising the KL."""
        if x.numel() and (x.min() < self.bounds[0] or x.max() > self.bounds[1]):
            raise ValueError(f"x must lie in bounds {self.bounds} (inputs scaled to [0, 1])")
        x = x.detach()
        if self.eps == 0 or x.shape[0] == 0:
            return x.clone()
        with attack_mode(model), torch.enable_grad():
            with torch.no_grad():
                clean = model(x)
            lo, hi = linf_bounds(x, self.eps, self.bounds)
            x_adv = self._start(x, self._generator()).clamp_(lo, hi).requires_grad_(True)
            for _ in range(self.steps):
                (grad,) = torch.autograd.grad(kl_divergence(clean, model(x_adv)).sum(), x_adv)
                with torch.no_grad():
                    x_adv.add_(grad.sign_(), alpha=self.alpha).clamp_(lo, hi)
        return x_adv.detach()

    def sample_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    attack_model: nn.Module | None = None) -> torch.Tensor:
        """Per-sample TRADES loss (N,); ``attack_model`` (default ``model``) runs the inner maximisation."""
        if self.beta == 0:
            return F.cross_entropy(model(x), y, reduction="none")
        x_adv = self.perturb(model if attack_model is None else attack_model, x)
        return trades_objective(model(x), model(x_adv), y, self.beta)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.sample_loss(model, x, y).mean()
