"""The federated-learning simulation.

One round of FedAvg-style training (McMahan et al. 2017):

1. the server samples participating clients and sends the global weights ``w``
   (:func:`select_participants`);
2. each client trains locally and returns its update ``u_i = w_i - w``, a delta
   (:func:`compute_client_updates`);
3. Byzantine participants replace their update by an attack computed from the
   honest participants' updates (:func:`apply_byzantine_attack`), unless the
   attack is data poisoning (label flipping), which already acted in step 2;
4. the server sets ``w <- w + A(u_1, ..., u_n)`` for an aggregator ``A``
   (:mod:`robustfl_lib.aggregators`) and records what ``A`` kept (:func:`aggregate_round`);
5. the global model is evaluated on held-out test data: clean accuracy, and
   robust accuracy under PGD when ``eval_eps`` is set.

Clients train with plain SGD (``local_training="standard"``) or adversarially
(``"adversarial"``: PGD inside every minibatch, :func:`robustfl_lib.training.adversarial_train`).
With ``vectorized=True`` all participating clients of a round train in one batched
computation (:mod:`robustfl_lib.vectorized`), equal to the client-by-client loop up
to rounding. Participants may drop out (``dropout``). Every randomness is drawn from
streams seeded by ``seed``, and a run can be checkpointed every ``checkpoint_every``
rounds and resumed, in any process, to exactly the model and history of an
uninterrupted run: the checkpoint holds every random stream the run draws from and
the state of the objects it holds (:mod:`robustfl_lib.checkpoint`), and recognises
the configuration by value, not by ``repr``.

A run owns deep copies of its config's aggregator and attack objects, so runs made
from one object never share state, and :func:`run_grid` runs many configurations
(rules, attacks, Byzantine fractions, and seeds) in lock step, their clients' local
training batched into one computation.

The aggregator, the attack and the client update step are pluggable. Taught in
chapter ``00_introduction`` (FedAvg), ``03_byzantine_threats`` (Byzantine clients)
and ``09_robust_federated_learning`` (the whole pipeline).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pathlib import Path

import torch.nn.functional as F

from ..aggregators import Aggregator, get_aggregator
from ..attacks import PGD
from ..byzantine import ByzantineAttack, DataPoisoning, get_attack
from ..checkpoint import (describe, global_rng_state, isolated_copy, load_checkpoint, load_object_state, object_state,
                         reset_objects, save_checkpoint, set_global_rng_state)
from ..data import Dataset, load_dataset, partition
from ..models import build_model
from ..params import flatten_state, load_vector_
from ..runtime import get_device, make_generator, set_seed
from ..training import adversarial_train, evaluate, train
from ..vectorized import StackedModel, train_stacked

__all__ = [
    "FLConfig",
    "FLResult",
    "ClientUpdate",
    "sgd_client_update",
    "adversarial_client_update",
    "run_federated",
    "byzantine_clients",
    "select_participants",
    "compute_client_updates",
    "apply_byzantine_attack",
    "aggregate_round",
    "config_dict",
    "run_grid",
    "GRID_VARIABLE",
]

# Counting clients from a fraction: 0.2 * 10 must be 2 even though it is 2.0000000000000004.
_EPS = 1e-9


@dataclass
class FLConfig:
    """Settings of one federated run (all have defaults that run on digits in seconds).

    Byzantine clients: ``byzantine_fraction`` of the ``num_clients`` clients
    (rounded down) are Byzantine, the same ones all run (fixed by ``seed``);
    ``byzantine_attack`` is a name from :data:`robustfl_lib.byzantine.ATTACKS`
    (with ``attack_kwargs``) or an attack object. The aggregator tolerates
    ``aggregator_f`` Byzantine clients; ``None`` derives it from the fraction:
    ``floor(byzantine_fraction * clients per round)``.
    """

    dataset: str = "digits"
    model: str = "mlp"
    partition: str = "iid"  #: "iid", "dirichlet" or "shards"
    alpha: float = 0.5  #: Dirichlet concentration (smaller = more label skew)
    num_clients: int = 10
    clients_per_round: int | None = None  #: None: every client, every round
    rounds: int = 20
    local_epochs: int = 2
    lr: float = 0.2
    batch_size: int = 16
    aggregator: str | Aggregator = "mean"
    aggregator_f: int | None = None  #: None: derived from byzantine_fraction
    aggregator_kwargs: dict[str, Any] = field(default_factory=dict)
    byzantine_fraction: float = 0.0
    byzantine_attack: str | ByzantineAttack | DataPoisoning | None = None
    attack_kwargs: dict[str, Any] = field(default_factory=dict)
    local_training: str = "standard"  #: "standard" or "adversarial" (PGD inside each local minibatch)
    adv_eps: float = 0.1  #: local adversarial training: PGD budget
    adv_steps: int = 5  #: ... PGD steps
    adv_alpha: float | None = None  #: ... PGD step size (None: 2.5 * eps / steps)
    adv_norm: str = "linf"  #: ... "linf" or "l2"
    adv_mix: float = 0.5  #: ... weight of the adversarial loss (0.5: Tutorial 157's 50/50; 1.0: Madry et al.)
    adv_random_start: bool = True
    eval_eps: float | None = None  #: robust accuracy under PGD at this budget on the test split (None: skip)
    eval_steps: int = 10  #: ... PGD steps of that evaluation
    eval_every: int = 1  #: evaluate every k rounds (and always after the last)
    dropout: float = 0.0  #: probability that a participant does not answer in a round
    vectorized: bool = True  #: train a round's clients in one batched computation
    checkpoint_every: int = 1  #: with a checkpoint_dir, save every k rounds (and after the last)
    seed: int = 0
    device: str | None = None
    progress: bool = True
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def participants_per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    @property
    def num_byzantine(self) -> int:
        """How many of the clients are Byzantine: ``floor(byzantine_fraction * num_clients)``."""
        return int(math.floor(self.byzantine_fraction * self.num_clients + _EPS))

    @property
    def resolved_aggregator_f(self) -> int:
        """``aggregator_f``, or ``floor(byzantine_fraction * participants_per_round)``."""
        if self.aggregator_f is not None:
            return self.aggregator_f
        return int(math.floor(self.byzantine_fraction * self.participants_per_round + _EPS))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(
                f"clients_per_round must be in [1, num_clients={self.num_clients}], got {self.clients_per_round}"
            )
        for name in ("rounds", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.byzantine_fraction < 1:
            raise ValueError(f"byzantine_fraction must be in [0, 1), got {self.byzantine_fraction}")
        if self.num_byzantine > 0 and self.byzantine_attack is None:
            raise ValueError(
                f"byzantine_fraction={self.byzantine_fraction} makes {self.num_byzantine} client(s) Byzantine "
                "but byzantine_attack is None; name an attack (e.g. 'sign_flip')"
            )
        if self.aggregator_f is not None and (isinstance(self.aggregator_f, bool) or self.aggregator_f < 0):
            raise ValueError(f"aggregator_f must be an integer >= 0 or None, got {self.aggregator_f!r}")
        if self.local_training not in ("standard", "adversarial"):
            raise ValueError(f"local_training must be 'standard' or 'adversarial', got {self.local_training!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.adv_mix <= 1:
            raise ValueError(f"adv_mix must be in [0, 1], got {self.adv_mix}")
        for name in ("eval_every", "checkpoint_every", "adv_steps", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_training == "adversarial":
            self.local_attack()  # raises ValueError for a bad eps, steps or norm
        if self.eval_eps is not None:
            self.eval_attack()

    def local_attack(self, generator: torch.Generator | None = None) -> PGD:
        """The PGD attack of local adversarial training."""
        return PGD(eps=self.adv_eps, alpha=self.adv_alpha, steps=self.adv_steps, norm=self.adv_norm,
                   random_start=self.adv_random_start, generator=generator)

    def eval_attack(self) -> PGD:
        """The PGD attack that measures robust accuracy (same seed every round, so rounds compare)."""
        return PGD(eps=self.eval_eps, steps=self.eval_steps, norm=self.adv_norm, seed=self.seed)


class ClientUpdate(Protocol):
    """Trains ``model`` (a copy of the global model) in place on one client's data."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator
    ) -> None: ...


