"""The ServerApp's round loop without processes: deadlines, lost and benched nodes, fewer nodes than
configured, checkpoints and resume, deployment settings; and resume in Flower's simulation engine.

`LoopbackGrid` stands in for Flower's Grid in this process: it answers each pushed message by
calling the ClientApp with the node's context, except for nodes the test declares dead (no reply,
ever) or gone (no longer listed). The deployment tests (test_flower_deploy.py) run the same
ServerApp against a real SuperLink."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

import robustfl_lib as rfl  # noqa: E402
from robustfl_lib.checkpoint import load_checkpoint  # noqa: E402
from robustfl_lib.flower import (  # noqa: E402
    config_from_run_config,
    config_to_run_config,
    make_client_app,
    make_server_app,
    run_flower_simulation,
)
from robustfl_lib.flower.config import DEPLOYMENT_KEYS, DeploymentSettings, settings_from_run_config  # noqa: E402
from robustfl_lib.flower.deployment import app_pyproject, node_configs, write_app  # noqa: E402
from robustfl_lib.flower.serverapp import CHECKPOINT_NAME, exchange  # noqa: E402


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # conftest.py


class LoopbackGrid:
    """Flower's Grid in one process: node ``1000 + p`` holds partition ``p``."""

    def __init__(self, client_app, num_nodes: int, num_partitions: int, dead_from: dict[int, int] | None = None,
                 offline_from: dict[int, int] | None = None):
        self.client_app, self.num_partitions = client_app, num_partitions
        self.nodes = [1000 + p for p in range(num_nodes)]
        self.dead_from = dead_from or {}  # node -> first round in which it never replies
        # node -> first round in which the "SuperLink" answers for it with a Node Unavailable error
        # from its own node id (1), as Flower does once a node's heartbeats have stopped
        self.offline_from = offline_from or {}
        self.pending: dict[str, object] = {}
        self.asked: list[tuple[int, int]] = []  # (round, node) of every training message

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            self.pending[mid] = msg
            ids.append(mid)
            rnd = int(msg.content["config"]["server-round"]) if "config" in msg.content else 0
            self.asked.append((rnd, msg.metadata.dst_node_id))
        return ids

    def pull_messages(self, message_ids):
        out = []
        for mid in list(message_ids):
            msg = self.pending.get(mid)
            if msg is None:
                continue
            node = msg.metadata.dst_node_id
            rnd = int(msg.content["config"]["server-round"]) if "config" in msg.content else 0
            if node in self.dead_from and rnd >= self.dead_from[node]:
                continue
            del self.pending[mid]
            if node in self.offline_from and rnd >= self.offline_from[node]:
                error = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=msg)
                error.metadata.__dict__["_src_node_id"] = 1
                out.append(error)
                continue
            ctx = Context(run_id=1, node_id=node, node_config={"partition-id": node - 1000,
                                                               "num-partitions": self.num_partitions},
                          state=RecordDict(), run_config={})
            out.append(self.client_app(msg, ctx))
        return out


def _serve(cfg, grid, settings, store=None, callback=None):
    app = make_server_app(cfg, collude=False, same_participants=False, settings=settings, store=store,
                          callback=callback)
    app(grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))


FAST = dict(round_timeout=0.3, wait_for_nodes=0.5)
BASE = dict(dataset="digits", num_clients=4, rounds=5, partition="iid", lr=0.3, local_steps=2, aggregator="median",
            seed=3, progress=False)


def _serve_losing_a_node(**faults) -> tuple[list[dict], LoopbackGrid]:
    """Five rounds on four loopback nodes, one of which fails as ``faults`` says (``dead_from`` or
    ``offline_from``: node id -> first round), nodes benched 2 rounds: the history and the grid."""
    cfg = rfl.FLConfig(**BASE)
    grid = LoopbackGrid(make_client_app(cfg, byzantine_by_config=False), 4, 4, **faults)
    store: dict = {}
    _serve(cfg, grid, DeploymentSettings(bench_rounds=2, **FAST), store=store)
    return store["history"], grid


def test_dead_node_is_named_benched_and_asked_again_later(one_thread):
    history, grid = _serve_losing_a_node(dead_from={1002: 2})
    assert [h["participants"] for h in history] == [[0, 1, 2, 3], [0, 1, 3], [0, 1, 3], [0, 1, 3], [0, 1, 3]]
    # lost in round 2, sits out rounds 3 and 4, asked (and lost) again in round 5
    assert [h.get("lost") for h in history] == [None, [{"node": 1002, "partition": 2}], None, None,
                                                 [{"node": 1002, "partition": 2}]]
    assert [r for r, node in grid.asked if node == 1002] == [1, 2, 5]
    assert history[1]["failures"] == ["node 1002 (partition 2): no reply within 0.3 s"]
    assert all(h["update_norm"] > 0 for h in history)
    assert "byzantine" not in history[0], "a deployed server does not know who is Byzantine"


