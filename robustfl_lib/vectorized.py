"""Train many clients' copies of one model in a single batched computation.

In a simulated FL round every participating client starts from the same global
weights and runs local SGD on its own data. Looping over clients runs many tiny
forward/backward passes; here the ``K`` clients' parameters are stacked along a
new leading dimension and one ``torch.func.vmap``-ed forward pass serves all of
them. Because client ``k``'s loss depends only on its own parameters and inputs,
the gradient of the *sum* of the clients' losses with respect to the stacked
parameters is exactly the stack of the per-client gradients, so one ordinary
``autograd.grad`` call gives every client its own SGD step:

.. math:: \\theta_k \\leftarrow \\theta_k - \\eta \\nabla_{\\theta_k} \\sum_j L_j(\\theta_j) = \\theta_k - \\eta \\nabla L_k(\\theta_k).

Clients draw their minibatch order from their own generators exactly as the
sequential :func:`robustfl_lib.training.train` does, and clients with fewer
samples are padded and masked, so the result equals the sequential loop up to
floating-point rounding (tested). Used by :func:`robustfl_lib.federated.run_federated`
with ``vectorized=True``; taught in chapter ``09_robust_federated_learning``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

__all__ = ["StackedModel", "train_stacked", "step_minibatches", "SampleLoss"]

#: ``sample_loss(model, x, y) -> (N,)`` per-sample losses; ``model`` maps (N, ...) inputs to (N, classes).
SampleLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


class StackedModel(nn.Module):
    """``K`` models sharing ``base``'s architecture, with stacked weights ``params[name]: (K, *shape)``.

    It is called like an ordinary classifier on a flat batch ``(K * B, ...)``
    laid out client-major (the first ``B`` rows belong to model 0, and so on)
    and returns ``(K * B, classes)``, so input attacks written for one model
    (e.g. :class:`robustfl_lib.attacks.PGD`) run unchanged on all clients at once.
    """

    def __init__(self, base: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self._base = [base]  # a list hides it from nn.Module's parameter registry
        self.stacked = params
        self.num_models = next(iter(params.values())).shape[0]
        self._mlp_layers = self._find_mlp_layers(base)

    def _one(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._base[0], p, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.num_models:
            raise ValueError(f"batch of {x.shape[0]} rows cannot be split among {self.num_models} models")
        xk = x.reshape(self.num_models, -1, *x.shape[1:])
        if self._mlp_layers is not None:
            out = self._mlp_forward(xk)
        else:
            out = vmap(self._one)(self.stacked, xk)
        return out.reshape(-1, out.shape[-1])

    @staticmethod
    def _find_mlp_layers(base: nn.Module) -> list[tuple[str, nn.Module]] | None:
        """The layers of a Flatten/Linear/ReLU stack (the book's MLP), else ``None``."""
        if not isinstance(base, nn.Sequential):
            return None
        layers = list(base.named_children())
        if all(isinstance(m, (nn.Flatten, nn.Linear, nn.ReLU)) for _, m in layers):
            return layers
        return None

    def _mlp_forward(self, xk: torch.Tensor) -> torch.Tensor:
        # The same computation as vmap(functional_call), as batched matrix products: vmap's
        # per-call re-binding of parameters costs more than the arithmetic for models this small.
        h = xk
        for name, m in self._mlp_layers:
            if isinstance(m, nn.Flatten):
                h = h.flatten(2)
            elif isinstance(m, nn.Linear):
                w = self.stacked[f"{name}.weight"]
                h = torch.bmm(h, w.transpose(1, 2))
                if m.bias is not None:
                    h = h + self.stacked[f"{name}.bias"].unsqueeze(1)
            else:
                h = torch.relu(h)
        return h

    def detached(self) -> StackedModel:
        """The same weights without autograd history (for attacks, which need input gradients only)."""
        return StackedModel(self._base[0], {k: v.detach() for k, v in self.stacked.items()})


def _check_stackable(model: nn.Module) -> list[str]:
    state = model.state_dict()
    names = [n for n, _ in model.named_parameters()]
    if [k for k in state if torch.is_floating_point(state[k])] != names or len(state) != len(names):
        raise ValueError(
            "vectorized training needs a model whose state is its parameters only (no buffers such as "
            "BatchNorm statistics); use vectorized=False for this model"
        )
    return names


def step_minibatches(n: int, batch_size: int, steps: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """The index tensors of ``steps`` SGD steps on ``n`` samples: successive passes over the data,
    each shuffled as :func:`robustfl_lib.training.iterate_minibatches` does (batches of
    ``batch_size``, the last of a pass possibly shorter), cut after ``steps`` batches."""
    if steps < 1 or batch_size < 1 or n < 1:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and n >= 1; got {steps}, {batch_size}, {n}")
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        batches.extend(torch.randperm(n, generator=generator).split(batch_size))
    return batches[:steps]


def _epoch_plan(sizes: Sequence[int], batch_size: int, generators: Sequence[torch.Generator | None],
                steps: int | None = None):
    """Per-client minibatch order, padded to a common number of steps: (index (K, S, B), mask (K, S, B)).

    One epoch (one pass over each client's data), or with ``steps`` exactly that many
    minibatches per client (:func:`step_minibatches`)."""
    offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
    if steps is None:
        per_client = None
        steps = max(-(-n // batch_size) for n in sizes)
    else:
        per_client = [step_minibatches(n, batch_size, steps, gen) for n, gen in zip(sizes, generators)]
    index = torch.zeros(len(sizes), steps * batch_size, dtype=torch.long)
    mask = torch.zeros(len(sizes), steps * batch_size, dtype=torch.bool)
    for k, (n, off, gen) in enumerate(zip(sizes, offsets, generators)):
        if per_client is None:
            # The same draw as training.iterate_minibatches, so each client sees the sequential order.
            batches = torch.randperm(n, generator=gen).split(batch_size)
        else:
            batches = per_client[k]
        for s, b in enumerate(batches):
            index[k, s * batch_size : s * batch_size + len(b)] = b + off
            mask[k, s * batch_size : s * batch_size + len(b)] = True
    shape = (len(sizes), steps, batch_size)
    return index.reshape(shape), mask.reshape(shape)


def train_stacked(
    model: nn.Module,
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    epochs: int = 1,
    lr: float = 0.1,
    batch_size: int = 32,
    generators: Sequence[torch.Generator | None] | None = None,
    sample_loss: SampleLoss | None = None,
    weight_decay: float = 0.0,
    starts: torch.Tensor | None = None,
    steps: int | None = None,
) -> torch.Tensor:
    """Train ``len(xs)`` copies of ``model`` with plain minibatch SGD, copy ``k`` on ``(xs[k], ys[k])``.

    Returns the trained weights as a ``(K, d)`` tensor in
    :func:`robustfl_lib.params.flatten_state` order; ``model`` is not changed.
    ``generators[k]`` fixes client ``k``'s shuffling exactly as in
    :func:`robustfl_lib.training.train`. ``sample_loss`` returns per-sample
    losses (default cross-entropy; adversarial training plugs in here).
    ``starts`` (``(K, d)`` flat weight vectors) gives each copy its own starting
    point instead of ``model``'s weights, so several independent simulations
    (e.g. a grid of aggregators) can train their clients in one call.
    ``steps`` replaces the ``epochs`` by exactly that many SGD steps per copy, on the
    minibatches of :func:`step_minibatches` (one step on ``batch_size`` samples when
    ``steps=1``: the distributed-SGD setting).
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need one label tensor per input tensor and at least one client, got {len(xs)} and {len(ys)}")
    for k, (x, y) in enumerate(zip(xs, ys)):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"client {k}: {len(x)} inputs and {len(y)} labels (must match and be non-empty)")
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be None (epochs) or an integer >= 1, got {steps!r}")
    names = _check_stackable(model)
    K = len(xs)
    generators = list(generators) if generators is not None else [None] * K
    sample_loss = sample_loss or _cross_entropy
    base = copy.deepcopy(model)
    was_training = base.training
    if starts is None:
        params = {
            n: p.detach().unsqueeze(0).expand(K, *p.shape).clone().requires_grad_(True)
            for n, p in base.named_parameters()
        }
    else:
        shapes = {n: p.shape for n, p in base.named_parameters()}
        d = sum(s.numel() for s in shapes.values())
        if starts.shape != (K, d):
            raise ValueError(f"starts must have shape ({K}, {d}) (clients x parameters), got {tuple(starts.shape)}")
        chunks = starts.detach().split([s.numel() for s in shapes.values()], dim=1)
        params = {n: c.reshape(K, *shapes[n]).clone().requires_grad_(True) for n, c in zip(shapes, chunks)}
    stacked = StackedModel(base, params)
    x_all, y_all = torch.cat(list(xs)), torch.cat(list(ys))
    device = params[names[0]].device
    base.train()
    sizes = [len(x) for x in xs]
    # Each epoch's plan is drawn when the epoch starts, as the sequential loop draws it.
    plans = ((_epoch_plan(sizes, batch_size, generators) for _ in range(epochs)) if steps is None
             else [_epoch_plan(sizes, batch_size, generators, steps)])
    for index, mask in plans:
        index, mask = index.to(x_all.device), mask.to(device)
        for s in range(index.shape[1]):
            idx, m = index[:, s], mask[:, s].to(params[names[0]].dtype)
            xb = x_all[idx.reshape(-1)].to(device)
            yb = y_all[idx.reshape(-1)].to(device)
            losses = sample_loss(stacked, xb, yb).reshape(K, -1)
            per_client = (losses * m).sum(1) / m.sum(1).clamp(min=1)
            if not torch.isfinite(per_client).all():
                bad = (~torch.isfinite(per_client)).nonzero().flatten().tolist()
                raise FloatingPointError(f"training loss became non-finite for client(s) {bad}; lower the learning rate")
            grads = torch.autograd.grad(per_client.sum(), [params[n] for n in names])
            active = (m.sum(1) > 0).to(m.dtype)
            with torch.no_grad():
                for n, g in zip(names, grads):
                    p = params[n]
                    if weight_decay:
                        g = g + weight_decay * p * active.view(-1, *[1] * (p.ndim - 1))
                    p.sub_(lr * g)
    base.train(was_training)
    return torch.cat([params[n].detach().reshape(K, -1) for n in names], dim=1)
