"""The clients' side of a round: local training and the update each client returns.

A client trains a copy of the global model on its own data (plain SGD, adversarial
training with PGD or fast FGSM, TRADES or certified training: :func:`sgd_client_update`,
:func:`adversarial_client_update`, :func:`trades_client_update`, :func:`certified_client_update`,
or a custom :class:`ClientUpdate`) and returns its update, a delta ``w_i - w``
(:func:`compute_client_updates`). With ``vectorized=True`` all clients of a round (and in
:func:`~robustfl_lib.federated.run_grid`, of many runs) train in one batched computation
(:func:`robustfl_lib.vectorized.train_stacked`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGD
from ..byzantine import DataPoisoning
from ..certified.bounds import bound_layers
from ..certified.training import CertifiedLoss, _sample_loss_core
from ..data import Dataset
from ..params import flatten_state
from ..runtime import make_generator
from ..training import TRADES, adversarial_train, mixed_adversarial_loss, train, trades_objective
from ..vectorized import StackedModel, step_minibatches, train_stacked
from .config import FLConfig
from .hooks import accepts_keyword

__all__ = ["ClientUpdate", "ClientUpdateWithId", "sgd_client_update", "adversarial_client_update",
           "trades_client_update", "certified_client_update", "compute_client_updates"]


class ClientUpdate(Protocol):
    """Trains ``model`` (a copy of the global model) in place on one client's data.

    A callable that also accepts a keyword ``client_id`` (see :class:`ClientUpdateWithId`;
    ``**kwargs`` counts) is told which client it trains, its id in ``range(num_clients)``,
    e.g. to add a per-client penalty; one that does not is called exactly as before."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator
    ) -> None: ...


class ClientUpdateWithId(Protocol):
    """A :class:`ClientUpdate` that is told which client it trains (``client_id``, keyword only)."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator, *,
        client_id: int,
    ) -> None: ...


def _accepts_client_id(update: Callable[..., Any]) -> bool:
    """Whether ``update`` takes a ``client_id`` keyword (by name, or through ``**kwargs``)."""
    return accepts_keyword(update, "client_id")


def _cross_entropy(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(xb), yb)


def _sgd_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator,
               loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = _cross_entropy) -> None:
    """Exactly ``config.local_steps`` plain SGD steps (:func:`robustfl_lib.training.train`'s step), on
    the minibatches of :func:`robustfl_lib.vectorized.step_minibatches`."""
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    model.train()
    for idx in step_minibatches(len(x), config.batch_size, config.local_steps, generator):
        xb, yb = x[idx.to(x.device)].to(device), y[idx.to(y.device)].to(device)
        loss = loss_fn(model, xb, yb)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def sgd_client_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator,
    client_id: int | None = None,
) -> None:
    """Local SGD for ``config.local_epochs`` epochs (the FedAvg client), or exactly
    ``config.local_steps`` steps of ``config.batch_size`` samples when it is set. The same
    for every client (``client_id`` is accepted and unused)."""
    if config.local_steps is None:
        train(model, x, y, epochs=config.local_epochs, lr=config.lr, batch_size=config.batch_size, generator=generator)
    else:
        _sgd_steps(model, x, y, config, generator)


def adversarial_client_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator,
    client_id: int | None = None,
) -> None:
    """Local adversarial training: ``config.local_epochs`` epochs (or ``config.local_steps``
    steps) of PGD training (``config.adv_*``; fast FGSM for ``local_training="fast_fgsm"``)
    mixing clean and adversarial loss with weight ``config.adv_mix``
    (:func:`robustfl_lib.training.adversarial_train`'s objective)."""
    # PGD's random starts get their own stream, so the client's minibatch order is that of plain SGD.
    attack = config.local_attack(generator=make_generator(generator.initial_seed() ^ 0x5DEECE66D))
    if config.local_steps is None:
        adversarial_train(model, x, y, attack, epochs=config.local_epochs, mix=config.adv_mix, lr=config.lr,
                          batch_size=config.batch_size, generator=generator)
        return
    mix = config.adv_mix

    def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return mixed_adversarial_loss(m, xb, yb, attack, mix)

    _sgd_steps(model, x, y, config, generator, loss_fn)


def _train_with_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator,
                     loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    if config.local_steps is None:
        train(model, x, y, epochs=config.local_epochs, lr=config.lr, batch_size=config.batch_size, generator=generator,
              loss_fn=loss_fn)
    else:
        _sgd_steps(model, x, y, config, generator, loss_fn)


def trades_client_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator,
    client_id: int | None = None,
) -> None:
    """Local TRADES training (:class:`robustfl_lib.training.TRADES` with ``config.adv_eps``,
    ``adv_steps``, ``adv_alpha``, ``trades_beta``) for ``local_epochs`` epochs or ``local_steps`` steps."""
    trades = config.local_trades(generator=make_generator(generator.initial_seed() ^ 0x5DEECE66D))
    _train_with_loss(model, x, y, config, generator, trades)


def certified_client_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator,
    client_id: int | None = None, rnd: int = 1,
) -> None:
    """Local certified training (:class:`robustfl_lib.certified.CertifiedLoss`) at round ``rnd``'s
    eps, kappa and beta (:meth:`FLConfig.certified_values`: constant within a round)."""
    eps, kappa, beta = config.certified_values(rnd)
    loss = CertifiedLoss(eps, method=config.cert_method, kappa=kappa,
                         beta=beta if config.cert_method != "ibp" else None)
    _train_with_loss(model, x, y, config, generator, loss)


