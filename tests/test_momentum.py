"""Worker momentum, the one-step (distributed-SGD) mode and client ids in the FL engine.

The momentum recursion is checked against a float64 recomputation from the raw updates
that a recording client update sees; local steps against a manual torch SGD step; resume
and run_grid against uninterrupted / separate runs; and the pair the paper proposes
(worker momentum with centered clipping around the previous aggregate) against ALIE on a
noisy quadratic.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import robustfl_lib as rfl
from robustfl_lib import ALIE, CenteredClipping, FLConfig, Mean, WorkerMomentum, run_federated, run_grid
from robustfl_lib.checkpoint import load_checkpoint, save_checkpoint
from robustfl_lib.federated.clients import _client_generator
from robustfl_lib.params import flatten_state

TINY = dict(num_clients=6, rounds=4, local_epochs=1, batch_size=16, partition="dirichlet", alpha=0.5, progress=False)


class Recorder(Mean):
    """FedAvg that keeps every matrix it aggregates (the vectors the clients sent)."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def aggregate(self, updates, weights):
        self.seen.append(updates.clone())
        return super().aggregate(updates, weights)


class RecordingALIE(ALIE):
    """ALIE that keeps the honest rows it was shown."""

    def __init__(self, z=None):
        super().__init__(z)
        self.seen: list[torch.Tensor] = []

    def forge(self, honest, num_byzantine, generator):
        self.seen.append(honest.clone())
        return super().forge(honest, num_byzantine, generator)


def _recording_update(raw):
    """A client update told its client id (new protocol) that records each raw delta."""

    def update(model, x, y, config, generator, *, client_id):
        before = flatten_state(model.state_dict()).clone()
        rfl.sgd_client_update(model, x, y, config, generator)
        raw.append((client_id, flatten_state(model.state_dict()) - before))

    return update


def _run_recorded(config, data):
    raw, bounds = [], []
    result = run_federated(config, data=data, client_update=_recording_update(raw),
                           callback=lambda record: bounds.append(len(raw)))
    per_round = [raw[a:b] for a, b in zip([0, *bounds[:-1]], bounds)]
    return result, per_round


def _params(result):
    return torch.cat([p.detach().flatten() for p in result.model.parameters()])


def test_beta_zero_sends_the_raw_updates_bitwise(digits, one_thread):
    cfg = FLConfig(**dict(TINY, rounds=3, local_steps=3), aggregator=Recorder(), client_momentum=0.0)
    result, per_round = _run_recorded(cfg, digits)
    assert result.momentum is None
    assert len(result.aggregator.seen) == cfg.rounds
    for sent, calls, record in zip(result.aggregator.seen, per_round, result.history):
        assert [c for c, _ in calls] == record["participants"]
        assert torch.equal(sent, torch.stack([g for _, g in calls]))
    # Momentum on changes what is sent from the second round on (so the check above can fail).
    on, per_round_on = _run_recorded(dataclasses.replace(cfg, aggregator=Recorder(), client_momentum=0.5), digits)
    assert not torch.equal(on.aggregator.seen[1], torch.stack([g for _, g in per_round_on[1]]))
    u = torch.randn(3, 5)
    assert WorkerMomentum(0.0, 4)(u, [0, 2, 3]) is u


