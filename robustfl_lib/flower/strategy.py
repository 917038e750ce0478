"""A Flower strategy whose aggregation step is any robustfl aggregator.

:class:`RobustStrategy` extends Flower's Message-API ``FedAvg``
(``flwr.serverapp.strategy``): sampling, messaging and the round loop are
Flower's, the aggregation is robustfl's. In round :math:`t` the server sends
the global weights :math:`w_t`; client :math:`i` replies with its local
weights :math:`w_t^i`. The strategy forms the deltas itself,

.. math::  u_i = \\mathrm{flat}(w_t^i) - \\mathrm{flat}(w_t),

from the weights it sent (so no client can lie about the starting point),
and sets :math:`w_{t+1} = w_t + A(u_1, \\dots, u_n; \\omega)` for a
:mod:`robustfl_lib.aggregators` rule :math:`A` and weights :math:`\\omega`
given by :func:`sample_weights`. Taught in chapter
``14_scaling_out_with_flower``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from ..aggregators import Aggregator, get_aggregator
from ..byzantine import ByzantineAttack, DataPoisoning
from ..federated import aggregate_round
from ..params import flatten_state, float_keys, unflatten_state
from ..runtime import make_generator
from .federation import attack_seed

__all__ = [
    "WEIGHTINGS",
    "BYZANTINE_KEY",
    "CLIENT_ID_KEY",
    "NUM_EXAMPLES_KEY",
    "sample_weights",
    "record_to_state",
    "state_to_record",
    "Collusion",
    "RobustStrategy",
]

#: How reported sample counts become aggregation weights (see :func:`sample_weights`).
WEIGHTINGS = ("equal", "capped", "reported")
#: MetricRecord key with the sample count a client reports (Flower's convention).
NUM_EXAMPLES_KEY = "num-examples"
#: MetricRecord key with the client's partition id, used only to order the rows reproducibly.
CLIENT_ID_KEY = "partition-id"
#: MetricRecord key set to 1 by a Byzantine client that simulates collusion (see :class:`Collusion`).
BYZANTINE_KEY = "robustfl-byzantine"


def sample_weights(counts: torch.Tensor, weighting: str = "equal") -> torch.Tensor | None:
    """Aggregation weights from the sample counts clients *report*, which Byzantine clients may forge.

    * ``"equal"``: ``None``, every reply counts once, whatever it claims;
    * ``"capped"``: :math:`\\omega_i = \\min(\\max(n_i, 0), \\mathrm{med}_j\\, n_j)`, a
      non-finite claim counting 0. With fewer than half of the clients Byzantine the median
      lies within the honest counts' range, so a forged count of :math:`10^9` weighs no
      more than a typical honest client, while honest clients keep FedAvg's
      proportionality below the median;
    * ``"reported"``: the claims as they are (FedAvg, McMahan et al. 2017): one Byzantine
      client claiming a huge count takes over the weighted mean. Only for trusted clients.

    Robust aggregators ignore the weights; these rules matter for :class:`~robustfl_lib.Mean`.
    Chapter ``14_scaling_out_with_flower``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
    if weighting == "equal":
        return None
    counts = counts.to(torch.float64)
    if weighting == "reported":
        if not torch.isfinite(counts).all() or (counts < 0).any() or counts.sum() <= 0:
            raise ValueError(f"reported sample counts must be finite, >= 0 and not all 0, got {counts.tolist()}")
        return counts
    clean = torch.where(torch.isfinite(counts), counts, torch.zeros_like(counts)).clamp(min=0.0)
    capped = clean.clamp(max=float(clean.quantile(0.5)))
    if capped.sum() <= 0:
        raise ValueError(f"capped sample counts are all 0 (reported {counts.tolist()})")
    return capped


def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A model's ``state_dict`` as a Flower ``ArrayRecord`` (CPU copies, order kept).

    Chapter ``14_scaling_out_with_flower``.
    """
    return ArrayRecord.from_torch_state_dict({k: v.detach().cpu() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A Flower ``ArrayRecord`` as a ``state_dict`` of writable CPU tensors. Chapter ``14_scaling_out_with_flower``."""
    return {k: torch.from_numpy(record[k].numpy().copy()) for k in record.keys()}