def test_node_the_superlink_reports_unavailable_is_lost_by_its_own_id(one_thread):
    """The other way a dead node shows: the SuperLink, missing its heartbeats, answers for it with a
    Node Unavailable error from the SuperLink's own node id. The record names the node that was
    asked, lists it as lost and benches it, as a node silent until the deadline."""
    history, grid = _serve_losing_a_node(offline_from={1001: 2})
    assert [h["participants"] for h in history] == [[0, 1, 2, 3], [0, 2, 3], [0, 2, 3], [0, 2, 3], [0, 2, 3]]
    assert [h.get("lost") for h in history] == [None, [{"node": 1001, "partition": 1}], None, None,
                                                 [{"node": 1001, "partition": 1}]]
    assert [r for r, node in grid.asked if node == 1001] == [1, 2, 5]
    assert history[1]["failures"] == ["node 1001 (partition 1): error reply (Error: Node Unavailable)"]
    assert not any("node 1 " in f for h in history for f in h.get("failures", []))


def test_fewer_nodes_than_configured_start_after_the_wait_and_too_few_skip(digits, one_thread):
    """The review's hang: num_clients=20 with three SuperNodes waited forever. Now the run starts
    with the three after wait_for_nodes; with a rule that needs more (Krum, f=2: n >= 2f + 3 = 7)
    every round is skipped by the quorum rule instead of waiting, the model left as it was."""
    cfg = rfl.FLConfig(**{**BASE, "num_clients": 20, "rounds": 2})
    grid = LoopbackGrid(make_client_app(cfg, byzantine_by_config=False), 3, 20)
    store: dict = {}
    _serve(cfg, grid, DeploymentSettings(**FAST), store=store)
    assert [h["participants"] for h in store["history"]] == [[0, 1, 2], [0, 1, 2]]
    krum = dataclasses.replace(cfg, aggregator="krum", byzantine_fraction=0.1)
    store = {}
    rfl.set_seed(krum.seed)
    start = rfl.flatten_state(rfl.build_model(krum.model, digits.input_shape, digits.num_classes).state_dict())
    _serve(krum, LoopbackGrid(make_client_app(krum, byzantine_by_config=False), 3, 20), DeploymentSettings(**FAST),
           store=store)
    assert all("only 3 participant(s) answered" in h["aggregation"]["skipped"] for h in store["history"])
    assert torch.equal(rfl.flatten_state(store["state"]), start)


def test_interrupted_run_resumes_bitwise_and_refuses_other_settings(tmp_path, one_thread):
    cfg = rfl.FLConfig(**{**BASE, "rounds": 3, "byzantine_fraction": 0.25, "byzantine_attack": "gaussian",
                          "aggregator": "trimmed_mean"})
    client = make_client_app(cfg, knowledge="local")  # byzantine_clients(cfg) attack from their own data
    full: dict = {}
    _serve(cfg, LoopbackGrid(client, 4, 4), DeploymentSettings(checkpoint_dir=str(tmp_path / "full"), **FAST), full)

    def crash(record):
        if record["round"] == 2:
            raise KeyboardInterrupt("the server machine went down")

    ckpt = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _serve(cfg, LoopbackGrid(client, 4, 4), DeploymentSettings(checkpoint_dir=str(ckpt), **FAST), callback=crash)
    assert load_checkpoint(ckpt / CHECKPOINT_NAME)["round"] == 1
    resumed: dict = {}
    grid = LoopbackGrid(client, 4, 4)
    _serve(cfg, grid, DeploymentSettings(checkpoint_dir=str(ckpt), resume=True, **FAST), resumed)
    assert min(r for r, _ in grid.asked) == 2, "a resumed run starts after the checkpointed round"
    assert resumed["history"] == full["history"]
    for key, value in full["state"].items():
        assert torch.equal(resumed["state"][key], value), key
    saved = load_checkpoint(ckpt / CHECKPOINT_NAME)  # weights_only=True
    assert saved["round"] == 3 and saved["history"] == full["history"]
    with pytest.raises(ValueError, match="other settings.*lr"):
        _serve(dataclasses.replace(cfg, lr=0.1), LoopbackGrid(client, 4, 4),
               DeploymentSettings(checkpoint_dir=str(ckpt), resume=True, **FAST))
    with pytest.raises(FileNotFoundError):
        _serve(cfg, LoopbackGrid(client, 4, 4),
               DeploymentSettings(checkpoint_dir=str(tmp_path / "none"), resume=True, **FAST))


