"""robustfl_lib.flower: the strategy aggregates as the library does, forged counts buy nothing,
the ClientApps train as run_federated's clients, and a small Flower simulation reproduces it."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import time

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

import robustfl_lib as rfl  # noqa: E402
from robustfl_lib.flower import (  # noqa: E402
    BYZANTINE_KEY,
    CLIENT_ID_KEY,
    NUM_EXAMPLES_KEY,
    Collusion,
    RobustStrategy,
    attack_seed,
    client_seed,
    config_from_run_config,
    config_to_run_config,
    make_client_app,
    record_to_state,
    run_flower_simulation,
    sample_weights,
    state_to_record,
)

# ------------------------------------------------------------------ helpers


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # conftest.py


class StubGrid:
    """The part of flwr's Grid that configure_train uses: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def _global_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"w": torch.randn(3, 4), "b": torch.randn(4), "steps": torch.tensor(7)}


def _replies(strategy, global_state, deltas, counts=None, flags=None, server_round=1, shuffle=None):
    """Send the global state through configure_train, then build one reply per delta row."""
    nodes = [101 + i for i in range(len(deltas))]
    ins = list(strategy.configure_train(server_round, state_to_record(global_state), ConfigRecord(), StubGrid(nodes)))
    by_node = {m.metadata.dst_node_id: m for m in ins}
    out = []
    for i, delta in enumerate(deltas):
        local = rfl.unflatten_state(rfl.flatten_state(global_state) + delta, global_state)
        metrics = {NUM_EXAMPLES_KEY: int(counts[i]) if counts is not None else 10, CLIENT_ID_KEY: i}
        if flags is not None and flags[i]:
            metrics[BYZANTINE_KEY] = 1
        content = RecordDict({"arrays": state_to_record(local), "metrics": MetricRecord(metrics)})
        out.append(Message(content, reply_to=by_node[nodes[i]]))
    if shuffle is not None:
        out = [out[j] for j in shuffle]
    return out


def _step(global_state, arrays: ArrayRecord) -> torch.Tensor:
    return rfl.flatten_state(record_to_state(arrays)) - rfl.flatten_state(global_state)


AGGREGATOR_NAMES = sorted(rfl.AGGREGATORS)


# ------------------------------------------------------------------ optional import


