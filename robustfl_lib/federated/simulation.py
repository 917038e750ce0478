"""One federated run, round by round (:class:`_Simulation`, :func:`run_federated`), and its result
(:class:`FLResult`); checkpoints and exact resume."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..aggregators import get_aggregator
from ..byzantine import ByzantineAttack, DataPoisoning
from ..checkpoint import (global_rng_state, isolated_copy, load_checkpoint, load_object_state, object_state,
                          reset_objects, save_checkpoint, set_global_rng_state)
from ..data import Dataset, load_dataset, partition
from ..models import build_model
from ..params import flatten_state, load_vector_
from ..runtime import get_device, make_generator, set_seed
from ..training import evaluate
from .clients import ClientUpdate, ClientUpdateWithId, _boost, _client_data, _train_clients
from .config import FLConfig, _comparable
from .momentum import WorkerMomentum
from .server import (_make_attack, _quorum_error, aggregate_round, apply_byzantine_attack, byzantine_clients,
                     select_participants)

#: A per-round metric: called on the global model after an evaluated round, returns a number.
Metric = Callable[[nn.Module], float]
#: Keys of a round's record that a metric may not overwrite.
_RECORD_KEYS = ("round", "participants", "dropped_out", "byzantine", "aggregation", "update_norm", "clean_accuracy",
                "robust_accuracy", "attacking")
#: The client id the server's own training row carries (a custom ClientUpdate that takes client_id sees it).
SERVER_ID = -1


def _check_metrics(metrics: Mapping[str, Metric] | None) -> dict[str, Metric]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping {{name: callable(model) -> float}}, got {type(metrics).__name__}")
    for name, fn in metrics.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric names must be non-empty strings, got {name!r}")
        if name in _RECORD_KEYS:
            raise ValueError(f"metric name {name!r} would overwrite the round record's own key; choose another")
        if not callable(fn):
            raise TypeError(f"metric {name!r} must be a callable(model) -> float, got {type(fn).__name__}")
    return dict(metrics)


def root_indices(config: FLConfig, num_train: int) -> torch.Tensor | None:
    """The server's root samples (indices into the training set, sorted), or ``None`` when
    ``config.server_root_size`` is 0: ``server_root_size`` indices drawn uniformly without
    replacement from ``range(num_train)`` by ``numpy.random.default_rng([seed, 5])``, a stream of
    their own (so the partition, participants and Byzantine clients keep theirs)."""
    m = config.server_root_size
    if m == 0:
        return None
    if m > num_train - config.num_clients:
        raise ValueError(f"server_root_size={m} leaves fewer than num_clients={config.num_clients} of the "
                         f"{num_train} training samples for the clients")
    picked = np.random.default_rng([config.seed, 5]).choice(num_train, size=m, replace=False)
    return torch.from_numpy(np.sort(picked)).long()


def _server_generator(config: FLConfig, rnd: int) -> torch.Generator:
    """The stream of the server's local training in round ``rnd`` (apart from every client's)."""
    return make_generator(config.seed * 104_729 + rnd * 2_003 + 500_009)

__all__ = ["FLResult", "run_federated", "root_indices"]


@dataclass
class FLResult:
    """The global model after the last round and one history record per round.

    Each record holds ``"round"``, ``"participants"`` (client ids),
    ``"byzantine"`` (the Byzantine ones among them), ``"aggregation"`` (what
    the aggregator kept, by client id: see :func:`aggregate_round`),
    ``"update_norm"`` (norm of the applied aggregate) and the test metrics
    ``"clean_accuracy"`` and ``"robust_accuracy"``; with ``FLConfig.attack_rounds`` also
    ``"attacking"`` (whether the Byzantine clients attacked that round), and one entry per
    ``metrics`` name given to :func:`run_federated`.

    ``aggregator`` and ``attack`` are the run's own copies of the config's
    objects, as the last round left them (``last_info``, carried-over state); the
    objects in ``config`` are never changed by a run. ``momentum`` is the run's
    :class:`~robustfl_lib.federated.WorkerMomentum` (every client's momentum after the
    last round) when ``config.client_momentum > 0``, else ``None``.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    config: FLConfig
    byzantine: list[int] = field(default_factory=list)  #: the Byzantine client ids
    aggregator: Any = None  #: the run's aggregator after the last round
    attack: Any = None  #: the run's attack (or data poisoning) after the last round
    momentum: WorkerMomentum | None = None  #: the clients' momenta after the last round (client_momentum > 0)

    def metric(self, key: str) -> np.ndarray:
        """One history column as an array, e.g. ``result.metric("clean_accuracy")``."""
        return np.array([h[key] for h in self.history], dtype=float)


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

    def __init__(self, config: FLConfig, data: Dataset, device: torch.device,
                 metrics: Mapping[str, Metric] | None = None):
        config.validate()
        self.metrics = _check_metrics(metrics)
        set_seed(config.seed)
        self.config, self.data, self.device = config, data, device
        #: The server's root samples (None without server data); the clients share the rest.
        self.root = root_indices(config, len(data.y_train))
        if self.root is None:
            self.parts = partition(data.y_train, config.num_clients, config.partition, alpha=config.alpha,
                                   seed=config.seed)
        else:
            rest = torch.from_numpy(np.setdiff1d(np.arange(len(data.y_train)), self.root.numpy())).long()
            self.parts = [rest[p] for p in partition(data.y_train[rest], config.num_clients, config.partition,
                                                     alpha=config.alpha, seed=config.seed)]
        self.aggregator = isolated_copy(
            get_aggregator(config.aggregator, f=config.resolved_aggregator_f, **config.aggregator_kwargs))
        if hasattr(self.aggregator, "requirement"):  # refuse an impossible n/f before any training
            self.aggregator.requirement(config.participants_per_round, self.aggregator.f)
        reset_objects(self.aggregator)
        #: Whether the aggregator gets the server's own update each round (FLTrust).
        self.server_update = bool(getattr(self.aggregator, "needs_server_update", False))
        if self.server_update and self.root is None:
            raise ValueError(f"aggregator {self.aggregator!r} needs the server's own update, trained on root data "
                             f"the server holds: set FLConfig.server_root_size > 0 (it is "
                             f"{config.server_root_size})")
        self.attack = isolated_copy(_make_attack(config, self.aggregator))
        reset_objects(self.attack)  # e.g. a Mimic that fixes its target in the first round
        self.byzantine = byzantine_clients(config.num_clients, config.num_byzantine, config.seed)
        self.poison = self.attack if isinstance(self.attack, DataPoisoning) else None
        self.model = build_model(config.model, data.input_shape, data.num_classes, **config.model_kwargs).to(device)
        self.rng = np.random.default_rng(config.seed)
        self.eval_attack = config.eval_attack() if config.eval_eps is not None else None
        #: Every client's momentum (None: clients send their updates, bitwise as without the feature).
        self.momentum = (WorkerMomentum(config.client_momentum, config.num_clients, config.client_momentum_init)
                         if config.client_momentum > 0 else None)
        self.history: list[dict[str, Any]] = []
        #: The aggregate applied in the last round that applied one (a backdoor's rescale may ask for it).
        self.previous_step: torch.Tensor | None = None
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
                        "attack": object_state(self.attack, "attack"),
                        "momentum": object_state(self.momentum, "momentum")},
            "previous_step": self.previous_step,
            "config": _comparable(self.config),
        }

    def load_state(self, state: dict[str, Any], where: str) -> int:
        # A setting added after the checkpoint was written ran at its default there.
        saved = {**_comparable(FLConfig()), **state["config"]}
        diff = sorted(k for k, v in _comparable(self.config).items() if saved.get(k) != v)
        if diff:
            raise ValueError(f"the checkpoint in {where} was made with other settings: {diff}")
        self.model.load_state_dict(state["model"])
        self.history = list(state["history"])
        self.rng.bit_generator.state = state["rng"]
        if "global_rng" in state:
            set_global_rng_state(state["global_rng"])
            load_object_state(self.aggregator, state["objects"]["aggregator"], "aggregator", where)
            load_object_state(self.attack, state["objects"]["attack"], "attack", where)
            load_object_state(self.momentum, state["objects"].get("momentum", object_state(None)), "momentum", where)
            self.previous_step = state.get("previous_step")
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
        if config.attack_rounds is not None:
            record["attacking"] = config.attacks_in_round(rnd)
            if not record["attacking"]:  # outside the schedule the Byzantine clients train honestly on clean data
                is_byz = np.zeros_like(is_byz)
        forged = is_byz if isinstance(self.attack, ByzantineAttack) else np.zeros_like(is_byz)
        rows = [r for r in range(len(participants)) if not forged[r]]
        self._pending = {"record": record, "participants": participants, "is_byz": is_byz, "forged": forged, "rows": rows}
        xs, ys, gens = _client_data(participants, rows, self.data, self.parts, config, rnd, self.device, self.poison,
                                    is_byz)
        if self.server_update:  # the server's own update, trained as the clients train, is the last row
            xs.append(self.data.x_train[self.root].to(self.device))
            ys.append(self.data.y_train[self.root].to(self.device))
            gens.append(_server_generator(config, rnd))
            self._pending["server_row"] = True
        return xs, ys, gens

    def finish(self, rnd: int, trained: torch.Tensor | None) -> dict[str, Any]:
        """Aggregate the trained clients' weights (``(rows, d)``) and the forged updates; evaluate; record."""
        config, pending = self.config, self._pending
        record = pending["record"]
        if "rows" in pending:
            participants, is_byz, forged, rows = pending["participants"], pending["is_byz"], pending["forged"], pending["rows"]
            global_vec = flatten_state(self.model.state_dict())
            updates = torch.zeros(len(participants), global_vec.numel(), dtype=global_vec.dtype, device=self.device)
            reference = None
            if pending.get("server_row"):
                reference = trained[-1].to(updates.dtype) - global_vec
                trained = trained[:-1]
            if rows:
                updates[rows] = trained.to(updates.dtype) - global_vec
                if self.momentum is not None:
                    # Clients send their momenta; the attack below, and a boosting backdoor, see the sent vectors.
                    updates[rows] = self.momentum(updates[rows], participants[rows])
                _boost(updates, rows, self.poison, is_byz, self.previous_step)
            counts = torch.tensor([len(self.parts[c]) for c in participants], dtype=updates.dtype, device=self.device)
            if forged.any():
                updates = apply_byzantine_attack(updates, forged, self.attack, make_generator(config.seed * 7_919 + rnd),
                                                 counts)
            step, kept = aggregate_round(self.aggregator, updates, counts, participants, global_model=global_vec,
                                         reference=reference)
            load_vector_(self.model, global_vec + step)
            self.previous_step = step.detach().clone()
            record.update(byzantine=participants[is_byz].tolist(), aggregation=kept,
                          update_norm=float(torch.linalg.vector_norm(step.double())))
        if rnd % config.eval_every == 0 or rnd == config.rounds:
            record.update(evaluate(self.model, self.data.x_test, self.data.y_test, attack=self.eval_attack))
            for name, fn in self.metrics.items():
                record[name] = self._measure(name, fn)
        else:
            record.update(clean_accuracy=None, robust_accuracy=None)
            record.update({name: None for name in self.metrics})
        self.history.append(record)
        self._pending = {}
        return record

    def _measure(self, name: str, fn: Metric) -> float:
        """``fn(model)`` as a float, the model in eval mode meanwhile (its mode restored after)."""
        was_training = self.model.training
        self.model.eval()
        try:
            value = fn(self.model)
        finally:
            self.model.train(was_training)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"metric {name!r} must return a number, got {type(value).__name__}")
        return float(value)

    def training_clients(self) -> list[int]:
        """The ids of the clients that :meth:`plan` returned data for, in its order (the server's own
        row, when the aggregator wants the server's update, last, as :data:`SERVER_ID`)."""
        pending = self._pending
        ids = [int(pending["participants"][r]) for r in pending.get("rows", [])]
        return ids + [SERVER_ID] if pending.get("server_row") else ids

    def result(self) -> FLResult:
        return FLResult(model=self.model, history=self.history, config=self.config, byzantine=self.byzantine.tolist(),
                        aggregator=self.aggregator, attack=self.attack, momentum=self.momentum)