def _block_starts(x: torch.Tensor, clients: tuple[int, ...], generators: tuple[torch.Generator, ...],
                  start: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> torch.Tensor:
    """``start`` applied to consecutive blocks of rows (``clients[s]`` clients' rows each) with their own generators."""
    total = sum(clients)
    if total == 0 or x.shape[0] % total:
        raise ValueError(f"a batch of {x.shape[0]} rows cannot be split among {total} clients")
    per = x.shape[0] // total
    blocks = x.split([k * per for k in clients])
    return torch.cat([start(b, g) for b, g in zip(blocks, generators)])


@dataclass(frozen=True)
class _BlockStartTRADES(TRADES):
    """TRADES whose start noise draws consecutive blocks of rows from their own generators (see
    :class:`_BlockStartPGD`)."""

    clients: tuple[int, ...] = field(default=(), compare=False, repr=False)
    generators: tuple[torch.Generator, ...] = field(default=(), compare=False, repr=False)

    def _start(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        return _block_starts(x, self.clients, self.generators, super(_BlockStartTRADES, self)._start)


def _trades_sample_loss(config: FLConfig, generator: torch.Generator,
                        blocks: list[tuple[int, torch.Generator]] | None = None):
    """Per-sample TRADES loss for :func:`train_stacked` (``blocks`` as in :func:`_adversarial_sample_loss`)."""
    if blocks is not None:
        blocks = [(k, g) for k, g in blocks if k > 0]
    if blocks is not None and len(blocks) > 1:
        base = config.local_trades()
        trades = _BlockStartTRADES(**{f.name: getattr(base, f.name) for f in fields(base)},
                                   clients=tuple(k for k, _ in blocks), generators=tuple(g for _, g in blocks))
    else:
        trades = config.local_trades(generator=generator if blocks is None else blocks[0][1])

    def loss(model: StackedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if trades.beta == 0:
            return F.cross_entropy(model(x), y, reduction="none")
        x_adv = trades.perturb(model.detached(), x)
        return trades_objective(model(x), model(x_adv), y, trades.beta)

    return loss


def _certified_sample_loss(config: FLConfig, rnd: int):
    """Per-sample certified loss for :func:`train_stacked`: each client's bounds with its own weights
    (``torch.func.vmap`` over the stacked parameters), at round ``rnd``'s eps, kappa, beta."""
    eps, kappa, beta = config.certified_values(rnd)

    def loss(model: StackedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k, base = model.num_models, model._base[0]
        layers = bound_layers(base)
        natural = model(x)
        classes = natural.shape[1]

        def one(params, nat, xb, yb):
            return _sample_loss_core(layers, nat, xb, yb, eps, kappa, beta, params, classes)

        per = torch.func.vmap(one)(model.stacked, natural.reshape(k, -1, classes), x.reshape(k, -1, *x.shape[1:]),
                                   y.reshape(k, -1))
        return per.reshape(-1)

    return loss


@dataclass(frozen=True)
class _BlockStartPGD(PGD):
    """PGD whose random start draws consecutive blocks of rows from their own generators.

    In :func:`run_grid` the stacked batch holds several simulations' clients, client-major;
    block ``s`` (``clients[s]`` clients' rows) gets its start from ``generators[s]``, exactly
    the draw that simulation makes when it runs alone."""

    clients: tuple[int, ...] = field(default=(), compare=False, repr=False)
    generators: tuple[torch.Generator, ...] = field(default=(), compare=False, repr=False)

    def _start(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        return _block_starts(x, self.clients, self.generators, super(_BlockStartPGD, self)._start)


def _adversarial_sample_loss(config: FLConfig, generator: torch.Generator,
                             blocks: list[tuple[int, torch.Generator]] | None = None):
    """Per-sample loss of local adversarial training for :func:`train_stacked` (the vectorized path).

    ``blocks``: ``(clients, generator)`` per simulation sharing the batch, each simulation's
    PGD random starts drawn from its own generator (``generator`` is then unused)."""
    if blocks is not None:
        blocks = [(k, g) for k, g in blocks if k > 0]  # a simulation that trains no client this round draws nothing
    if blocks is not None and len(blocks) > 1:
        base = config.local_attack()
        attack = _BlockStartPGD(**{f.name: getattr(base, f.name) for f in fields(base)},
                                clients=tuple(k for k, _ in blocks), generators=tuple(g for _, g in blocks))
    else:
        attack = config.local_attack(generator=generator if blocks is None else blocks[0][1])
    mix = config.adv_mix

    def loss(model: StackedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if mix == 0.0:
            return F.cross_entropy(model(x), y, reduction="none")
        x_adv = attack(model.detached(), x, y)
        if mix == 1.0:
            return F.cross_entropy(model(x_adv), y, reduction="none")
        # Clean and adversarial inputs in one pass, as adversarial_train does; the stacked model needs
        # each client's rows together, so the two halves are joined per client.
        k = model.num_models
        both = torch.cat([x.reshape(k, -1, *x.shape[1:]), x_adv.reshape(k, -1, *x.shape[1:])], dim=1)
        yy = torch.cat([y.reshape(k, -1), y.reshape(k, -1)], dim=1)
        losses = F.cross_entropy(model(both.reshape(-1, *x.shape[1:])), yy.reshape(-1), reduction="none")
        clean, adv = losses.reshape(k, 2, -1).unbind(dim=1)
        return ((1.0 - mix) * clean + mix * adv).reshape(-1)

    return loss


def _client_generator(config: FLConfig, rnd: int, cid: int) -> torch.Generator:
    return make_generator(config.seed * 100_003 + rnd * 1_009 + int(cid))


def _pgd_start_generator(seed: int, rnd: int) -> torch.Generator:
    """The stream of a round's PGD random starts in vectorized adversarial training."""
    return make_generator(seed * 6_113 + rnd)


def _client_data(
    participants: np.ndarray,
    rows: list[int],
    data: Dataset,
    parts: list[torch.Tensor],
    config: FLConfig,
    rnd: int,
    device: torch.device,
    poison: DataPoisoning | None,
    poisoned_mask: np.ndarray | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Generator]]:
    """Each training participant's (possibly poisoned) data and its seeded generator. A poisoning
    whose ``poison`` accepts ``client_id`` (:class:`robustfl_lib.backdoor.DBA`) is told whose data it poisons."""
    xs, ys, gens = [], [], []
    with_id = poison is not None and accepts_keyword(poison.poison, "client_id")
    for row in rows:
        idx = parts[participants[row]]
        x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
        if poison is not None and poisoned_mask is not None and poisoned_mask[row]:
            if with_id:
                x, y = poison.poison(x, y, data.num_classes, client_id=int(participants[row]))
            else:
                x, y = poison.poison(x, y, data.num_classes)
        xs.append(x)
        ys.append(y)
        gens.append(_client_generator(config, rnd, participants[row]))
    return xs, ys, gens


def _train_clients(
    model: nn.Module,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    gens: list[torch.Generator],
    config: FLConfig,
    rnd: int,
    client_update: ClientUpdate | ClientUpdateWithId | None,
    starts: torch.Tensor | None = None,
    blocks: list[tuple[int, int]] | None = None,
    client_ids: list[int] | None = None,
) -> torch.Tensor:
    """Local training of every client: ``(len(xs), d)`` trained flat weights.

    Batched across clients (:func:`robustfl_lib.vectorized.train_stacked`) when
    no custom ``client_update`` is given, ``config.vectorized`` is set and the
    model has no buffers; else client by client. ``starts`` gives each client its
    own starting weights (several simulations sharing one batched call);
    ``blocks`` lists those simulations as ``(clients, seed)`` in row order, so that
    each draws its PGD random starts from its own stream. ``client_ids`` (row order)
    reach a ``client_update`` that accepts ``client_id``."""
    if client_update is None and config.vectorized and _stackable(model):
        sample_loss = None
        start_blocks = None if blocks is None else [(k, _pgd_start_generator(seed, rnd)) for k, seed in blocks]
        if config.local_training in ("adversarial", "fast_fgsm"):
            sample_loss = _adversarial_sample_loss(config, _pgd_start_generator(config.seed, rnd), start_blocks)
        elif config.local_training == "trades":
            sample_loss = _trades_sample_loss(config, _pgd_start_generator(config.seed, rnd), start_blocks)
        elif config.local_training == "certified":
            sample_loss = _certified_sample_loss(config, rnd)
        return train_stacked(model, xs, ys, epochs=config.local_epochs, lr=config.lr, batch_size=config.batch_size,
                             generators=gens, sample_loss=sample_loss, starts=starts, steps=config.local_steps)
    if starts is not None:
        raise ValueError("separate starting weights need the vectorized path (no client_update, vectorized=True)")
    if client_update is None:
        client_update = {"adversarial": adversarial_client_update, "fast_fgsm": adversarial_client_update,
                         "trades": trades_client_update,
                         "certified": functools.partial(certified_client_update, rnd=rnd)}.get(
                             config.local_training, sgd_client_update)
    if client_ids is not None and len(client_ids) != len(xs):
        raise ValueError(f"client_ids must give one id per client: {len(xs)} clients, {len(client_ids)} ids")
    with_id = client_ids is not None and _accepts_client_id(client_update)
    out = []
    for k, (x, y, gen) in enumerate(zip(xs, ys, gens)):
        local = copy.deepcopy(model)
        if with_id:
            client_update(local, x, y, config, gen, client_id=int(client_ids[k]))
        else:
            client_update(local, x, y, config, gen)
        out.append(flatten_state(local.state_dict()))
    return torch.stack(out)


def _boost(updates: torch.Tensor, rows: list[int], poison: DataPoisoning | None, poisoned_mask: np.ndarray | None,
           previous_step: torch.Tensor | None = None) -> None:
    """Model-replacement boosting of backdoor clients' own updates (Bagdasaryan et al. 2020), in place.

    A poisoning with a ``rescale(own, honest)`` method (an adaptive backdoor,
    :class:`robustfl_lib.backdoor.ConstrainAndScale`) sizes its rows against
    this round's honest updates instead of multiplying them by ``boost``; one whose
    ``rescale`` accepts ``previous_step`` (:class:`robustfl_lib.backdoor.Neurotoxin`) also gets
    the aggregate the server applied in the previous round (``None`` in the first round),
    the difference of the two global models an attacker has downloaded."""
    if poison is not None and poisoned_mask is not None and hasattr(poison, "boost"):
        boosted = [r for r in rows if poisoned_mask[r]]
        if hasattr(poison, "rescale"):
            honest = [r for r in rows if not poisoned_mask[r]]
            extra = {"previous_step": previous_step} if accepts_keyword(poison.rescale, "previous_step") else {}
            updates[boosted] = poison.rescale(updates[boosted], updates[honest], **extra).to(updates.dtype)
        else:
            updates[boosted] = updates[boosted] * poison.boost


def compute_client_updates(
    model: nn.Module,
    participants: np.ndarray,
    train_mask: np.ndarray,
    data: Dataset,
    parts: list[torch.Tensor],
    config: FLConfig,
    rnd: int,
    client_update: ClientUpdate | ClientUpdateWithId | None = None,
    poison: DataPoisoning | None = None,
    poisoned_mask: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train a copy of ``model`` for each participant with ``train_mask`` set and
    return ``(updates, sample_counts)``: deltas ``(k, d)`` (rows of untrained
    participants are zero, to be replaced by the attack) and ``(k,)`` counts.
    Participants with ``poisoned_mask`` set train on ``poison``-ed data (and a
    poisoning with a ``boost`` factor scales their update by it).

    ``client_update=None`` trains as ``config.local_training`` says, batched
    across clients when ``config.vectorized`` (and the model has no buffers);
    a custom ``client_update`` runs client by client (told each ``client_id`` if it
    accepts one). These are the raw updates: worker momentum
    (``config.client_momentum``) is applied by the simulation, which keeps the momenta."""
    device = next(model.parameters()).device
    global_vec = flatten_state(model.state_dict())
    updates = torch.zeros(len(participants), global_vec.numel(), dtype=global_vec.dtype, device=device)
    counts = torch.tensor([len(parts[c]) for c in participants], dtype=global_vec.dtype, device=device)
    rows = [r for r in range(len(participants)) if train_mask[r]]
    if rows:
        xs, ys, gens = _client_data(participants, rows, data, parts, config, rnd, device, poison, poisoned_mask)
        ids = [int(participants[r]) for r in rows]
        updates[rows] = _train_clients(model, xs, ys, gens, config, rnd, client_update,
                                       client_ids=ids).to(updates.dtype) - global_vec
        _boost(updates, rows, poison, poisoned_mask)
    return updates, counts


def _stackable(model: nn.Module) -> bool:
    state = model.state_dict()
    return all(torch.is_floating_point(v) for v in state.values()) and len(state) == len(list(model.parameters()))


