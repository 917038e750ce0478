"""Flower for real: a SuperLink and SuperNodes as processes on 127.0.0.1, driven by `flwr run`.

One TLS federation with SuperNode authentication (a local CA and a server certificate for
127.0.0.1/localhost, made by the test; three registered SuperNodes, one Byzantine) runs chapter
14's demo configuration (robustfl_lib.flower.deployment.DEMO_RUN_CONFIG) and must end exactly
where Flower's simulation engine ends with the same configuration; an unregistered SuperNode is
refused, and so is one not given the CA (the TLS handshake fails); a run stopped with `flwr stop` after its first checkpoint and started again with
resume=true ends where the uninterrupted run ended. A second, insecure federation of four
SuperNodes loses one to SIGKILL in the middle of round 2 and has one that replies with malformed
arrays: the rounds go on without them, and the history names both by their real node ids.

Every process is started in its own session and ended (SIGTERM, then SIGKILL, by process group)
by the fixtures, also when a test fails; each test has a hard time limit (SIGALRM)."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from robustfl_lib.checkpoint import load_checkpoint  # noqa: E402
from robustfl_lib.flower import config_from_run_config, run_flower_simulation  # noqa: E402
from robustfl_lib.flower.deployment import (  # noqa: E402
    DEMO_RUN_CONFIG,
    LocalFederation,
    node_configs,
    read_result,
    write_app,
)
from robustfl_lib.flower.serverapp import CHECKPOINT_NAME  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("ssh-keygen") is None,
                                reason="the deployment tests make certificates with openssl and keys with ssh-keygen")

# Seconds per test, processes included; a hung Flower run fails the test instead of the suite.
LIMIT = {"test_unregistered_supernode_is_refused": 120, "test_deployment_equals_simulation_engine": 420,
         "test_stopped_run_resumes_to_the_same_model": 420, "test_killed_and_malformed_nodes_are_dropped_and_named": 600}
TIMINGS: dict[str, float] = {}


@pytest.fixture(autouse=True)
def hard_limit(request):
    seconds = LIMIT.get(request.node.originalname, 120)

    def expire(signum, frame):
        raise TimeoutError(f"{request.node.name} ran past its limit of {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        TIMINGS[request.node.name] = time.monotonic() - start
        print(f"\n{request.node.name}: {TIMINGS[request.node.name]:.0f} s wall")


def _still_running(fed: LocalFederation) -> list[str]:
    return [p.name for p in fed.processes if p.popen.poll() is None]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """TLS + SuperNode authentication: three registered SuperNodes and one that is not registered."""
    work = tmp_path_factory.mktemp("secure")
    fed = LocalFederation(work / "federation", tls=True, auth=True)
    try:
        fed.start()
        nodes = [fed.add_node(nc) for nc in node_configs(DEMO_RUN_CONFIG)]
        intruder = fed.add_node({"partition-id": 0}, register=False, name="intruder")
        untrusting = fed.add_node({"partition-id": 0}, register=False, name="without-ca", trust_ca=False)
        yield {"fed": fed, "nodes": nodes, "intruder": intruder, "untrusting": untrusting, "work": work,
               "results": {}}
    finally:
        fed.close()
    assert not _still_running(fed), "every process must have ended"


def test_unregistered_supernode_is_refused(secure):
    fed, intruder = secure["fed"], secure["intruder"]
    assert intruder.popen.wait(timeout=90) != 0, "an unregistered SuperNode must not stay connected"
    assert "Failed to activate SuperNode" in fed.log_of(intruder)
    assert "No SuperNode found with the given public key" in fed.log_of(fed.superlink)
    registered = {fed.node_id(node) for node in secure["nodes"]}
    online = {int(n["node-id"]) for n in fed.wait_for_nodes(3, timeout=60)}
    assert online == registered and len(registered) == 3
    # the connection file points at the CA by absolute path: Flower refuses a relative one
    assert f'root-certificates = "{fed.ca}"' in (Path(fed.env["FLWR_HOME"]) / "config.toml").read_text()
    assert fed.ca.is_absolute()


def test_supernode_without_the_ca_cannot_connect(secure):
    """A SuperNode not given the local CA (no --root-certificates) checks the SuperLink's certificate
    against the system's CAs and gives up at the TLS handshake, before authentication is reached."""
    fed, node = secure["fed"], secure["untrusting"]
    assert "--root-certificates" not in node.command and "--insecure" not in node.command
    assert node.popen.wait(timeout=90) != 0, "a SuperNode that cannot verify the SuperLink must not connect"
    log = fed.log_of(node)
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-1500:]
    assert "SuperNode ID" not in log


