"""The ServerApp: the round loop that runs in Flower's simulation engine and on a real federation.

:func:`make_server_app` builds the global model exactly as
:func:`~robustfl_lib.run_federated` does (same seed, same initial weights) and runs
``config.rounds`` rounds of :class:`~robustfl_lib.flower.strategy.RobustStrategy`. It keeps
its own loop instead of Flower's ``Strategy.start``, for what a federation of real devices
needs and ``start`` does not do:

* **no wait without end** (:class:`~robustfl_lib.flower.config.DeploymentSettings`): the run
  waits at most ``wait_for_nodes`` seconds for its ``num_clients`` SuperNodes, then starts
  with those connected; each round waits at most ``round_timeout`` seconds for its replies;
* **lost nodes are named**: a node asked in a round that has not answered by the deadline is
  recorded under ``"lost"`` with its node id and partition id, and sits out the next
  ``bench_rounds`` rounds; an error reply (the SuperLink's, for a node whose heartbeat lapsed)
  is recorded under the node that was asked, not the SuperLink's own id;
* **the quorum rule of** :func:`~robustfl_lib.run_federated`: when fewer usable replies come
  back than the rule's ``f`` needs, the round is skipped and the model kept;
* **checkpoints and resume** through :mod:`robustfl_lib.checkpoint` (``weights_only=True``):
  model, history, the participants' generator, the global RNGs and the aggregator's and
  attack's states, every ``FLConfig.checkpoint_every`` rounds and after the last.

In the simulation engine (``same_participants=True``) each round trains the partitions
:func:`~robustfl_lib.federated.select_participants` draws, as ``run_federated`` does; on a
real federation every round trains ``clients_per_round`` of the connected nodes (all by
default), drawn from a per-round seeded stream. Chapter ``14_scaling_out_with_flower``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from ..byzantine import ByzantineAttack
from ..checkpoint import (global_rng_state, load_checkpoint, load_object_state, object_state, save_checkpoint,
                          set_global_rng_state)
from ..data import Dataset
from ..federated import FLConfig
from ..federated.config import _comparable
from ..models import build_model
from ..runtime import get_device, set_seed
from ..training import evaluate
from .config import DeploymentSettings, cached_dataset, config_from_run_config, settings_from_run_config
from .federation import (aggregator_for, attack_for, byzantine_clients, check_flower_config, eval_attack_for,
                         round_participants)
from .strategy import Collusion, RobustStrategy, record_to_state, state_to_record

__all__ = ["make_server_app", "CHECKPOINT_NAME", "exchange"]

#: File name of the ServerApp's checkpoint inside ``checkpoint_dir``.
CHECKPOINT_NAME = "checkpoint.pt"
_POLL_SECONDS = 0.5  # Flower's HTTP grid polls every 3 s; a round's end should not wait for the next poll


def exchange(grid: Grid, messages: Sequence[Message], timeout: float) -> tuple[list[Message], list[int]]:
    """Push ``messages`` and pull their replies until all have come or ``timeout`` seconds passed.

    Returns the replies and the destination node ids of the messages left without one.
    Chapter ``14_scaling_out_with_flower``.
    """
    if not messages:
        return [], []
    ids = list(grid.push_messages(messages))
    waiting = {i: m.metadata.dst_node_id for i, m in zip(ids, messages) if i}
    refused = [m.metadata.dst_node_id for i, m in zip(ids, messages) if not i]
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            if waiting.pop(reply.metadata.reply_to_message_id, None) is not None:
                replies.append(reply)
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_SECONDS)
    return replies, refused + sorted(waiting.values())


def _wait_for_nodes(grid: Grid, wanted: int, needed: int, seconds: float, exclude: set[int]) -> list[int]:
    """The connected node ids (less ``exclude``), after waiting up to ``seconds`` for ``wanted`` of them;
    stops waiting early only when ``wanted`` are there, returns what is there (maybe under ``needed``)."""
    deadline = time.monotonic() + seconds
    last = -1
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids() if int(n) not in exclude)
        if len(nodes) >= wanted or time.monotonic() >= deadline:
            return nodes
        if len(nodes) != last:
            log(INFO, "robustfl: %d of %d SuperNodes connected (at least %d needed); waiting up to %.0f s more",
                len(nodes), wanted, needed, deadline - time.monotonic())
            last = len(nodes)
        time.sleep(_POLL_SECONDS)


def _quorum(aggregator) -> int:
    """The fewest replies ``aggregator`` accepts with its ``f`` (the quorum rule)."""
    if not hasattr(aggregator, "requirement"):
        return 1
    for n in range(1, 10_000):
        try:
            aggregator.requirement(n, aggregator.f)
            return n
        except ValueError:
            continue
    raise ValueError(f"{aggregator!r} accepts no number of clients with f={aggregator.f}")


def make_server_app(
    config: FLConfig | None = None,
    data: Dataset | None = None,
    weighting: str = "equal",
    collude: bool = True,
    same_participants: bool = True,
    callback: Callable[[dict[str, Any]], None] | None = None,
    store: dict[str, Any] | None = None,
    settings: DeploymentSettings | None = None,
) -> ServerApp:
    """A ``ServerApp`` that trains ``config`` with a robustfl aggregator (module docstring).

    Without ``config`` the run config is read (real deployments), the
    :class:`~robustfl_lib.flower.config.DeploymentSettings` too unless ``settings`` is given.
    ``weighting`` goes to :class:`~robustfl_lib.flower.strategy.RobustStrategy`. With
    ``collude`` and a Byzantine fraction the server simulates the omniscient attackers'
    :class:`~robustfl_lib.flower.strategy.Collusion` on flagged replies (harmless when the
    Byzantine clients attack with local knowledge: nothing is flagged). With
    ``same_participants`` each round trains the partitions ``run_federated`` draws (the
    strategy asks every node once which partition it holds) and the history names the
    Byzantine participants, as ``run_federated``'s does; without it the connected nodes train
    and the server does not know who is Byzantine (``"byzantine"`` is absent). The record of
    each round goes to ``callback``; ``store`` (a dict) receives the ``"history"``, the final
    ``"state"`` and the ``"strategy"``.

    Chapter ``14_scaling_out_with_flower``.
    """
    if config is not None:
        check_flower_config(config)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else config_from_run_config(context.run_config)
        opts = settings if settings is not None else settings_from_run_config(context.run_config)
        check_flower_config(cfg)
        set_seed(cfg.seed)
        ds = data if data is not None else cached_dataset(cfg)
        device = get_device(cfg.device)
        model = build_model(cfg.model, ds.input_shape, ds.num_classes).to(device)
        n, k = cfg.num_clients, cfg.participants_per_round
        aggregator = aggregator_for(cfg)
        attack = attack_for(cfg)
        collusion = Collusion(attack, seed=cfg.seed) if collude and isinstance(attack, ByzantineAttack) else None
        byzantine = set(byzantine_clients(cfg))
        rng = np.random.default_rng(cfg.seed)  # the participants run_federated draws, round by round
        dropped_out: dict[int, list[int]] = {}

        def select(server_round: int) -> list[int]:
            answering, dropped_out[server_round] = round_participants(cfg, rng, server_round)
            return answering

        strategy = RobustStrategy(
            aggregator=aggregator, f=aggregator.f, weighting=weighting, collusion=collusion,
            fraction_train=k / n, min_train_nodes=k, min_available_nodes=n,
            select=select if same_participants else None,
        )
        eval_attack = eval_attack_for(cfg)
        quorum = _quorum(strategy.aggregator)
        history: list[dict[str, Any]] = []
        ckpt = Path(opts.checkpoint_dir) / CHECKPOINT_NAME if opts.checkpoint_dir else None
        objects = {"aggregator": strategy.aggregator, "collusion": collusion}

        start = 1
        if opts.resume:
            saved = load_checkpoint(ckpt)
            diff = sorted(key for key, v in _comparable(cfg).items() if saved["config"].get(key) != v)
            if diff:
                raise ValueError(f"the checkpoint in {opts.checkpoint_dir} was made with other settings: {diff}")
            model.load_state_dict(saved["model"])
            history.extend(saved["history"])
            rng.bit_generator.state = saved["rng"]
            set_global_rng_state(saved["global_rng"])
            for name, obj in objects.items():
                load_object_state(obj, saved["objects"][name], name, str(ckpt))
            start = int(saved["round"]) + 1
            log(INFO, "robustfl: resumed from %s after round %d", ckpt, start - 1)

        benched: dict[int, int] = {}  # node id -> last round it sits out
        if not same_participants and start <= cfg.rounds:
            nodes = _wait_for_nodes(grid, n, quorum, opts.wait_for_nodes, set())
            log(INFO, "robustfl: starting with %d of %d SuperNodes (the rule needs %d)", len(nodes), n, quorum)

        for rnd in range(start, cfg.rounds + 1):
            arrays = state_to_record(model.state_dict())
            if same_participants:
                messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
            else:
                resting = {node for node, last in benched.items() if last >= rnd}
                nodes = _wait_for_nodes(grid, quorum, quorum, opts.wait_for_nodes, resting)
                if len(nodes) > k:  # clients_per_round of them, from a stream of this round's own
                    nodes = sorted(np.random.default_rng([cfg.seed, 4, rnd]).choice(nodes, k, replace=False).tolist())
                messages = strategy.train_messages(rnd, arrays, ConfigRecord(), nodes)
            replies, unanswered = exchange(grid, messages, opts.round_timeout)
            strategy.expect_replies(messages)
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
            done = strategy.rounds[-1]
            # A node that died is lost either way: no reply by the deadline, or, if the SuperLink
            # noticed first (no heartbeat for 2 x 30 s), an error reply it made for the node; the
            # latter is already under "failures" with its reason.
            offline = [strategy.sender(r) for r in replies
                       if r.has_error() and r.error.code == ErrorCode.NODE_UNAVAILABLE]
            lost = [{"node": int(node), "partition": strategy.partition_of.get(node)} for node in unanswered + offline]
            for node in unanswered:
                done["failures"].append(f"{strategy.node_name(node)}: no reply within {opts.round_timeout:g} s")
            for node in unanswered + offline:
                benched[node] = rnd + opts.bench_rounds
                log(WARNING, "robustfl round %d: %s is lost (%s); it sits out %d round(s)", rnd, strategy.node_name(node),
                    f"no reply within {opts.round_timeout:g} s" if node in unanswered else "the SuperLink reports it "
                    "unavailable", opts.bench_rounds)
            if new_arrays is not None:
                model.load_state_dict(record_to_state(new_arrays))
            participants = done.get("participants", [])
            skipped = "skipped" in done.get("aggregation", {})
            record: dict[str, Any] = {"round": rnd, "participants": participants,
                                      "dropped_out": dropped_out.get(rnd, [])}
            if same_participants:
                record["byzantine"] = ([] if skipped or not cfg.attacks_in_round(rnd)
                                       else [c for c in participants if c in byzantine])
            record.update(aggregation=done.get("aggregation", {}), update_norm=done.get("update_norm", 0.0))
            if cfg.attack_rounds is not None and not skipped:
                record["attacking"] = cfg.attacks_in_round(rnd)
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                record.update(evaluate(model, ds.x_test, ds.y_test, attack=eval_attack))
            else:
                record.update(clean_accuracy=None, robust_accuracy=None)
            if done.get("failures"):
                record["failures"] = list(done["failures"])
            if lost:
                record["lost"] = lost
            history.append(record)
            log(INFO, "robustfl round %d/%d: %d replies %s%s%s, clean accuracy %s", rnd, cfg.rounds, len(participants),
                participants, f", lost {lost}" if lost else "", " (skipped: too few)" if skipped else "",
                "n/a" if record["clean_accuracy"] is None else f"{record['clean_accuracy']:.4f}")
            if callback is not None:
                callback(record)
            if ckpt is not None and (rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds):
                save_checkpoint(ckpt, {
                    "round": rnd, "model": model.state_dict(), "history": history,
                    "rng": rng.bit_generator.state, "global_rng": global_rng_state(),
                    "objects": {name: object_state(obj, name) for name, obj in objects.items()},
                    "config": _comparable(cfg),
                })
        if store is not None:
            store.update(history=history, state={key: v.clone() for key, v in model.state_dict().items()},
                         strategy=strategy, byzantine=sorted(byzantine))

    return app

