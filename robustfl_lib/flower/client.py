"""Flower ClientApps: honest clients (standard or adversarial local training) and Byzantine ones.

:func:`make_client_app` returns one ``ClientApp`` for every node; a node learns who it is
from its node config (``partition-id``, set by the simulation engine or by
``flower-supernode --node-config``) and whether it is Byzantine from the run's
``FLConfig`` (or from ``byzantine=true`` in its node config).

* An honest node loads the global weights, trains them on its partition with the very
  client step :func:`~robustfl_lib.run_federated` uses (same seed formula, same code),
  and replies with its local weights and its sample count.
* A Byzantine node sends an update made by a :mod:`robustfl_lib.byzantine` attack. The
  omniscient attacks need the honest updates, which a device never sees; ``knowledge``
  says how that is modelled:

  - ``"omniscient"``: the node flags its reply (``BYZANTINE_KEY``) and the server-side
    :class:`~robustfl_lib.flower.strategy.Collusion` of the simulation forges its row from
    the honest rows, exactly as the in-process simulation does;
  - ``"local"``: what a real malicious device can do alone. It splits its own data into
    ``local_shards`` parts, trains one honest-looking update per part and applies the
    attack to those as its estimate of the honest population
    (:math:`\\hat u = \\mathrm{attack}(u^{(1)}, \\dots, u^{(s)};\\ 1)`); the reply carries no flag.

Chapter ``14_scaling_out_with_flower``.
"""

from __future__ import annotations

import copy
from logging import WARNING
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from ..byzantine import DataPoisoning
from ..data import Dataset
from ..federated import FLConfig
from ..models import build_model
from ..params import flatten_state, load_vector_
from ..runtime import get_device, make_generator
from .config import cached_dataset, cached_partition, config_from_run_config
from ..federated.hooks import accepts_keyword
from .federation import attack_for, byzantine_clients, check_flower_config, client_seed, local_update_for
from .strategy import BYZANTINE_KEY, CLIENT_ID_KEY, NUM_EXAMPLES_KEY, record_to_state, state_to_record

__all__ = ["KNOWLEDGE", "make_client_app"]

#: How Byzantine ClientApps get the honest updates their attack needs.
KNOWLEDGE = ("omniscient", "local")


def _node_is_byzantine(context: Context, pid: int, config: FLConfig, by_config: bool) -> bool:
    flag = context.node_config.get("byzantine")
    if flag is not None:
        return str(flag).lower() in ("1", "true", "yes")
    return by_config and pid in byzantine_clients(config)


def make_client_app(
    config: FLConfig | None = None,
    data: Dataset | None = None,
    knowledge: str = "omniscient",
    local_shards: int = 4,
    claimed_examples: int | None = None,
    byzantine_by_config: bool = True,
) -> ClientApp:
    """One ``ClientApp`` serving every node of the federation.

    ``config`` fixes the run; without it each message's node reads it from the run
    config (:func:`~robustfl_lib.flower.config.config_from_run_config`), which is how
    the app runs on real devices. ``data`` replaces loading ``config.dataset`` (in the
    Ray simulation it is shipped to the workers with every message: keep it small).
    ``knowledge`` and ``local_shards`` choose how Byzantine nodes build their update
    (module docstring). ``claimed_examples`` makes Byzantine nodes report that many
    samples, to test that the server's weighting does not believe them. A node is Byzantine
    when its node config says ``byzantine=true``, or, with ``byzantine_by_config`` (the
    simulations), when its partition is one of :func:`~robustfl_lib.flower.byzantine_clients`;
    a deployed device is honest unless its own node config says otherwise. A Byzantine node
    says so in its log (Flower's, at WARNING), so that a test federation shows who attacks.

    Attacks: ALIE (Baruch et al. 2019), IPM (Xie et al. 2020), ...; adversarial training:
    Madry et al. (2018). Chapter ``14_scaling_out_with_flower``.
    """
    if knowledge not in KNOWLEDGE:
        raise ValueError(f"unknown knowledge {knowledge!r}; choose one of {KNOWLEDGE}")
    if not isinstance(local_shards, int) or local_shards < 2:
        raise ValueError(f"local_shards must be an integer >= 2 (the attack needs a spread), got {local_shards!r}")
    if config is not None:
        check_flower_config(config)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config if config is not None else config_from_run_config(context.run_config)
        check_flower_config(cfg)
        pid = int(context.node_config["partition-id"])
        if not 0 <= pid < cfg.num_clients:
            raise ValueError(f"partition-id {pid} is outside [0, num_clients={cfg.num_clients})")
        rnd = int(msg.content["config"]["server-round"])
        ds = data if data is not None else cached_dataset(cfg)
        idx = cached_partition(cfg, data)[pid]
        device = get_device(cfg.device)
        model = build_model(cfg.model, ds.input_shape, ds.num_classes).to(device)
        model.load_state_dict(record_to_state(msg.content["arrays"]))
        x, y = ds.x_train[idx].to(device), ds.y_train[idx].to(device)
        metrics: dict[str, Any] = {NUM_EXAMPLES_KEY: len(idx), CLIENT_ID_KEY: pid}
        generator = make_generator(client_seed(cfg, rnd, pid))
        # Outside the attack schedule (FLConfig.attack_rounds) a Byzantine node trains honestly on clean data.
        attacking = _node_is_byzantine(context, pid, cfg, byzantine_by_config) and cfg.attacks_in_round(rnd)
        attack = attack_for(cfg) if attacking else None
        if attack is not None:
            log(WARNING, "robustfl: partition %d plays a Byzantine client in round %d (%s, %s knowledge)", pid, rnd,
                cfg.byzantine_attack, knowledge)
        if attack is None:
            local_update_for(cfg)(model, x, y, cfg, generator)
        elif isinstance(attack, DataPoisoning):  # label flipping: honest training on poisoned data
            who = {"client_id": pid} if accepts_keyword(attack.poison, "client_id") else {}
            local_update_for(cfg)(model, *attack.poison(x, y, ds.num_classes, **who), cfg, generator)
        else:
            if claimed_examples is not None:
                metrics[NUM_EXAMPLES_KEY] = claimed_examples
            if knowledge == "omniscient":
                metrics[BYZANTINE_KEY] = 1  # untrained: the server-side Collusion forges this row
            else:
                _local_attack(model, x, y, cfg, generator, local_shards, attack)
        content = RecordDict({"arrays": state_to_record(model.state_dict()), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        # RobustStrategy(select=...) asks once which partition each node holds.
        metrics = MetricRecord({CLIENT_ID_KEY: int(context.node_config["partition-id"])})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _local_attack(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FLConfig, generator: torch.Generator,
    shards: int, attack,
) -> None:
    """Replace ``model``'s weights by ``w + attack(shard updates, 1)``: an attacker with only its own data."""
    start = flatten_state(model.state_dict())
    order = torch.randperm(len(x), generator=generator).to(x.device)
    parts = [p for p in order.tensor_split(shards) if len(p)]
    if len(parts) < 2:
        raise ValueError(f"a local attack needs at least 2 samples to split, the node has {len(x)}")
    step = local_update_for(cfg)
    estimates = []
    for part in parts:  # a handful of shards on one device: the loop is over shards, not clients
        local = copy.deepcopy(model)
        step(local, x[part], y[part], cfg, generator)
        estimates.append(flatten_state(local.state_dict()) - start)
    forged = attack(torch.stack(estimates), 1, generator=generator)
    load_vector_(model, start + forged[0])