@pytest.mark.parametrize("init", ["zero", "first"])
def test_momentum_recursion_equals_float64_recomputation(digits, one_thread, init):
    """Partial participation and dropout: clients that do not train keep their momentum; the
    attacker sees the honest clients' momenta; Byzantine (forging) clients keep none."""
    beta = 0.8
    cfg = FLConfig(**dict(TINY, rounds=6), clients_per_round=4, dropout=0.2, aggregator=Recorder(),
                   byzantine_fraction=0.34, byzantine_attack=RecordingALIE(z=1.0), client_momentum=beta,
                   client_momentum_init=init)
    result, per_round = _run_recorded(cfg, digits)
    d = per_round[0][0][1].numel()
    m = torch.zeros(cfg.num_clients, d, dtype=torch.float64)
    started = torch.zeros(cfg.num_clients, dtype=torch.bool)
    agg_calls = attack_calls = 0
    for calls, record in zip(per_round, result.history):
        honest = [c for c in record["participants"] if c not in record["byzantine"]]
        assert [c for c, _ in calls] == honest  # the ids the client update was told, in the engine's order
        for cid, g in calls:
            g = g.double()
            m[cid] = g if (init == "first" and not started[cid]) else beta * m[cid] + (1 - beta) * g
            started[cid] = True
        if "skipped" in record["aggregation"]:
            continue
        sent = result.aggregator.seen[agg_calls]
        agg_calls += 1
        rows = [record["participants"].index(c) for c in honest]
        torch.testing.assert_close(sent[rows].double(), m[honest], rtol=1e-5, atol=1e-7)
        if record["byzantine"] and honest:  # with no honest row to imitate the attack is not called
            assert torch.equal(result.attack.seen[attack_calls], sent[rows])
            attack_calls += 1
    assert agg_calls == len(result.aggregator.seen) and attack_calls == len(result.attack.seen) > 0
    torch.testing.assert_close(result.momentum.momenta.double(), m, rtol=1e-5, atol=1e-7)
    assert torch.equal(result.momentum.started, started)
    assert not started[result.byzantine].any() and not result.momentum.momenta[result.byzantine].any()
    # The premise of "non-participants keep their momentum": some client trained, then sat out the last round.
    absent = [c for c in range(cfg.num_clients) if started[c] and c not in result.history[-1]["participants"]]
    assert absent and m[absent].abs().sum() > 0


def test_client_ids_reach_client_update_and_the_old_protocol_still_works(digits):
    parts = rfl.partition(digits.y_train, 6, "dirichlet", alpha=0.5, seed=0)
    cfg = FLConfig(**dict(TINY, rounds=2), clients_per_round=4)
    seen = {"keyword": [], "kwargs": [], "old": []}

    def keyword(model, x, y, config, generator, client_id=None):
        assert torch.equal(y, digits.y_train[parts[client_id]])  # the id names the client whose data this is
        seen["keyword"].append(client_id)

    def kwargs(model, x, y, config, generator, **extra):
        seen["kwargs"].append(extra["client_id"])

    def old(model, x, y, config, generator):
        seen["old"].append(len(x))

    histories = {k: run_federated(cfg, data=digits, client_update=f).history
                 for k, f in (("keyword", keyword), ("kwargs", kwargs), ("old", old))}
    trained = [c for h in histories["old"] for c in h["participants"]]
    assert seen["keyword"] == seen["kwargs"] == trained and len(set(trained)) > 4
    assert seen["old"] == [len(parts[c]) for c in trained]


def _manual_steps(w0, model, x, y, batches, lr):
    """Plain SGD written out: one torch.autograd.grad step per minibatch, from w0."""
    local = copy.deepcopy(model)
    rfl.load_vector_(local, w0)
    params = list(local.parameters())
    for idx in batches:
        loss = F.cross_entropy(local(x[idx]), y[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    return flatten_state(local.state_dict()) - w0


@pytest.mark.parametrize("vectorized", [True, False])
def test_local_steps_are_exactly_that_many_sgd_steps(digits, vectorized, one_thread):
    torch.manual_seed(0)
    model = rfl.build_model("mlp", digits.input_shape, digits.num_classes)
    w0 = flatten_state(model.state_dict())
    # 1 step of 8 samples on clients of ~144; 3 steps of 16 on clients of ~24 samples (the third
    # batch comes from a second, freshly shuffled pass over the client's data).
    for num_clients, steps, batch in ((10, 1, 8), (60, 3, 16)):
        cfg = FLConfig(num_clients=num_clients, local_steps=steps, batch_size=batch, lr=0.3, vectorized=vectorized)
        parts = rfl.partition(digits.y_train, num_clients, "iid", seed=0)
        who = np.arange(4)
        updates, _ = rfl.compute_client_updates(model, who, np.ones(4, bool), digits, parts, cfg, rnd=2)
        for row, cid in enumerate(who):
            n = len(parts[cid])
            gen = _client_generator(cfg, 2, cid)
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(steps * batch / n) + 1)])
            if steps == 1:
                batches = [order[:batch]]
            else:  # each pass split into batches of 16 and a shorter rest
                assert 2 * batch > n > batch
                batches = [order[:batch], order[batch:n], order[n:n + batch]]
            assert [len(b) for b in batches] == ([batch] if steps == 1 else [batch, n - batch, batch])
            x, y = digits.x_train[parts[cid]], digits.y_train[parts[cid]]
            want = _manual_steps(w0, model, x, y, batches, cfg.lr)
            torch.testing.assert_close(updates[row], want, rtol=1e-4, atol=1e-6)
    # Adversarial local training in step mode: the batched and the client-by-client paths agree.
    cfg = FLConfig(num_clients=10, local_steps=2, batch_size=8, local_training="adversarial", adv_eps=0.5,
                   adv_norm="l2", adv_steps=2, adv_random_start=False, adv_mix=0.5)
    parts = rfl.partition(digits.y_train, 10, "iid", seed=0)
    got = [rfl.compute_client_updates(model, np.arange(3), np.ones(3, bool), digits, parts,
                                      dataclasses.replace(cfg, vectorized=v), rnd=1)[0] for v in (True, False)]
    torch.testing.assert_close(got[0], got[1], rtol=1e-4, atol=1e-6)