def test_robustfl_imports_without_flwr_and_flower_module_says_how_to_install():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'flwr' or name.startswith('flwr.'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import robustfl_lib\n"
        "assert 'flwr' not in sys.modules\n"
        "try:\n"
        "    import robustfl_lib.flower\n"
        "except ImportError as e:\n"
        "    assert 'robustfl[flower]' in str(e), e\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------ the strategy


@pytest.mark.parametrize("name", [n for n in AGGREGATOR_NAMES if n != "fltrust"])  # FLTrust: see the next test
def test_strategy_aggregate_equals_library_aggregator(name):
    n, f = 7, 1
    gs = _global_state()
    d = rfl.flatten_state(gs).numel()
    deltas = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    deltas[0] *= 30.0  # an outlier, so the rules disagree with the mean
    strategy = RobustStrategy(aggregator=name, f=f, keep_updates=True)
    arrays, metrics = strategy.aggregate_train(1, _replies(strategy, gs, deltas, shuffle=[3, 0, 6, 1, 5, 2, 4]))
    rule = rfl.get_aggregator(name, f=f)
    # A rule that takes the global weights (FLAME clusters models, not updates) gets them from the strategy.
    extra = {"global_model": rfl.flatten_state(gs)} if "global_model" in inspect.signature(rule.__call__).parameters else {}
    expected = rule(deltas, **extra)
    torch.testing.assert_close(_step(gs, arrays), expected, rtol=1e-5, atol=1e-5)
    # rows reach the aggregator in partition-id order, whatever order the replies came in
    torch.testing.assert_close(strategy.rounds[-1]["updates"], deltas, rtol=1e-6, atol=1e-6)
    assert strategy.rounds[-1]["participants"] == list(range(n))
    # integer buffers are not averaged: they come back as the server sent them
    assert torch.equal(record_to_state(arrays)["steps"], gs["steps"])
    assert NUM_EXAMPLES_KEY not in metrics and CLIENT_ID_KEY not in metrics


def test_strategy_refuses_fltrust_which_needs_server_data():
    with pytest.raises(ValueError, match="FLTrust"):
        RobustStrategy(aggregator="fltrust", f=1)


def test_strategy_accepts_an_aggregator_object():
    gs = _global_state()
    deltas = torch.randn(5, rfl.flatten_state(gs).numel(), generator=torch.Generator().manual_seed(2))

    class FirstRow(rfl.Mean):
        def aggregate(self, updates, weights):
            return updates[0]

    strategy = RobustStrategy(aggregator=FirstRow())
    arrays, _ = strategy.aggregate_train(1, _replies(strategy, gs, deltas, shuffle=[4, 3, 2, 1, 0]))
    torch.testing.assert_close(_step(gs, arrays), deltas[0], rtol=1e-5, atol=1e-6)


def test_forged_sample_count_cannot_weight_a_client_up():
    gs = _global_state()
    d = rfl.flatten_state(gs).numel()
    honest = torch.ones(5, d) * 0.1
    evil = torch.full((1, d), -50.0)
    deltas = torch.cat([honest, evil])
    counts = [40, 50, 60, 70, 80, 10**9]
    steps = {}
    for weighting in ("reported", "capped", "equal"):
        strategy = RobustStrategy(aggregator="mean", weighting=weighting)
        arrays, _ = strategy.aggregate_train(1, _replies(strategy, gs, deltas, counts=counts))
        steps[weighting] = _step(gs, arrays)
    # trusting the count hands the mean to the liar ...
    assert steps["reported"].mean() < -49.0
    # ... capping every count at the median count (65) gives it a typical client's weight, no more
    w = torch.tensor([40, 50, 60, 65, 65, 65], dtype=torch.float64)
    torch.testing.assert_close(steps["capped"], (w / w.sum()).float() @ deltas, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps["equal"], deltas.mean(0), rtol=1e-5, atol=1e-5)
    capped = sample_weights(torch.tensor(counts, dtype=torch.float64), "capped")
    assert capped[-1] <= max(counts[:-1]) and capped[-1] / capped.sum() < 0.2


def test_sample_weights_rules_and_errors():
    counts = torch.tensor([10.0, 20.0, float("inf"), -5.0, float("nan"), 1e12])
    assert sample_weights(counts, "equal") is None
    capped = sample_weights(counts, "capped")
    assert torch.isfinite(capped).all() and capped.min() >= 0
    assert capped.max() <= counts[torch.isfinite(counts)].clamp(min=0).median() + 10.0
    assert capped[2] == 0 and capped[3] == 0 and capped[4] == 0
    with pytest.raises(ValueError, match="finite"):
        sample_weights(counts, "reported")
    with pytest.raises(ValueError, match="unknown weighting"):
        sample_weights(counts, "trust-me")
    with pytest.raises(ValueError, match="unknown weighting"):
        RobustStrategy(weighting="trust-me")


def test_malformed_and_error_replies_are_dropped_not_fatal():
    gs = _global_state()
    d = rfl.flatten_state(gs).numel()
    deltas = torch.randn(4, d, generator=torch.Generator().manual_seed(3))
    strategy = RobustStrategy(aggregator="mean")
    replies = _replies(strategy, gs, deltas)
    ins = list(strategy.configure_train(1, state_to_record(gs), ConfigRecord(), StubGrid([7, 8])))
    bad_shape = dict(gs, w=torch.zeros(2, 2))
    bad = RecordDict({"arrays": state_to_record(bad_shape), "metrics": MetricRecord({CLIENT_ID_KEY: 1})})
    replies[1] = Message(bad, reply_to=ins[0])
    replies[2] = Message(RecordDict({"metrics": MetricRecord({CLIENT_ID_KEY: 2})}), reply_to=ins[1])
    arrays, _ = strategy.aggregate_train(1, replies)
    torch.testing.assert_close(_step(gs, arrays), deltas[[0, 3]].mean(0), rtol=1e-5, atol=1e-6)
    failures = strategy.rounds[-1]["failures"]
    assert len(failures) == 2 and "shape" in failures[0] and "ArrayRecord" in failures[1]
    # a round where nothing is usable leaves the model as it was
    assert strategy.aggregate_train(1, replies[1:3]) == (None, None)


def test_collusion_forges_flagged_rows_from_the_honest_ones():
    gs = _global_state()
    d = rfl.flatten_state(gs).numel()
    deltas = torch.randn(5, d, generator=torch.Generator().manual_seed(4))
    flags = [False, True, False, True, False]

    def negated_mean(honest, k, generator=None):
        return -honest.mean(0, keepdim=True).repeat(k, 1)

    strategy = RobustStrategy(aggregator="mean", collusion=Collusion(negated_mean), keep_updates=True)
    arrays, _ = strategy.aggregate_train(1, _replies(strategy, gs, deltas, flags=flags))
    honest = deltas[[0, 2, 4]]
    forged = strategy.rounds[-1]["updates"]
    torch.testing.assert_close(forged[[1, 3]], -honest.mean(0).repeat(2, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(forged[[0, 2, 4]], honest, rtol=1e-6, atol=1e-6)
    assert strategy.rounds[-1]["flagged"] == [1, 3]
    # with no honest row to imitate the forged rows are zeros, as in run_federated
    assert torch.equal(Collusion(negated_mean)(deltas, torch.ones(5, dtype=torch.bool)), torch.zeros_like(deltas))
    with pytest.raises(ValueError, match="shape"):
        Collusion(lambda h, k, generator=None: h[:1])(deltas, torch.tensor(flags))
    with pytest.raises(TypeError, match="data poisoning"):
        Collusion(rfl.get_attack("label_flip"))


def test_collusion_forges_the_rows_run_federated_forges():
    deltas = torch.randn(6, 40, generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([False, True, False, False, True, False])
    for name in ("alie", "gaussian", "ipm"):
        attack = rfl.get_attack(name)
        ours = Collusion(attack, seed=3)(deltas, mask, server_round=4)
        theirs = rfl.apply_byzantine_attack(deltas, mask.numpy(), attack, rfl.make_generator(attack_seed(3, 4)))
        assert torch.equal(ours, theirs), name


# ------------------------------------------------------------------ config travelling as a run config


def test_run_config_round_trip_and_errors():
    cfg = rfl.FLConfig(num_clients=20, rounds=3, partition="dirichlet", alpha=0.3, aggregator="mean", seed=5)
    run_config = config_to_run_config(cfg)
    assert run_config["num-clients"] == 20 and "clients-per-round" not in run_config
    back = config_from_run_config(run_config)
    assert config_to_run_config(back) == run_config
    assert config_from_run_config({"num-server-rounds": 4, "alpha": 1}).rounds == 4
    assert isinstance(config_from_run_config({"alpha": 1}).alpha, float)
    with pytest.raises(ValueError, match="not an FLConfig field"):
        config_from_run_config({"num-clientz": 3})
    with pytest.raises(ValueError, match="run config"):
        config_to_run_config(rfl.FLConfig(aggregator=rfl.Mean()))
    with pytest.raises(ValueError, match="num_clients"):
        config_from_run_config({"num-clients": 0})


# ------------------------------------------------------------------ ClientApps, called directly


def _train_message(state, server_round=1):
    content = RecordDict({"arrays": state_to_record(state), "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context(pid, num, **node):
    return Context(run_id=1, node_id=1, node_config={"partition-id": pid, "num-partitions": num, **node},
                   state=RecordDict(), run_config={})


@pytest.fixture(scope="module")
def small_setting(digits):
    cfg = rfl.FLConfig(num_clients=4, rounds=1, partition="dirichlet", alpha=0.5, lr=0.3, progress=False)
    rfl.set_seed(cfg.seed)
    model = rfl.build_model(cfg.model, digits.input_shape, digits.num_classes)
    parts = rfl.partition(digits.y_train, cfg.num_clients, cfg.partition, alpha=cfg.alpha, seed=cfg.seed)
    return cfg, model, parts


def test_honest_client_app_trains_like_run_federated_client(small_setting, digits):
    cfg, model, parts = small_setting
    reply = make_client_app(cfg)(_train_message(model.state_dict(), server_round=2), _context(3, 4))
    local = rfl.build_model(cfg.model, digits.input_shape, digits.num_classes)
    local.load_state_dict(model.state_dict())
    rfl.sgd_client_update(local, digits.x_train[parts[3]], digits.y_train[parts[3]], cfg,
                          rfl.make_generator(client_seed(cfg, 2, 3)))
    got = record_to_state(reply.content["arrays"])
    for k, v in local.state_dict().items():
        assert torch.equal(got[k], v), k
    metrics = reply.content["metrics"]
    assert metrics[NUM_EXAMPLES_KEY] == len(parts[3]) and metrics[CLIENT_ID_KEY] == 3
    assert BYZANTINE_KEY not in metrics


def test_byzantine_client_apps(small_setting, digits):
    cfg, model, parts = small_setting
    cfg = dataclasses.replace(cfg, byzantine_attack="sign_flip")
    start = rfl.flatten_state(model.state_dict())
    msg = _train_message(model.state_dict())
    # omniscient: the node does not train, flags itself for the server-side collusion, may lie about its count
    reply = make_client_app(cfg, claimed_examples=10**9)(msg, _context(0, 4, byzantine=True))
    assert reply.content["metrics"][BYZANTINE_KEY] == 1
    assert reply.content["metrics"][NUM_EXAMPLES_KEY] == 10**9
    assert torch.equal(rfl.flatten_state(record_to_state(reply.content["arrays"])), start)
    # local knowledge: the attack runs on the node's own shard updates; their flipped mean
    # points against the node's honest update, and nothing in the reply gives it away
    evil = make_client_app(cfg, knowledge="local")(msg, _context(0, 4, byzantine="true")).content
    good = make_client_app(cfg)(msg, _context(0, 4)).content
    u_evil = rfl.flatten_state(record_to_state(evil["arrays"])) - start
    u_good = rfl.flatten_state(record_to_state(good["arrays"])) - start
    assert BYZANTINE_KEY not in evil["metrics"]
    assert torch.isfinite(u_evil).all() and u_evil.norm() > 0
    assert torch.nn.functional.cosine_similarity(u_evil, u_good, dim=0) < -0.5
    with pytest.raises(ValueError, match="knowledge"):
        make_client_app(cfg, knowledge="psychic")
    with pytest.raises(ValueError, match="partition-id"):
        make_client_app(cfg)(msg, _context(9, 4))


def test_deployment_apps_read_the_run_config(small_setting, digits):
    """On devices the ClientApp has no FLConfig object: it reads the run config and its node config."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from robustfl_lib.flower import apps

    assert isinstance(apps.server_app, ServerApp) and isinstance(apps.client_app, ClientApp)
    cfg, model, parts = small_setting
    msg = _train_message(model.state_dict(), server_round=3)
    ctx = _context(2, 4)
    ctx.run_config = config_to_run_config(cfg)
    on_device = apps.client_app(msg, ctx).content
    in_simulation = make_client_app(cfg)(msg, _context(2, 4)).content
    assert torch.equal(rfl.flatten_state(record_to_state(on_device["arrays"])),
                       rfl.flatten_state(record_to_state(in_simulation["arrays"])))
    ctx.run_config = {**config_to_run_config(cfg), "learning-rate": 0.1}
    with pytest.raises(ValueError, match="learning-rate"):
        apps.client_app(msg, ctx)


def test_label_flipping_client_trains_on_flipped_labels(small_setting, digits):
    cfg, model, parts = small_setting
    cfg = dataclasses.replace(cfg, byzantine_attack="label_flip")
    reply = make_client_app(cfg)(_train_message(model.state_dict()), _context(1, 4, byzantine=True))
    local = rfl.build_model(cfg.model, digits.input_shape, digits.num_classes)
    local.load_state_dict(model.state_dict())
    x, y = rfl.get_attack("label_flip").poison(digits.x_train[parts[1]], digits.y_train[parts[1]], 10)
    rfl.sgd_client_update(local, x, y, cfg, rfl.make_generator(client_seed(cfg, 1, 1)))
    assert torch.equal(rfl.flatten_state(record_to_state(reply.content["arrays"])), rfl.model_to_vector(local))
    assert BYZANTINE_KEY not in reply.content["metrics"]


# ------------------------------------------------------------------ a real Flower simulation (Ray)


def test_flower_simulation_reproduces_run_federated(digits):
    """Five clients (one Byzantine, four sampled per round, some dropping out), adversarial local
    training, two rounds, in Flower's simulation engine (Ray): the same participants and the same
    numbers as the in-process simulation's client-by-client path, bit for bit."""
    cfg = dict(dataset="digits", num_clients=5, clients_per_round=4, dropout=0.2, rounds=2, partition="dirichlet",
               alpha=0.5, lr=0.3, aggregator="trimmed_mean", byzantine_fraction=0.2, byzantine_attack="alie",
               local_training="adversarial", adv_steps=2, eval_eps=0.1, eval_steps=3, progress=False)
    # Ray workers compute with one thread; so do the server and the reference here, since
    # float sums depend on the thread count
    threads, pythonpath = torch.get_num_threads(), os.environ.get("PYTHONPATH")
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        flower = run_flower_simulation(rfl.FLConfig(**cfg), num_cpus=2)
        elapsed = time.perf_counter() - start
        local = rfl.run_federated(rfl.FLConfig(vectorized=False, **cfg), data=digits)
    finally:
        torch.set_num_threads(threads)
    assert flower.byzantine == local.byzantine and len(flower.byzantine) == 1
    assert sum(len(h["dropped_out"]) for h in local.history) > 0, "the setting should exercise dropouts"
    for key in ("round", "participants", "dropped_out", "byzantine", "aggregation", "update_norm",
                "clean_accuracy", "robust_accuracy"):
        assert [h[key] for h in flower.history] == [h[key] for h in local.history], key
    for p, q in zip(flower.model.parameters(), local.model.parameters()):
        assert torch.equal(p, q)
    assert elapsed < 120, f"the Flower simulation took {elapsed:.0f} s"
    assert os.environ.get("PYTHONPATH") == pythonpath, "the simulation must leave the environment as it found it"