class Collusion:
    """Server-side simulation of *omniscient, colluding* Byzantine clients.

    The update attacks of :mod:`robustfl_lib.byzantine` (ALIE, IPM, ...) are computed
    from the honest updates of the round, ``attack(honest (n_h, d), k) -> (k, d)``,
    which a client on its own device never sees. Following the threat model of Baruch et
    al. (2019) and Xie et al. (2020), the attackers are assumed to share one view of the
    honest updates; this object plays that shared view inside the server process: rows
    flagged Byzantine (their reply carries ``BYZANTINE_KEY = 1``) are replaced by
    ``attack(rows not flagged, number flagged, generator)`` before aggregation, with the
    per-round generator seed of :func:`~robustfl_lib.run_federated` (``seed`` is the
    run's), so both simulations forge the same rows; with no honest row the forged rows
    are zeros, as there. A deployed server does no such thing; only the simulation does, to measure
    the worst case. Chapter ``14_scaling_out_with_flower``.
    """

    def __init__(self, attack: ByzantineAttack | Callable[..., torch.Tensor], seed: int = 0) -> None:
        if isinstance(attack, DataPoisoning) or not callable(attack):
            raise TypeError(
                f"Collusion needs an update attack called as attack(honest, num_byzantine), got {attack!r}; "
                "data poisoning (label flipping) happens on the Byzantine clients themselves"
            )
        self.attack = attack
        self.seed = seed

    def __call__(self, updates: torch.Tensor, byzantine: torch.Tensor, server_round: int = 1) -> torch.Tensor:
        if byzantine.dtype != torch.bool or byzantine.shape != (updates.shape[0],):
            raise ValueError(f"byzantine must be a bool mask of shape ({updates.shape[0]},)")
        k, d = int(byzantine.sum()), updates.shape[1]
        if k == 0:
            return updates
        out = updates.clone()
        if k == updates.shape[0]:  # nothing to imitate: zeros, as run_federated sends
            out.zero_()
            return out
        generator = make_generator(attack_seed(self.seed, server_round))
        forged = self.attack(updates[~byzantine], k, generator=generator)
        if tuple(forged.shape) != (k, d):
            raise ValueError(f"attack returned shape {tuple(forged.shape)}, expected ({k}, {d})")
        out[byzantine] = forged.to(dtype=updates.dtype, device=updates.device)
        return out

    def __repr__(self) -> str:
        return f"Collusion({self.attack!r}, seed={self.seed})"


def _metric_mean(values: list[dict[str, Any]]) -> MetricRecord:
    """Unweighted mean of the numeric metrics every reply has (reported counts cannot tilt it)."""
    if not values:
        return MetricRecord()
    skip = {NUM_EXAMPLES_KEY, CLIENT_ID_KEY, BYZANTINE_KEY}
    keys = set.intersection(*(set(v) for v in values)) - skip
    out = {}
    for k in sorted(keys):
        nums = [float(v[k]) for v in values if isinstance(v[k], (int, float))]
        if len(nums) == len(values):
            out[k] = sum(nums) / len(nums)
    return MetricRecord(out)