def test_resume_with_momentum_is_bitwise(digits, tmp_path, one_thread):
    class Interrupt(Exception):
        pass

    def stop_after_3(record):
        if record["round"] == 3:
            raise Interrupt

    cfg = FLConfig(**dict(TINY, rounds=5), clients_per_round=5, dropout=0.2, local_steps=2, client_momentum=0.9,
                   aggregator="centered_clipping", aggregator_kwargs={"init": "previous", "tau": 0.05},
                   byzantine_fraction=0.34, byzantine_attack="alie", checkpoint_every=2)
    full = run_federated(cfg, data=digits)
    with pytest.raises(Interrupt):
        run_federated(cfg, data=digits, callback=stop_after_3, checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["round"] == 2 and state["objects"]["momentum"]["state"]["momentum"]["momenta"].abs().sum() > 0
    resumed = run_federated(cfg, data=digits, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == full.history and torch.equal(_params(resumed), _params(full))
    assert torch.equal(resumed.momentum.momenta, full.momentum.momenta)
    assert torch.equal(resumed.momentum.started, full.momentum.started)
    with pytest.raises(ValueError, match=r"other settings: \['client_momentum'\]"):
        run_federated(dataclasses.replace(cfg, client_momentum=0.5), data=digits, checkpoint_dir=tmp_path, resume=True)
    # A checkpoint written before these settings existed resumes as a run at their defaults.
    old_dir = tmp_path / "old"
    plain = FLConfig(**dict(TINY, rounds=3), checkpoint_every=2)
    with pytest.raises(Interrupt):
        run_federated(plain, data=digits, callback=stop_after_3, checkpoint_dir=old_dir)
    state = load_checkpoint(old_dir / "checkpoint.pt")
    for key in ("client_momentum", "client_momentum_init", "local_steps"):
        del state["config"][key]
    del state["objects"]["momentum"]
    save_checkpoint(old_dir / "checkpoint.pt", state)
    again = run_federated(plain, data=digits, checkpoint_dir=old_dir, resume=True)
    assert again.history == run_federated(plain, data=digits).history
    with pytest.raises(ValueError, match=r"other settings: \['client_momentum'\]"):
        run_federated(dataclasses.replace(plain, client_momentum=0.9), data=digits, checkpoint_dir=old_dir, resume=True)


def test_run_grid_with_momentum_equals_separate_runs(digits, one_thread):
    base = dict(TINY, rounds=3, local_steps=2)
    configs = [FLConfig(**base, aggregator="centered_clipping", aggregator_kwargs={"init": "previous"},
                        byzantine_fraction=0.34, byzantine_attack="alie", client_momentum=0.9),
               FLConfig(**base, aggregator="median", byzantine_fraction=0.34, byzantine_attack="sign_flip",
                        client_momentum=0.5, client_momentum_init="first"),
               FLConfig(**base, aggregator="mean")]
    grid = run_grid(configs, data=digits, progress=False)
    for cfg, got in zip(configs, grid):
        want = run_federated(cfg, data=digits)
        torch.testing.assert_close(_params(got), _params(want), rtol=1e-4, atol=1e-5)
        if cfg.client_momentum:
            torch.testing.assert_close(got.momentum.momenta, want.momentum.momenta, rtol=1e-4, atol=1e-6)
        for a, b in zip(got.history, want.history):
            assert a["byzantine"] == b["byzantine"]
            assert abs(a["clean_accuracy"] - b["clean_accuracy"]) <= 1 / len(digits.y_test) + 1e-12


def test_bad_values_raise_naming_the_setting(digits):
    for bad, match in [(dict(client_momentum=1.0), "client_momentum"), (dict(client_momentum=-0.1), "client_momentum"),
                       (dict(client_momentum=float("nan")), "client_momentum"),
                       (dict(client_momentum=True), "client_momentum"), (dict(client_momentum="0.9"), "client_momentum"),
                       (dict(client_momentum_init="one"), "client_momentum_init"), (dict(local_steps=0), "local_steps"),
                       (dict(local_steps=1.5), "local_steps"), (dict(local_steps=True), "local_steps")]:
        with pytest.raises(ValueError, match=match):
            run_federated(FLConfig(**dict(TINY, **bad)), data=digits)
    for kwargs, match in [(dict(beta=1.0, num_clients=3), "beta"), (dict(beta=0.5, num_clients=0), "num_clients"),
                          (dict(beta=0.5, num_clients=3, init="last"), "init")]:
        with pytest.raises(ValueError, match=match):
            WorkerMomentum(**kwargs)
    mom = WorkerMomentum(0.5, 3)
    for updates, ids, match in [(torch.zeros(2, 4), [0, 3], r"in \[0, 3\)"), (torch.zeros(2, 4), [1, 1], "repeated"),
                                (torch.zeros(2, 4), [0], "2 updates but 1"), (torch.zeros(4), [0], "2-D")]:
        with pytest.raises(ValueError, match=match):
            mom(updates, ids)
    mom(torch.ones(1, 4), [0])
    with pytest.raises(ValueError, match="reset"):
        mom(torch.ones(1, 5), [0])
    with pytest.raises(ValueError, match="steps"):
        rfl.train_stacked(rfl.build_model("mlp", (1, 2, 2), 2), [torch.zeros(3, 1, 2, 2)], [torch.zeros(3, dtype=torch.long)],
                          steps=0)


def _quadratic_run(seed, beta, attack, rounds=60, d=20, n=10, f=2, z=1.0, lr=0.1):
    """Distributed SGD on F(x) = |x|^2 / 2 with noisy gradients x + N(0, I): the honest workers send
    (momentum of) their gradient, f attackers send ALIE on those messages, the server steps by
    centered clipping around its previous aggregate. The same noise draws with and without attack."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.full((d,), 3.0, dtype=torch.float64)
    honest = n - f if attack else n
    momentum, cc, alie = WorkerMomentum(beta, honest), CenteredClipping(init="previous", iterations=1), ALIE(z=z)
    for _ in range(rounds):
        grads = x + torch.randn(n, d, generator=gen, dtype=torch.float64)
        sent = momentum(grads[:honest], range(honest))
        if attack:
            sent = torch.cat([sent, alie(sent, f)])
        x = x - lr * cc(sent)
    return x


def test_momentum_with_stateful_centered_clipping_resists_alie():
    """Karimireddy et al. 2021's pair: with worker momentum the attack's bias is averaged against
    honest messages whose spread shrinks by about sqrt((1 - beta) / (1 + beta)), so ALIE (whose
    shift -z sigma points the same way every round: a time-coupled bias) moves the end point
    much less. Measured over seeds 0-19: 0.23 to 0.37 of the no-momentum displacement (mean 0.29)."""
    for seed in (0, 1, 2):
        moved = {beta: float((_quadratic_run(seed, beta, True) - _quadratic_run(seed, beta, False)).norm())
                 for beta in (0.0, 0.9)}
        assert moved[0.9] < 0.5 * moved[0.0], (seed, moved)