def _demo(checkpoint_dir: Path, **extra) -> dict:
    return {**DEMO_RUN_CONFIG, "checkpoint-dir": str(checkpoint_dir), **extra}


def test_deployment_equals_simulation_engine(secure):
    """`flwr run` on the TLS federation against Flower's simulation engine, same configuration,
    Byzantine clients attacking with local knowledge in both. Tolerance: none. Both runtimes draw
    the same partition and seeds, train every partition every round with the same ClientApp code
    on one thread (OMP_NUM_THREADS=1 on the SuperNodes, one thread per Ray worker), and aggregate
    the rows in partition-id order, so the float operations are the same ones in the same order.
    (Across machines or thread counts, float sums may round differently: then compare accuracies.)"""
    fed, work = secure["fed"], secure["work"]
    run_config = _demo(work / "uninterrupted")
    app = write_app(work / "app", DEMO_RUN_CONFIG)
    run = fed.run(app, {"checkpoint-dir": str(work / "uninterrupted")}, timeout=300)
    assert run.ok(), run.output[-3000:]
    assert "robustfl round 2/2" in run.output and run.run_id is not None
    deployed = read_result(work / "uninterrupted", run_config)
    secure["results"]["uninterrupted"] = deployed
    # who attacked is in the Byzantine node's own log, not in the server's (the server cannot know)
    byzantine = [i for i, nc in enumerate(node_configs(DEMO_RUN_CONFIG)) if nc.get("byzantine")]
    assert byzantine == [1]
    assert "partition 1 plays a Byzantine client in round 2 (alie, local knowledge)" in fed.log_of(secure["nodes"][1])
    assert "Byzantine" not in fed.log_of(secure["nodes"][0])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        simulated = run_flower_simulation(config_from_run_config(run_config), knowledge="local", num_cpus=2)
    finally:
        torch.set_num_threads(threads)
    for key in ("round", "participants", "aggregation", "update_norm", "clean_accuracy"):
        assert [h[key] for h in deployed.history] == [h[key] for h in simulated.history], key
    for (name, p), q in zip(deployed.model.state_dict().items(), simulated.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert all("lost" not in h and "failures" not in h for h in deployed.history)
    assert deployed.history[-1]["clean_accuracy"] > 0.2  # it learned something (chance is 0.1)


def test_stopped_run_resumes_to_the_same_model(secure):
    """Stopped with `flwr stop` once round 1 is checkpointed, restarted with resume=true: the same
    final model and history as the uninterrupted run, bit for bit (same federation, same data)."""
    fed, work = secure["fed"], secure["work"]
    if "uninterrupted" not in secure["results"]:
        pytest.skip("needs the uninterrupted run of the previous test")
    ckpt_dir = work / "resumed"
    app = work / "app"
    background = fed.run(app, {"checkpoint-dir": str(ckpt_dir)}, background=True)
    log = fed.processes[-1]
    deadline = time.monotonic() + 240
    while not (ckpt_dir / CHECKPOINT_NAME).exists():
        assert background.poll() is None, fed.log_of(log)[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.5)
    from robustfl_lib.flower.deployment import _run_id

    run_id = _run_id(fed.log_of(log))
    assert run_id is not None, fed.log_of(log)
    stopped = fed.stop_run(run_id)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    background.wait(timeout=60)
    assert load_checkpoint(ckpt_dir / CHECKPOINT_NAME)["round"] == 1, "the stop should land in round 2"
    listed = fed.flwr("list", fed.federation, "--run-id", str(run_id), "--format", "json", check=False)
    assert "stopped" in listed.stdout.lower(), listed.stdout + listed.stderr

    run = fed.run(app, {"checkpoint-dir": str(ckpt_dir), "resume": True}, timeout=300)
    assert run.ok(), run.output[-3000:]
    assert "resumed from" in run.output and "robustfl round 1/2" not in run.output
    resumed = read_result(ckpt_dir, _demo(ckpt_dir))
    uninterrupted = secure["results"]["uninterrupted"]
    assert [h["round"] for h in resumed.history] == [1, 2]
    for key in ("participants", "aggregation", "update_norm", "clean_accuracy"):
        assert [h[key] for h in resumed.history] == [h[key] for h in uninterrupted.history], key
    for (name, p), q in zip(resumed.model.state_dict().items(), uninterrupted.model.state_dict().values()):
        assert torch.equal(p, q), name


# A ClientApp that delegates to robustfl's and, on a node started with fault="malformed",
# replies with an array of the wrong shape: what a broken or malicious device may send.
FAULTY_APP = '''
import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from robustfl_lib.flower.apps import client_app as robust

client_app = ClientApp()


@client_app.train()
def train(msg, context):
    reply = robust(msg, context)
    if context.node_config.get("fault") != "malformed":
        return reply
    arrays = reply.content["arrays"]
    bad = ArrayRecord({k: (Array(np.zeros(3, dtype=np.float32)) if i == 0 else arrays[k])
                       for i, k in enumerate(arrays.keys())})
    return Message(RecordDict({"arrays": bad, "metrics": reply.content["metrics"]}), reply_to=msg)
'''

FAULT_RUN_CONFIG = {
    "dataset": "digits", "num-clients": 4, "rounds": 3, "partition": "iid", "lr": 0.3, "local-epochs": 1,
    "aggregator": "median", "seed": 0, "round-timeout": 90.0, "wait-for-nodes": 60.0,
}
# The round deadline must leave the live nodes time to answer: each starts a fresh ClientApp
# process per round (Python, PyTorch, Flower, robustfl) before it trains. At 45 s, one run on the
# 2-core machine at load average ~20 ended round 2 with no usable reply at all (participants []);
# 90 s keeps a margin; round 2 then ends at that deadline or when the SuperLink, missing the dead
# node's heartbeats (2 x 30 s), answers for it with an error, whichever comes first.


def test_killed_and_malformed_nodes_are_dropped_and_named(tmp_path):
    """Four SuperNodes; partition 3 replies with malformed arrays; partition 2 is killed (SIGKILL)
    while it trains in round 2. Round 2 ends at its deadline (90 s, or earlier when the SuperLink
    reports the node unavailable) with the two good replies, names the
    lost node by its real node id, and round 3 goes on without it (no wait for a node that is gone)."""
    app = write_app(tmp_path / "app", FAULT_RUN_CONFIG,
                    components={"serverapp": "robustfl_lib.flower.apps:server_app", "clientapp": "faulty:client_app"},
                    files={"faulty.py": FAULTY_APP})
    fed = LocalFederation(tmp_path / "federation")
    try:
        fed.start()
        nodes = [fed.add_node({"partition-id": i, **({"fault": "malformed"} if i == 3 else {})})
                 for i in range(4)]
        ids = [fed.node_id(node) for node in nodes]
        background = fed.run(app, {"checkpoint-dir": str(tmp_path / "ckpt")}, background=True)
        run_log = fed.processes[-1]
        deadline = time.monotonic() + 300
        while fed.messages_received(nodes[2]) < 2:  # its second training message: it is in round 2
            assert background.poll() is None, fed.log_of(run_log)[-3000:]
            assert time.monotonic() < deadline, "partition 2 never received its round-2 message"
            time.sleep(0.2)
        fed.kill_node(nodes[2])
        assert background.wait(timeout=300) == 0, fed.log_of(run_log)[-3000:]
        history = read_result(tmp_path / "ckpt", {**FAULT_RUN_CONFIG, "checkpoint-dir": str(tmp_path / "ckpt")}).history
        output = fed.log_of(run_log)
    finally:
        fed.close()
    assert not _still_running(fed), "every process must have ended"

    assert [h["round"] for h in history] == [1, 2, 3]
    malformed = f"node {ids[3]} (partition 3): array"
    # round 1: the malformed reply is dropped with a record, the other three are aggregated
    assert history[0]["participants"] == [0, 1, 2] and "lost" not in history[0]
    assert len(history[0]["failures"]) == 1 and history[0]["failures"][0].startswith(malformed)
    assert "has shape (3,)" in history[0]["failures"][0]
    # round 2: partition 2 died mid-round; the round completed with partitions 0 and 1
    assert history[1]["participants"] == [0, 1], history[1]
    assert history[1]["lost"] == [{"node": ids[2], "partition": 2}], history[1]
    # lost at the deadline, or earlier if the SuperLink's heartbeat check (2 x 30 s) noticed first
    # and answered for it with a Node Unavailable error: named by its own id either way
    dead = [f for f in history[1]["failures"] if f.startswith(f"node {ids[2]} (partition 2): ")]
    assert len(dead) == 1 and (dead[0].endswith(f"no reply within {FAULT_RUN_CONFIG['round-timeout']:g} s")
                               or "Node Unavailable" in dead[0]), history[1]["failures"]
    assert any(f.startswith(malformed) for f in history[1]["failures"])
    assert "skipped" not in history[1]["aggregation"] and history[1]["update_norm"] > 0
    # round 3: the dead node is not asked again (no deadline to wait out), the others go on
    assert history[2]["participants"] == [0, 1] and "lost" not in history[2]
    assert history[2]["failures"] == [f for f in history[2]["failures"] if f.startswith(malformed)]
    assert history[2]["update_norm"] > 0 and history[2]["clean_accuracy"] is not None
    assert f"robustfl round 2/3: 2 replies [0, 1], lost [{{'node': {ids[2]}, 'partition': 2}}]" in output