def sgd_client_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator
) -> None:
    """Local SGD for ``config.local_epochs`` epochs (the FedAvg client)."""
    train(model, x, y, epochs=config.local_epochs, lr=config.lr, batch_size=config.batch_size, generator=generator)


def adversarial_client_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FLConfig, generator: torch.Generator
) -> None:
    """Local adversarial training: ``config.local_epochs`` epochs of PGD training
    (``config.adv_*``) mixing clean and adversarial loss with weight ``config.adv_mix``."""
    # PGD's random starts get their own stream, so the client's minibatch order is that of plain SGD.
    attack = config.local_attack(generator=make_generator(generator.initial_seed() ^ 0x5DEECE66D))
    adversarial_train(model, x, y, attack, epochs=config.local_epochs, mix=config.adv_mix, lr=config.lr,
                      batch_size=config.batch_size, generator=generator)


@dataclass(frozen=True)
class _BlockStartPGD(PGD):
    """PGD whose random start draws consecutive blocks of rows from their own generators.

    In :func:`run_grid` the stacked batch holds several simulations' clients, client-major;
    block ``s`` (``clients[s]`` clients' rows) gets its start from ``generators[s]``, exactly
    the draw that simulation makes when it runs alone."""

    clients: tuple[int, ...] = field(default=(), compare=False, repr=False)
    generators: tuple[torch.Generator, ...] = field(default=(), compare=False, repr=False)

    def _start(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        total = sum(self.clients)
        if total == 0 or x.shape[0] % total:
            raise ValueError(f"a batch of {x.shape[0]} rows cannot be split among {total} clients")
        per = x.shape[0] // total
        blocks = x.split([k * per for k in self.clients])
        return torch.cat([super(_BlockStartPGD, self)._start(b, g) for b, g in zip(blocks, self.generators)])


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


@dataclass
class FLResult:
    """The global model after the last round and one history record per round.

    Each record holds ``"round"``, ``"participants"`` (client ids),
    ``"byzantine"`` (the Byzantine ones among them), ``"aggregation"`` (what
    the aggregator kept, by client id: see :func:`aggregate_round`),
    ``"update_norm"`` (norm of the applied aggregate) and the test metrics
    ``"clean_accuracy"`` and ``"robust_accuracy"``.

    ``aggregator`` and ``attack`` are the run's own copies of the config's
    objects, as the last round left them (``last_info``, carried-over state); the
    objects in ``config`` are never changed by a run.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    config: FLConfig
    byzantine: list[int] = field(default_factory=list)  #: the Byzantine client ids
    aggregator: Any = None  #: the run's aggregator after the last round
    attack: Any = None  #: the run's attack (or data poisoning) after the last round

    def metric(self, key: str) -> np.ndarray:
        """One history column as an array, e.g. ``result.metric("clean_accuracy")``."""
        return np.array([h[key] for h in self.history], dtype=float)


def byzantine_clients(num_clients: int, num_byzantine: int, seed: int) -> np.ndarray:
    """The sorted ids of the Byzantine clients: a seeded random subset, fixed for a run.

    Drawn from its own stream (``default_rng([seed, 1])``) so that adding
    Byzantine clients does not change which clients participate each round.
    """
    if not 0 <= num_byzantine <= num_clients:
        raise ValueError(f"num_byzantine must be in [0, {num_clients}], got {num_byzantine}")
    return np.sort(np.random.default_rng([seed, 1]).choice(num_clients, size=num_byzantine, replace=False))


def select_participants(rng: np.random.Generator, config: FLConfig) -> np.ndarray:
    """This round's participating client ids (sorted), drawn from ``rng``."""
    return np.sort(rng.choice(config.num_clients, size=config.participants_per_round, replace=False))


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
    """Each training participant's (possibly poisoned) data and its seeded generator."""
    xs, ys, gens = [], [], []
    for row in rows:
        idx = parts[participants[row]]
        x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
        if poison is not None and poisoned_mask is not None and poisoned_mask[row]:
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
    client_update: ClientUpdate | None,
    starts: torch.Tensor | None = None,
    blocks: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Local training of every client: ``(len(xs), d)`` trained flat weights.

    Batched across clients (:func:`robustfl_lib.vectorized.train_stacked`) when
    no custom ``client_update`` is given, ``config.vectorized`` is set and the
    model has no buffers; else client by client. ``starts`` gives each client its
    own starting weights (several simulations sharing one batched call);
    ``blocks`` lists those simulations as ``(clients, seed)`` in row order, so that
    each draws its PGD random starts from its own stream."""
    if client_update is None and config.vectorized and _stackable(model):
        sample_loss = None
        if config.local_training == "adversarial":
            pgd_blocks = None if blocks is None else [(k, _pgd_start_generator(seed, rnd)) for k, seed in blocks]
            sample_loss = _adversarial_sample_loss(config, _pgd_start_generator(config.seed, rnd), pgd_blocks)
        return train_stacked(model, xs, ys, epochs=config.local_epochs, lr=config.lr, batch_size=config.batch_size,
                             generators=gens, sample_loss=sample_loss, starts=starts)
    if starts is not None:
        raise ValueError("separate starting weights need the vectorized path (no client_update, vectorized=True)")
    if client_update is None:
        client_update = adversarial_client_update if config.local_training == "adversarial" else sgd_client_update
    out = []
    for x, y, gen in zip(xs, ys, gens):
        local = copy.deepcopy(model)
        client_update(local, x, y, config, gen)
        out.append(flatten_state(local.state_dict()))
    return torch.stack(out)


def _boost(updates: torch.Tensor, rows: list[int], poison: DataPoisoning | None, poisoned_mask: np.ndarray | None) -> None:
    """Model-replacement boosting of backdoor clients' own updates (Bagdasaryan et al. 2020), in place.

    A poisoning with a ``rescale(own, honest)`` method (an adaptive backdoor,
    :class:`robustfl_lib.backdoor.ConstrainAndScale`) sizes its rows against
    this round's honest updates instead of multiplying them by ``boost``."""
    if poison is not None and poisoned_mask is not None and hasattr(poison, "boost"):
        boosted = [r for r in rows if poisoned_mask[r]]
        if hasattr(poison, "rescale"):
            honest = [r for r in rows if not poisoned_mask[r]]
            updates[boosted] = poison.rescale(updates[boosted], updates[honest]).to(updates.dtype)
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
    client_update: ClientUpdate | None = None,
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
    a custom ``client_update`` runs client by client."""
    device = next(model.parameters()).device
    global_vec = flatten_state(model.state_dict())
    updates = torch.zeros(len(participants), global_vec.numel(), dtype=global_vec.dtype, device=device)
    counts = torch.tensor([len(parts[c]) for c in participants], dtype=global_vec.dtype, device=device)
    rows = [r for r in range(len(participants)) if train_mask[r]]
    if rows:
        xs, ys, gens = _client_data(participants, rows, data, parts, config, rnd, device, poison, poisoned_mask)
        updates[rows] = _train_clients(model, xs, ys, gens, config, rnd, client_update).to(updates.dtype) - global_vec
        _boost(updates, rows, poison, poisoned_mask)
    return updates, counts


def _stackable(model: nn.Module) -> bool:
    state = model.state_dict()
    return all(torch.is_floating_point(v) for v in state.values()) and len(state) == len(list(model.parameters()))


def apply_byzantine_attack(
    updates: torch.Tensor, is_byzantine: np.ndarray, attack: ByzantineAttack, generator: torch.Generator,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace the Byzantine rows of ``updates`` by ``attack(honest rows, #Byzantine)``.

    The attacker is omniscient: it sees every honest participant's update of
    this round, and ``counts`` (per row, the sample counts the server weights by)
    as ``weights`` of the honest rows and ``byzantine_weights`` of its own.
    With no honest participant it has nothing to imitate and sends zeros.
    """
    byz = torch.as_tensor(is_byzantine, dtype=torch.bool, device=updates.device)
    num_byz = int(byz.sum())
    if num_byz == 0:
        return updates
    out = updates.clone()
    honest = updates[~byz]
    weighting = {} if counts is None else {"weights": counts[~byz], "byzantine_weights": counts[byz]}
    out[byz] = attack(honest, num_byz, generator=generator, **weighting) if len(honest) else 0.0
    return out


def aggregate_round(
    aggregator: Aggregator, updates: torch.Tensor, counts: torch.Tensor, participants: np.ndarray
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The aggregate update and a JSON-friendly record of what the aggregator kept,
    by client id: ``"selected"`` (clients a selection rule kept), ``"dropped"``
    (clients whose non-finite update was dropped), and per participant, in
    ``participants`` order, ``"kept_fraction"`` / ``"weights"`` when the rule
    reports them; ``"iterations"`` for iterative rules."""
    step = aggregator(updates, weights=counts)
    info = getattr(aggregator, "last_info", {}) or {}
    ids = [int(c) for c in participants]
    record: dict[str, Any] = {}
    if "selected" in info:
        record["selected"] = [ids[i] for i in torch.as_tensor(info["selected"]).reshape(-1).tolist()]
    if "dropped" in info:
        record["dropped"] = [ids[i] for i in info["dropped"]]
    for key in ("kept_fraction", "weights"):
        if key in info:
            record[key] = [round(float(v), 6) for v in info[key].tolist()]
    if "iterations" in info:
        record["iterations"] = int(info["iterations"])
    return step, record


class _Simulation:
    """One federated run's state, advanced one round at a time.

    A round is :meth:`plan` (who participates, who answers, which clients must
    train, on what data), local training (done by the caller, so several
    simulations can share one batched computation), then :meth:`finish`
    (Byzantine forging, aggregation, evaluation, the round's record).

    The simulation owns deep copies (:func:`robustfl_lib.checkpoint.isolated_copy`)
    of its config's aggregator and attack objects, generators and their states
    included: runs made from one object (``dataclasses.replace``, :func:`run_grid`)
    never read each other's state, and the caller's objects are left as they were."""

    def __init__(self, config: FLConfig, data: Dataset, device: torch.device):
        config.validate()
        set_seed(config.seed)
        self.config, self.data, self.device = config, data, device
        self.parts = partition(data.y_train, config.num_clients, config.partition, alpha=config.alpha, seed=config.seed)
        self.aggregator = isolated_copy(
            get_aggregator(config.aggregator, f=config.resolved_aggregator_f, **config.aggregator_kwargs))
        if hasattr(self.aggregator, "requirement"):  # refuse an impossible n/f before any training
            self.aggregator.requirement(config.participants_per_round, self.aggregator.f)
        reset_objects(self.aggregator)
        self.attack = (None if config.byzantine_attack is None
                       else isolated_copy(get_attack(config.byzantine_attack, **config.attack_kwargs)))
        reset_objects(self.attack)  # e.g. a Mimic that fixes its target in the first round
        self.byzantine = byzantine_clients(config.num_clients, config.num_byzantine, config.seed)
        self.poison = self.attack if isinstance(self.attack, DataPoisoning) else None
        self.model = build_model(config.model, data.input_shape, data.num_classes).to(device)
        self.rng = np.random.default_rng(config.seed)
        self.eval_attack = config.eval_attack() if config.eval_eps is not None else None
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, Any] = {}
        #: The global RNG streams as this run left them (run_grid swaps them in; None: use the global ones).
        self._global_rng: dict[str, Any] | None = None

    # -- checkpoints
    def state(self, rnd: int) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: the model, the history, every
        random stream (the run's NumPy generator, the global RNGs of torch (CPU and every CUDA
        device), NumPy and Python) and the state of the objects the run holds (carried-over
        state through ``get_state`` and their generators, :func:`robustfl_lib.checkpoint.object_state`)."""
        return {
            "round": rnd,
            "model": self.model.state_dict(),
            "history": self.history,
            "rng": self.rng.bit_generator.state,
            "global_rng": global_rng_state(),
            "objects": {"aggregator": object_state(self.aggregator, "aggregator"),
                        "attack": object_state(self.attack, "attack")},
            "config": _comparable(self.config),
        }

    def load_state(self, state: dict[str, Any], where: str) -> int:
        diff = sorted(k for k, v in _comparable(self.config).items() if state["config"].get(k) != v)
        if diff:
            raise ValueError(f"the checkpoint in {where} was made with other settings: {diff}")
        self.model.load_state_dict(state["model"])
        self.history = list(state["history"])
        self.rng.bit_generator.state = state["rng"]
        if "global_rng" in state:
            set_global_rng_state(state["global_rng"])
            load_object_state(self.aggregator, state["objects"]["aggregator"], "aggregator", where)
            load_object_state(self.attack, state["objects"]["attack"], "attack", where)
        else:  # a checkpoint from before objects' states were saved: the CPU RNG and the aggregator only
            torch.set_rng_state(state["torch_rng"].cpu())
            if hasattr(self.aggregator, "set_state"):
                self.aggregator.set_state(state["aggregator"])
        return int(state["round"])

    @contextlib.contextmanager
    def own_global_rng(self) -> Iterator[None]:
        """Swap in this simulation's own global RNG streams (torch CPU and CUDA, NumPy, Python) for
        the duration, so that a rule drawing from the global RNG (``NormClipNoise(generator=None)``)
        draws in :func:`run_grid` what it would draw in a run of its own."""
        outer = global_rng_state()
        set_global_rng_state(self._global_rng if self._global_rng is not None else outer)
        try:
            yield
        finally:
            self._global_rng = global_rng_state()
            set_global_rng_state(outer)

    # -- one round
    def plan(self, rnd: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Generator]]:
        """Choose this round's participants; return the data of those who must train."""
        config = self.config
        participants = select_participants(self.rng, config)
        answered = np.random.default_rng([config.seed, 3, rnd]).random(len(participants)) >= config.dropout
        dropped_out = participants[~answered].tolist()
        participants = participants[answered]
        record: dict[str, Any] = {"round": rnd, "participants": participants.tolist(), "dropped_out": dropped_out}
        quorum_error = _quorum_error(self.aggregator, len(participants))
        if quorum_error:  # too few answered for the aggregator's f: the global model stays as it is
            record.update(byzantine=[], aggregation={"skipped": quorum_error}, update_norm=0.0)
            self._pending = {"record": record}
            return [], [], []
        is_byz = np.isin(participants, self.byzantine)
        forged = is_byz if isinstance(self.attack, ByzantineAttack) else np.zeros_like(is_byz)
        rows = [r for r in range(len(participants)) if not forged[r]]
        self._pending = {"record": record, "participants": participants, "is_byz": is_byz, "forged": forged, "rows": rows}
        return _client_data(participants, rows, self.data, self.parts, config, rnd, self.device, self.poison, is_byz)

    def finish(self, rnd: int, trained: torch.Tensor | None) -> dict[str, Any]:
        """Aggregate the trained clients' weights (``(rows, d)``) and the forged updates; evaluate; record."""
        config, pending = self.config, self._pending
        record = pending["record"]
        if "rows" in pending:
            participants, is_byz, forged, rows = pending["participants"], pending["is_byz"], pending["forged"], pending["rows"]
            global_vec = flatten_state(self.model.state_dict())
            updates = torch.zeros(len(participants), global_vec.numel(), dtype=global_vec.dtype, device=self.device)
            if rows:
                updates[rows] = trained.to(updates.dtype) - global_vec
                _boost(updates, rows, self.poison, is_byz)
            counts = torch.tensor([len(self.parts[c]) for c in participants], dtype=updates.dtype, device=self.device)
            if forged.any():
                updates = apply_byzantine_attack(updates, forged, self.attack, make_generator(config.seed * 7_919 + rnd),
                                                 counts)
            step, kept = aggregate_round(self.aggregator, updates, counts, participants)
            load_vector_(self.model, global_vec + step)
            record.update(byzantine=participants[is_byz].tolist(), aggregation=kept,
                          update_norm=float(torch.linalg.vector_norm(step.double())))
        if rnd % config.eval_every == 0 or rnd == config.rounds:
            record.update(evaluate(self.model, self.data.x_test, self.data.y_test, attack=self.eval_attack))
        else:
            record.update(clean_accuracy=None, robust_accuracy=None)
        self.history.append(record)
        self._pending = {}
        return record

    def result(self) -> FLResult:
        return FLResult(model=self.model, history=self.history, config=self.config, byzantine=self.byzantine.tolist(),
                        aggregator=self.aggregator, attack=self.attack)


def run_federated(
    config: FLConfig,
    data: Dataset | None = None,
    client_update: ClientUpdate | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> FLResult:
    """Simulate ``config.rounds`` rounds of federated training; same seed, same history.

    ``data`` skips loading ``config.dataset`` again; ``client_update`` replaces
    the built-in local training (and runs client by client); ``callback``
    receives each round's record as it is made. Byzantine clients
    (``config.byzantine_fraction``) are drawn once by :func:`byzantine_clients`;
    with an update attack they do not train, and their rows are forged from the
    honest participants' updates each round; with data poisoning they train on
    poisoned data.

    The run works on its own copies of ``config``'s aggregator and attack objects
    (returned in :attr:`FLResult.aggregator` / :attr:`FLResult.attack`), reset at the
    start; the objects in ``config``, generators included, are left as they were,
    so running one config twice gives the same history.

    With ``checkpoint_dir``, the state after every ``config.checkpoint_every``
    rounds is saved to ``checkpoint_dir/checkpoint.pt`` (tensors and plain values
    only: it loads with ``weights_only=True``): the model, the history, every
    random stream (the run's own, torch's CPU and CUDA ones, NumPy's, Python's)
    and the objects' states (``get_state()`` and every generator they hold).
    ``resume=True`` continues from it, in this or a new process, and ends with
    exactly the model and history of an uninterrupted run; it refuses a
    checkpoint made with other settings (compared by value: :func:`config_dict`).
    """
    config.validate()
    device = get_device(config.device)
    data = data if data is not None else load_dataset(config.dataset, seed=config.seed, **config.dataset_kwargs)
    sim = _Simulation(config, data, device)
    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
    start = 1
    if resume:
        if ckpt is None:
            raise ValueError("resume=True needs the checkpoint_dir to resume from")
        start = sim.load_state(load_checkpoint(ckpt, map_location=device), str(checkpoint_dir)) + 1
    bar = tqdm(range(start, config.rounds + 1), desc="FL rounds", unit="round", disable=not config.progress)
    for rnd in bar:
        xs, ys, gens = sim.plan(rnd)
        trained = _train_clients(sim.model, xs, ys, gens, config, rnd, client_update) if xs else None
        record = sim.finish(rnd, trained)
        if record["clean_accuracy"] is not None:
            bar.set_postfix(acc=f"{record['clean_accuracy']:.3f}")
        if callback is not None:
            callback(record)
        if ckpt is not None and (rnd % config.checkpoint_every == 0 or rnd == config.rounds):
            save_checkpoint(ckpt, sim.state(rnd))
    return sim.result()


#: Settings that may differ between the runs of :func:`run_grid`; all others must agree.
GRID_VARIABLE = ("aggregator", "aggregator_f", "aggregator_kwargs", "byzantine_fraction", "byzantine_attack",
                 "attack_kwargs", "eval_eps", "eval_steps", "progress", "seed")


def _grid_data(configs: list[FLConfig], data: Dataset | Mapping[int, Dataset] | None) -> list[Dataset]:
    """Each config's dataset: ``data`` itself, ``data[seed]``, or ``load_dataset(dataset, seed=seed)``
    loaded once per distinct seed."""
    if data is None:
        base = configs[0]
        cache = {seed: load_dataset(base.dataset, seed=seed, **base.dataset_kwargs)
                 for seed in dict.fromkeys(c.seed for c in configs)}
        return [cache[c.seed] for c in configs]
    if isinstance(data, Mapping):
        missing = sorted({c.seed for c in configs} - set(data))
        if missing:
            raise ValueError(f"data has datasets for seeds {sorted(data)} but not for the configs' seed(s) {missing}")
        return [data[c.seed] for c in configs]
    return [data] * len(configs)


def run_grid(
    configs: list[FLConfig], data: Dataset | Mapping[int, Dataset] | None = None, progress: bool = True
) -> list[FLResult]:
    """Run several federated simulations in lock step: a grid of rules, attacks and seeds.

    Every round, the local training of *all* runs' clients is one batched
    computation (:func:`robustfl_lib.vectorized.train_stacked` with each run's
    global weights as its clients' starting points), which makes a grid of
    aggregators x attacks x Byzantine fractions (chapter
    ``09_robust_federated_learning``), or one configuration over k seeds (the
    evidence of :mod:`robustfl_lib.evidence`), cost little more than one run.

    The configs may differ only in :data:`GRID_VARIABLE`, which includes ``seed``:
    runs with different seeds have their own data split, partition, model
    initialisation, Byzantine clients and client streams. ``data`` is one
    :class:`~robustfl_lib.data.Dataset` shared by all runs, a dict ``{seed: Dataset}``,
    or ``None``: each distinct seed loads ``load_dataset(dataset, seed=seed)`` once.
    ``vectorized`` must be on, and the model must have no buffers.

    Each run owns copies of its aggregator and attack objects and its own global
    RNG streams, swapped in while its rounds are planned and finished, and draws its
    PGD random starts (adversarial local training) from its own stream; so each
    result equals ``run_federated(config)`` up to the floating-point rounding of
    the batched computation, whether or not the configs share objects.
    """
    if not configs:
        raise ValueError("run_grid needs at least one config")
    ref = config_dict(configs[0])
    for i, c in enumerate(configs[1:], 1):
        diff = sorted(k for k, v in config_dict(c).items() if k not in GRID_VARIABLE and v != ref[k])
        if diff:
            raise ValueError(f"config {i} differs from config 0 in {diff}; run_grid runs may differ only in {GRID_VARIABLE}")
    base = configs[0]
    if not base.vectorized:
        raise ValueError("run_grid trains all runs in one batched computation: set vectorized=True")
    device = get_device(base.device)
    datasets = _grid_data(configs, data)
    shapes = {(tuple(d.input_shape), d.num_classes) for d in datasets}
    if len(shapes) > 1:
        raise ValueError(f"run_grid trains every run's clients through one model architecture, but the datasets "
                         f"have different (input shape, classes): {sorted(shapes)}")
    sims = []
    for c, d in zip(configs, datasets):
        sims.append(_Simulation(c, d, device))
        sims[-1]._global_rng = global_rng_state()  # as a run of its own would start its rounds
    if not _stackable(sims[0].model):
        raise ValueError("run_grid needs a model without buffers (no BatchNorm); use run_federated")
    for rnd in tqdm(range(1, base.rounds + 1), desc="FL grid rounds", unit="round", disable=not progress):
        plans = []
        for sim in sims:
            with sim.own_global_rng():
                plans.append(sim.plan(rnd))
        xs = [x for p in plans for x in p[0]]
        if xs:
            ys = [y for p in plans for y in p[1]]
            gens = [g for p in plans for g in p[2]]
            starts = torch.cat([flatten_state(sim.model.state_dict()).expand(len(p[0]), -1)
                                for sim, p in zip(sims, plans)])
            blocks = [(len(p[0]), sim.config.seed) for sim, p in zip(sims, plans)]
            trained = _train_clients(sims[0].model, xs, ys, gens, base, rnd, None, starts=starts, blocks=blocks)
            chunks = trained.split([len(p[0]) for p in plans])
        else:
            chunks = [None] * len(sims)
        for sim, chunk in zip(sims, chunks):
            with sim.own_global_rng():
                sim.finish(rnd, chunk if chunk is not None and len(chunk) else None)
    return [sim.result() for sim in sims]


def _quorum_error(aggregator: Aggregator, answered: int) -> str | None:
    """Why ``answered`` updates are too few to aggregate this round, or ``None``."""
    if answered == 0:
        return "no participant answered"
    if hasattr(aggregator, "requirement"):
        try:
            aggregator.requirement(answered, aggregator.f)
        except ValueError as err:
            return f"only {answered} participant(s) answered: {err}"
    return None


def _comparable(config: FLConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint (all but rounds, progress, device,
    checkpoint_every), by value: nested descriptions as their (canonical, sorted) repr, which is
    also what checkpoints of plain configs held before objects were described."""
    d = config_dict(config)
    for key in ("rounds", "progress", "device", "checkpoint_every"):
        d.pop(key)
    return {k: (repr(v) if isinstance(v, (list, dict)) else v) for k, v in d.items()}


def config_dict(config: FLConfig) -> dict[str, Any]:
    """``config`` as a JSON-friendly dict, for logs, CSV files and checkpoints.

    Names and numbers stay as they are; aggregator, attack and other objects are
    described by value (:func:`robustfl_lib.checkpoint.describe`: class name and
    public attributes, a generator by its device and initial seed), so two configs
    with equal settings give equal dicts, in any process."""
    return {f.name: describe(getattr(config, f.name)) for f in fields(config)}