class RobustStrategy(FedAvg):
    """Flower's FedAvg with the aggregation step replaced by a robustfl aggregator.

    ``aggregator`` is a name (``"median"``, ``"krum"``, ...) or any object called as
    ``agg(updates (n, d), weights (n,) | None) -> (d,)``; ``f`` is passed to rules that
    take it. ``weighting`` turns the reported sample counts into weights
    (:func:`sample_weights`; the default ``"equal"`` ignores them). ``collusion`` (a
    :class:`Collusion`) simulates omniscient attackers server-side. Other keyword
    arguments go to ``FedAvg`` (``fraction_train``, ``min_available_nodes``, ...);
    federated evaluation is off unless ``fraction_evaluate`` is given, since the
    simulations evaluate the global model centrally.

    Replies are checked one by one: an error reply, a reply without exactly one
    ``ArrayRecord``, or one whose arrays do not have the global model's keys and shapes is
    dropped (and counted in :attr:`rounds`) rather than failing the round; when fewer
    usable replies remain than the rule's ``f`` needs, the round is skipped and the model
    kept, as ``run_federated`` does on dropouts; non-finite
    values are passed on, for the aggregator to tolerate (robust rules) or reject
    (:class:`~robustfl_lib.Mean` raises). Rows are ordered by the clients' reported
    ``partition-id`` (then node id) so that a seeded simulation gives the same numbers
    every run. ``select(server_round) -> partition ids`` replaces Flower's node sampling:
    before the first round the strategy asks every node for its partition id (a ``query``
    message), then sends each round's training messages to the nodes of the selected
    partitions, which is how the simulation samples exactly the participants
    :func:`~robustfl_lib.run_federated` samples. The step and the record of what the rule kept come from
    :func:`~robustfl_lib.federated.aggregate_round`, as in the in-process simulation.
    :attr:`rounds` keeps, per round, the participants, the rows flagged for collusion,
    the failures, ``"aggregation"``, ``"update_norm"`` and, with ``keep_updates``, the
    exact ``updates``/``weights`` handed to the aggregator. Chapter
    ``14_scaling_out_with_flower``.
    """

    def __init__(
        self,
        aggregator: str | Aggregator = "mean",
        f: int = 0,
        weighting: str = "equal",
        collusion: Collusion | None = None,
        keep_updates: bool = False,
        select: Callable[[int], Iterable[int]] | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
        if not isinstance(f, int) or f < 0:
            raise ValueError(f"f must be an integer >= 0, got {f!r}")
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**fedavg_kwargs)
        self.aggregator = get_aggregator(aggregator, f=f)
        if getattr(self.aggregator, "needs_server_update", False):
            raise ValueError(f"{self.aggregator!r} needs the server's own update on root data the server holds "
                             "(FLTrust), which the Flower apps do not provide; use run_federated with "
                             "FLConfig.server_root_size > 0")
        if hasattr(self.aggregator, "reset"):  # a strategy is one run: stateful rules start afresh
            self.aggregator.reset()
        self.f = f
        self.weighting = weighting
        self.collusion = collusion
        self.keep_updates = keep_updates
        self.select = select
        self.rounds: list[dict[str, Any]] = []
        self._nodes_by_partition: dict[int, int] | None = None
        self._sent: dict[int, dict[str, torch.Tensor]] = {}
        self._asked: dict[str, int] = {}
        #: node id -> the partition id its replies reported (how lost nodes are named in the history).
        self.partition_of: dict[int, int] = {}

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> robustfl: aggregator %r, f=%d, weighting %r, collusion %r",
            self.aggregator, self.f, self.weighting, self.collusion)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.select is None:
            # Remember what was sent: the deltas are taken against it, not against what clients claim.
            self._sent = {server_round: record_to_state(arrays)}
            return super().configure_train(server_round, arrays, config, grid)
        nodes = self._partition_map(grid)
        chosen = [int(c) for c in self.select(server_round)]
        missing = [c for c in chosen if c not in nodes]
        if missing:
            raise RuntimeError(f"round {server_round}: no node holds partition(s) {missing}")
        return self.train_messages(server_round, arrays, config, [nodes[c] for c in chosen])

    def train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: Iterable[int]
    ) -> list[Message]:
        """The training messages of round ``server_round`` for the nodes ``node_ids`` (the ServerApp's
        own node selection, which waits for no node: :mod:`robustfl_lib.flower.serverapp`)."""
        # Remember what was sent: the deltas are taken against it, not against what clients claim.
        self._sent = {server_round: record_to_state(arrays)}
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, [int(n) for n in node_ids], MessageType.TRAIN))

    def expect_replies(self, messages: Iterable[Message]) -> None:
        """Remember which node each pushed message went to (by message id). An error reply that the
        SuperLink makes for a node that went away carries the SuperLink's own node id as its source;
        with this map the record names the node that was asked."""
        self._asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}

    def sender(self, msg: Message) -> int:
        """The node a reply answers for: the node its message was sent to (:meth:`expect_replies`),
        which differs from ``src_node_id`` on the error replies the SuperLink makes itself."""
        return self._asked.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def _partition_map(self, grid: Grid) -> dict[int, int]:
        """partition id -> node id, asked once of every node (``min_available_nodes`` of them)."""
        if self._nodes_by_partition is None:
            _, node_ids = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)  # waits for them
            query = RecordDict({self.configrecord_key: ConfigRecord({"robustfl": "partition-id"})})
            replies = grid.send_and_receive(self._construct_messages(query, node_ids, MessageType.QUERY))
            mapping: dict[int, int] = {}
            for msg in replies:
                if msg.has_error():
                    node = msg.metadata.src_node_id
                    raise RuntimeError(f"node {node} failed the partition query: {msg.error.reason}")
                pid = int(next(iter(msg.content.metric_records.values()))[CLIENT_ID_KEY])
                if pid in mapping:
                    raise RuntimeError(f"nodes {mapping[pid]} and {msg.metadata.src_node_id} both hold partition {pid}")
                mapping[pid] = msg.metadata.src_node_id
            self._nodes_by_partition = mapping
        return self._nodes_by_partition

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if server_round not in self._sent:
            raise RuntimeError(f"aggregate_train for round {server_round} without configure_train for it")
        global_state = self._sent[server_round]
        keys = float_keys(global_state)
        global_vec = flatten_state(global_state)
        rows, counts, order, flags, metrics, failures = [], [], [], [], [], []
        for msg in replies:
            node = self.sender(msg)
            self._learn_partition(node, msg)  # also from a reply about to be dropped, to name its sender
            problem = self._check_reply(msg, global_state, keys)
            if problem:
                failures.append(f"{self.node_name(node)}: {problem}")
                continue
            content = msg.content
            state = record_to_state(next(iter(content.array_records.values())))
            mrec = next(iter(content.metric_records.values()), MetricRecord())
            m = dict(mrec)
            local = torch.cat([state[k].reshape(-1).to(global_vec.dtype) for k in keys])
            rows.append(local - global_vec)
            counts.append(_as_float(m.get(NUM_EXAMPLES_KEY)))
            pid = m.get(CLIENT_ID_KEY)
            known = _is_id(pid)
            order.append((0, int(pid), node) if known else (1, node, node))
            flags.append(bool(m.get(BYZANTINE_KEY, 0)))
            metrics.append(m)
        for reason in failures:
            log(WARNING, "round %d: dropped reply from %s", server_round, reason)
        record: dict[str, Any] = {"round": server_round, "failures": failures, "participants": [], "flagged": [],
                                  "update_norm": 0.0}
        self.rounds.append(record)
        perm = sorted(range(len(rows)), key=lambda i: order[i])
        # Participants by partition id where the node has one (simulation), else by node id.
        ids = [order[i][1] for i in perm]
        record["participants"] = ids
        skipped = self._quorum_error(len(rows))
        if skipped:  # too few usable replies for the rule's f: the global model stays as it is
            log(WARNING, "round %d: %s; the global model is unchanged", server_round, skipped)
            record["aggregation"] = {"skipped": skipped}
            return None, None
        updates = torch.stack([rows[i] for i in perm])
        byzantine = torch.tensor([flags[i] for i in perm], dtype=torch.bool)
        if self.collusion is not None:
            updates = self.collusion(updates, byzantine, server_round)
        weights = sample_weights(torch.tensor([counts[i] for i in perm], dtype=torch.float64), self.weighting)
        if weights is not None:
            weights = weights.to(updates.dtype)
        # Client ids and the global weights reach a rule that accepts them (FoolsGold, FLAME), as in run_federated.
        step, kept = aggregate_round(self.aggregator, updates, weights, ids, global_model=global_vec)
        record.update(flagged=[c for c, b in zip(ids, byzantine.tolist()) if b],
                      aggregation=kept, update_norm=float(torch.linalg.vector_norm(step.double())))
        if self.keep_updates:
            record.update(updates=updates, weights=weights, step=step)
        new_state = unflatten_state(global_vec + step, global_state)
        return state_to_record(new_state), _metric_mean([metrics[i] for i in perm])

    def _learn_partition(self, node: int, msg: Message) -> None:
        if msg.has_error():
            return
        for record in msg.content.metric_records.values():
            pid = record.get(CLIENT_ID_KEY)
            if _is_id(pid):
                self.partition_of[node] = int(pid)

    def node_name(self, node: int) -> str:
        """``"node 123 (partition 4)"``: the node id and, once a reply has reported it, its partition."""
        pid = self.partition_of.get(node)
        return f"node {node}" if pid is None else f"node {node} (partition {pid})"

    def _quorum_error(self, answered: int) -> str | None:
        """Why ``answered`` usable replies are too few to aggregate, or None (as in ``run_federated``)."""
        if answered == 0:
            return "no participant answered"
        if hasattr(self.aggregator, "requirement"):
            try:
                self.aggregator.requirement(answered, self.aggregator.f)
            except ValueError as err:
                return f"only {answered} participant(s) answered: {err}"
        return None

    @staticmethod
    def _check_reply(msg: Message, global_state: dict[str, torch.Tensor], keys: list[str]) -> str | None:
        """Why a reply cannot be aggregated, or None."""
        if msg.has_error():
            return f"error reply ({msg.error.reason})"
        content = msg.content
        if len(content.array_records) != 1:
            return f"expected one ArrayRecord, got {len(content.array_records)}"
        arrays = next(iter(content.array_records.values()))
        for k in keys:
            if k not in arrays:
                return f"array {k!r} missing"
            if tuple(arrays[k].shape) != tuple(global_state[k].shape):
                return f"array {k!r} has shape {tuple(arrays[k].shape)}, expected {tuple(global_state[k].shape)}"
        if len(content.metric_records) > 1:
            return f"expected at most one MetricRecord, got {len(content.metric_records)}"
        return None


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