def test_exchange_returns_at_the_deadline_with_the_silent_nodes(digits):
    cfg = rfl.FLConfig(**BASE)
    client = make_client_app(cfg)
    grid = LoopbackGrid(client, 3, 4, dead_from={1001: 1})
    from robustfl_lib.flower import RobustStrategy, state_to_record
    from flwr.app import ConfigRecord

    strategy = RobustStrategy(aggregator="mean")
    model = rfl.build_model(cfg.model, digits.input_shape, digits.num_classes)
    messages = strategy.train_messages(1, state_to_record(model.state_dict()), ConfigRecord(), [1000, 1001, 1002])
    replies, silent = exchange(grid, messages, timeout=0.2)
    assert silent == [1001] and len(replies) == 2
    assert sorted(r.content["metrics"]["partition-id"] for r in replies) == [0, 2]
    assert exchange(grid, [], timeout=0.2) == ([], [])


def test_deployment_settings_and_run_config():
    run_config = {**config_to_run_config(rfl.FLConfig(num_clients=3, rounds=2)), "round-timeout": 30,
                  "checkpoint-dir": "/tmp/x", "resume": True, "bench-rounds": 1.0}
    settings = settings_from_run_config(run_config)
    assert settings == DeploymentSettings(round_timeout=30, checkpoint_dir="/tmp/x", resume=True, bench_rounds=1)
    assert config_from_run_config(run_config).num_clients == 3  # the deployment keys are not FLConfig fields
    assert settings_from_run_config({}) == DeploymentSettings()
    for bad, match in ((dict(round_timeout=0), "round_timeout"), (dict(wait_for_nodes=-1.0), "wait_for_nodes"),
                       (dict(bench_rounds=-1), "bench_rounds"), (dict(checkpoint_dir="ckpt"), "absolute"),
                       (dict(resume=True), "checkpoint-dir"), (dict(resume="yes", checkpoint_dir="/a"), "resume")):
        with pytest.raises(ValueError, match=match):
            DeploymentSettings(**bad)
    with pytest.raises(ValueError, match="not an FLConfig field"):
        config_from_run_config({"round-timeoutt": 3})
    # the app's pyproject carries every deployment key, so that `flwr run --run-config` may override each
    text = app_pyproject({"rounds": 2, "resume": False})
    assert "[tool.flwr.app.config]" in text and 'serverapp = "robustfl_lib.flower.apps:server_app"' in text


def test_write_app_and_node_configs(tmp_path):
    folder = write_app(tmp_path / "app", {"num-clients": 5, "byzantine-fraction": 0.4, "byzantine-attack": "alie", "seed": 1})
    import tomllib

    written = tomllib.loads((folder / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(DEPLOYMENT_KEYS) <= set(written) and written["num-clients"] == 5
    configs = node_configs(written)
    byzantine = [c["partition-id"] for c in configs if c.get("byzantine")]
    assert byzantine == rfl.byzantine_clients(5, 2, 1).tolist()
    assert [c["partition-id"] for c in configs] == list(range(5)) and all(set(c) <= {"partition-id", "byzantine"}
                                                                         for c in configs)
    with pytest.raises(ValueError, match="absolute"):
        write_app(tmp_path / "bad", {"checkpoint-dir": "relative/ckpt"})
    with pytest.raises(ValueError, match="not an FLConfig field"):
        write_app(tmp_path / "bad", {"num-clientz": 3})


# The crash is raised in the engine's ServerApp thread, which pytest reports as a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_resume_in_the_simulation_engine_is_bitwise(tmp_path, digits):
    """Flower's simulation engine (Ray), stopped by a crash in round 2 and resumed from round 1's
    checkpoint: the same final model and history as run_federated's client-by-client path, which
    test_flower.py shows the uninterrupted Flower simulation reproduces bit for bit."""
    cfg = dict(dataset="digits", num_clients=4, rounds=2, partition="dirichlet", alpha=0.5, lr=0.3, local_epochs=1,
               aggregator="trimmed_mean", byzantine_fraction=0.25, byzantine_attack="alie", progress=False)

    def crash(record):
        if record["round"] == 2:
            raise KeyboardInterrupt("stop")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(RuntimeError, match="ended before the ServerApp finished"):
            run_flower_simulation(rfl.FLConfig(**cfg), checkpoint_dir=tmp_path, callback=crash, num_cpus=2)
        assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["round"] == 1
        resumed = run_flower_simulation(rfl.FLConfig(**cfg), checkpoint_dir=tmp_path, resume=True, num_cpus=2)
        reference = rfl.run_federated(rfl.FLConfig(vectorized=False, **cfg), data=digits)
    finally:
        torch.set_num_threads(threads)
    for key in ("round", "participants", "byzantine", "aggregation", "update_norm", "clean_accuracy"):
        assert [h[key] for h in resumed.history] == [h[key] for h in reference.history], key
    for p, q in zip(resumed.model.parameters(), reference.model.parameters()):
        assert torch.equal(p, q)