def run_federated(
    config: FLConfig,
    data: Dataset | None = None,
    client_update: ClientUpdate | ClientUpdateWithId | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    metrics: Mapping[str, Metric] | None = None,
) -> FLResult:
    """Simulate ``config.rounds`` rounds of federated training; same seed, same history.

    ``data`` skips loading ``config.dataset`` again; ``client_update`` replaces
    the built-in local training (and runs client by client; one that accepts a
    ``client_id`` keyword is told which client it trains, :class:`ClientUpdate`);
    ``callback`` receives each round's record as it is made. ``metrics``
    (``{name: callable(model) -> float}``, e.g. ``{"attack_success_rate": lambda m:
    attack_success_rate(m, x, y, trigger)}``) are measured on the global model (in eval mode;
    they must not change it) after every evaluated round (``eval_every``, and the last) and
    recorded under their names, ``None`` in the other rounds. Byzantine clients
    (``config.byzantine_fraction``) are drawn once by :func:`byzantine_clients`;
    with an update attack they do not train, and their rows are forged from the
    honest participants' updates each round; with data poisoning they train on
    poisoned data. With worker momentum (``config.client_momentum > 0``) every
    client that trains sends its momentum (:class:`WorkerMomentum`), and the
    attack sees the honest clients' momenta, what they send; data-poisoning
    clients follow the protocol on their poisoned data (momentum included), and a
    boosting backdoor scales the momentum it sends.

    The run works on its own copies of ``config``'s aggregator and attack objects
    (returned in :attr:`FLResult.aggregator` / :attr:`FLResult.attack`), reset at the
    start; the objects in ``config``, generators included, are left as they were,
    so running one config twice gives the same history.

    With ``checkpoint_dir``, the state after every ``config.checkpoint_every``
    rounds is saved to ``checkpoint_dir/checkpoint.pt`` (tensors and plain values
    only: it loads with ``weights_only=True``): the model, the history, every
    random stream (the run's own, torch's CPU and CUDA ones, NumPy's, Python's)
    and the objects' states (``get_state()`` and every generator they hold), the
    clients' momenta included.
    ``resume=True`` continues from it, in this or a new process, and ends with
    exactly the model and history of an uninterrupted run; it refuses a
    checkpoint made with other settings (compared by value: :func:`config_dict`).
    """
    config.validate()
    device = get_device(config.device)
    data = data if data is not None else load_dataset(config.dataset, seed=config.seed, **config.dataset_kwargs)
    sim = _Simulation(config, data, device, metrics)
    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
    start = 1
    if resume:
        if ckpt is None:
            raise ValueError("resume=True needs the checkpoint_dir to resume from")
        start = sim.load_state(load_checkpoint(ckpt, map_location=device), str(checkpoint_dir)) + 1
    bar = tqdm(range(start, config.rounds + 1), desc="FL rounds", unit="round", disable=not config.progress)
    for rnd in bar:
        xs, ys, gens = sim.plan(rnd)
        trained = (_train_clients(sim.model, xs, ys, gens, config, rnd, client_update, client_ids=sim.training_clients())
                   if xs else None)
        record = sim.finish(rnd, trained)
        if record["clean_accuracy"] is not None:
            bar.set_postfix(acc=f"{record['clean_accuracy']:.3f}")
        if callback is not None:
            callback(record)
        if ckpt is not None and (rnd % config.checkpoint_every == 0 or rnd == config.rounds):
            save_checkpoint(ckpt, sim.state(rnd))
    return sim.result()


