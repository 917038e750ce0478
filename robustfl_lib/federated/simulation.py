"""One federated run, round by round (:class:`_Simulation`, :func:`run_federated`), and its result
(:class:`FLResult`); checkpoints and exact resume."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..aggregators import get_aggregator
from ..byzantine import ByzantineAttack, DataPoisoning, get_attack
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
from .server import _quorum_error, aggregate_round, apply_byzantine_attack, byzantine_clients, select_participants

__all__ = ["FLResult", "run_federated"]


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
        #: Every client's momentum (None: clients send their updates, bitwise as without the feature).
        self.momentum = (WorkerMomentum(config.client_momentum, config.num_clients, config.client_momentum_init)
                         if config.client_momentum > 0 else None)
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
                        "attack": object_state(self.attack, "attack"),
                        "momentum": object_state(self.momentum, "momentum")},
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
                if self.momentum is not None:
                    # Clients send their momenta; the attack below, and a boosting backdoor, see the sent vectors.
                    updates[rows] = self.momentum(updates[rows], participants[rows])
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

    def training_clients(self) -> list[int]:
        """The ids of the clients that :meth:`plan` returned data for, in its order."""
        pending = self._pending
        return [int(pending["participants"][r]) for r in pending.get("rows", [])]

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
) -> FLResult:
    """Simulate ``config.rounds`` rounds of federated training; same seed, same history.

    ``data`` skips loading ``config.dataset`` again; ``client_update`` replaces
    the built-in local training (and runs client by client; one that accepts a
    ``client_id`` keyword is told which client it trains, :class:`ClientUpdate`);
    ``callback`` receives each round's record as it is made. Byzantine clients
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


