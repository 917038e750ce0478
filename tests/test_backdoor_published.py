"""The published backdoor attacks and defenses: FLAME, FoolsGold, DBA, Neurotoxin, durability.

Each is checked against an independent recomputation of its paper's steps (float64, written
here with plain loops), on its requirements and bad inputs, and through an FL run that is
interrupted and resumed (its state must survive the checkpoint).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.cluster import HDBSCAN

import robustfl_lib as rfl
from robustfl_lib import FLConfig, run_federated
from robustfl_lib.backdoor import (
    DBA,
    FLAME,
    Clustering,
    CosineSimilarity,
    FoolsGold,
    Neurotoxin,
    PixelTrigger,
    TriggerPart,
    backdoor_durability,
)
from robustfl_lib.checkpoint import load_checkpoint, load_object_state, object_state


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _backdoor_round(seed: int = 0, n_honest: int = 7, n_bad: int = 3, d: int = 40) -> torch.Tensor:
    """Honest updates around one direction, attackers tightly around another and 4x longer (float64)."""
    g = _gen(seed)
    honest = torch.randn(1, d, generator=g, dtype=torch.float64) + 0.4 * torch.randn(n_honest, d, generator=g,
                                                                                    dtype=torch.float64)
    bad = 4.0 * (torch.randn(1, d, generator=g, dtype=torch.float64)
                 + 0.05 * torch.randn(n_bad, d, generator=g, dtype=torch.float64))
    return torch.cat([honest, bad])


# ----------------------------------------------------------------------------- FLAME


def _flame_reference(u: np.ndarray, lam: float, noise_seed: int, points: np.ndarray | None = None):
    """FLAME's steps in float64 NumPy: cosine distances, HDBSCAN, median norm, clip, mean, noise."""
    p = u if points is None else points
    n, d = u.shape
    unit = p / np.linalg.norm(p, axis=1, keepdims=True)
    dist = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    dist = 0.5 * (dist + dist.T)
    np.fill_diagonal(dist, 0.0)
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                     allow_single_cluster=True, copy=True).fit_predict(dist)
    admitted = labels == np.bincount(labels[labels >= 0]).argmax() if (labels >= 0).any() else np.ones(n, bool)
    norms = np.linalg.norm(u, axis=1)
    s_t = float(np.median(norms))  # over all clients, admitted or not
    clipped = [u[i] * min(1.0, s_t / norms[i]) for i in range(n) if admitted[i]]
    mean = np.mean(clipped, axis=0)
    noise = torch.randn(d, generator=_gen(noise_seed), dtype=torch.float64).numpy()
    return mean + lam * s_t * noise, labels, admitted, s_t


@pytest.mark.parametrize("n_honest,n_bad", [(7, 3), (6, 3)])  # n even (median of two middles) and odd
def test_flame_equals_its_steps_recomputed(n_honest, n_bad):
    u = _backdoor_round(1, n_honest, n_bad)
    flame = FLAME(lam=0.01, generator=_gen(5))
    out = flame(u)
    want, labels, admitted, s_t = _flame_reference(u.numpy(), 0.01, 5)
    assert flame.last_info["clusters"] == labels.tolist()
    assert flame.last_info["selected"].tolist() == np.flatnonzero(admitted).tolist()
    assert not admitted[n_honest:].any() and admitted[:n_honest].sum() >= (len(u) // 2 + 1)  # attackers dropped
    assert flame.last_info["clip_norm"] == pytest.approx(s_t, rel=1e-12)
    assert flame.last_info["noise_std"] == pytest.approx(0.01 * s_t, rel=1e-12)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-10, atol=1e-12)
    # the weights are each row's factor in the average (0 for a dropped row)
    w = flame.last_info["weights"]
    clipped_mean = (w[:, None] * u).sum(dim=0)
    np.testing.assert_allclose(clipped_mean.numpy(), want - 0.01 * s_t * torch.randn(
        u.shape[1], generator=_gen(5), dtype=torch.float64).numpy(), rtol=1e-10, atol=1e-12)
    assert (w[n_honest:] == 0).all()


def test_flame_clusters_models_when_given_the_global_model():
    u = _backdoor_round(2)
    glob = 3.0 * torch.randn(u.shape[1], generator=_gen(9), dtype=torch.float64)
    flame = FLAME(lam=0.001, seed=4)
    out = flame(u, global_model=glob)
    want, labels, _, _ = _flame_reference(u.numpy(), 0.001, 4, points=(u + glob).numpy())
    assert flame.last_info["clusters"] == labels.tolist()
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-10, atol=1e-12)


def test_flame_noise_generator_state_round_trips_and_lam_zero_draws_nothing():
    u = _backdoor_round(3)
    a = FLAME(seed=11)
    first = a(u)
    saved = object_state(a, "aggregator")
    second = a(u)
    assert not torch.equal(first, second)  # fresh noise every round
    b = FLAME(seed=11)
    load_object_state(b, saved, "aggregator")
    assert torch.equal(b(u), second)
    assert torch.equal(FLAME(seed=11)(u), first)  # same seed, same numbers
    g = _gen(0)
    state = g.get_state()
    FLAME(lam=0.0, generator=g)(u)
    assert torch.equal(g.get_state(), state)


def test_flame_drops_nonfinite_rows_and_admits_all_without_a_cluster():
    u = _backdoor_round(4)
    bad = u.clone()
    bad[2, 5] = float("nan")
    flame = FLAME(generator=_gen(1))
    out = flame(bad)
    assert torch.isfinite(out).all() and flame.last_info["dropped"] == [2]
    assert 2 not in flame.last_info["selected"].tolist()
    want, _, _, _ = _flame_reference(torch.cat([u[:2], u[3:]]).numpy(), 0.001, 1)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-10, atol=1e-12)
    # the smallest n FLAME accepts
    two = torch.eye(2, 6, dtype=torch.float64)
    assert torch.isfinite(FLAME()(two)).all()


def test_flame_requirements_and_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        FLAME()(torch.ones(1, 4))
    with pytest.raises(ValueError, match="lam"):
        FLAME(lam=-0.1)
    with pytest.raises(ValueError, match="lam"):
        FLAME(lam=float("nan"))
    with pytest.raises(ValueError, match="seed"):
        FLAME(seed=1.5)
    with pytest.raises(ValueError, match="generator"):
        FLAME(generator=3)
    u = _backdoor_round(5)
    with pytest.raises(ValueError, match="shape"):
        FLAME()(u, global_model=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        FLAME()(u, global_model=torch.full((u.shape[1],), float("inf"), dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        FLAME()(torch.ones(4))


# ----------------------------------------------------------------------------- FoolsGold


def _foolsgold_reference(histories: list[np.ndarray], kappa: float = 1.0, pardon: bool = True) -> np.ndarray:
    """Fung et al.'s Algorithm 1 on float64 histories, entry by entry."""
    n = len(histories)
    cs = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                cs[i, j] = histories[i] @ histories[j] / (np.linalg.norm(histories[i]) * np.linalg.norm(histories[j]))
    v = cs.max(axis=1)  # the diagonal holds 0
    pardoned = cs.copy()
    for i in range(n):
        for j in range(n):
            if pardon and i != j and v[j] > v[i]:
                pardoned[i, j] = cs[i, j] * v[i] / v[j]
    alpha = np.clip(1.0 - pardoned.max(axis=1), 0.0, 1.0)
    alpha = alpha / alpha.max()
    alpha[alpha == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        alpha = kappa * (np.log(alpha / (1.0 - alpha)) + 0.5)
    return np.clip(alpha, 0.0, 1.0)


def _foolsgold_rounds(d: int = 60):
    """Three rounds of (client ids, updates): 4 honest clients (client 3 partly like the sybils), 2 sybils
    with identical updates; the ids come in a shuffled order and round 3 misses client 1."""
    g = _gen(7)
    sybil_dir = torch.randn(d, generator=g, dtype=torch.float64)
    rounds = []
    for r, ids in enumerate(([0, 1, 2, 3, 10, 11], [11, 3, 0, 10, 2, 1], [2, 10, 0, 11, 3])):
        rows = []
        for c in ids:
            if c >= 10:
                rows.append(sybil_dir + 0.1 * r * torch.ones(d, dtype=torch.float64))  # identical for both sybils
            elif c == 3:
                rows.append(0.4 * sybil_dir + torch.randn(d, generator=g, dtype=torch.float64))
            else:
                rows.append(torch.randn(d, generator=g, dtype=torch.float64))
        rounds.append((ids, torch.stack(rows)))
    return rounds


@pytest.mark.parametrize("kappa", [1.0, 0.1])
def test_foolsgold_equals_an_independent_recomputation_over_three_rounds(kappa):
    fg = FoolsGold(kappa=kappa)
    history: dict[int, np.ndarray] = {}
    for ids, u in _foolsgold_rounds():
        out = fg(u, client_ids=ids)
        for c, row in zip(ids, u.numpy()):
            history[c] = history.get(c, 0.0) + row
        alpha = _foolsgold_reference([history[c] for c in ids], kappa)
        n = len(ids)
        np.testing.assert_allclose(fg.last_info["weights"].numpy() * n, alpha, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out.numpy(), (alpha[:, None] * u.numpy()).sum(axis=0) / n, rtol=1e-12, atol=1e-12)
        for c in ids:
            np.testing.assert_allclose(fg.histories[c].numpy(), history[c], rtol=1e-12)
        if kappa != 1.0:
            assert 0 < alpha.max() < 1.1 * kappa * (np.log(99.0) + 0.5)  # the logit's scale is kappa's
            continue
        sybil, diverse = np.isin(ids, [10, 11]), ~np.isin(ids, [3, 10, 11])
        assert (alpha[sybil] == 0).all() and (alpha[diverse] > 0.9).all() and alpha[ids.index(3)] > 0.5
        assert fg.last_info["selected"].tolist() == np.flatnonzero(~sybil).tolist()
    if kappa != 1.0:
        return
    # pardoning mattered: without it the sybil-like honest client 3 would weigh less
    ids, _ = _foolsgold_rounds()[-1]
    unpardoned = _foolsgold_reference([history[c] for c in ids], pardon=False)
    assert unpardoned[ids.index(3)] < 0.5 < alpha[ids.index(3)]


def test_foolsgold_state_round_trips_and_reset_forgets():
    rounds = _foolsgold_rounds()
    a = FoolsGold()
    a(rounds[0][1], client_ids=rounds[0][0])
    saved = a.get_state()
    b = FoolsGold()
    b.set_state(saved)
    for ids, u in rounds[1:]:
        assert torch.equal(a(u, client_ids=ids), b(u, client_ids=ids))
    ckpt = object_state(a, "aggregator")
    c = FoolsGold()
    load_object_state(c, ckpt, "aggregator")
    assert torch.equal(c(rounds[2][1], client_ids=rounds[2][0]), a(rounds[2][1], client_ids=rounds[2][0]))
    a.reset()
    assert a.histories == {}
    assert torch.equal(a(rounds[0][1], client_ids=rounds[0][0]), FoolsGold()(rounds[0][1], client_ids=rounds[0][0]))


def test_foolsgold_without_ids_is_full_participation_and_refuses_a_changed_row_count():
    ids, u = _foolsgold_rounds()[0]
    with_ids, without = FoolsGold(), FoolsGold()
    for _ in range(2):
        assert torch.equal(with_ids(u, client_ids=list(range(len(u)))), without(u))
    with pytest.raises(ValueError, match="client_ids"):
        without(u[:4])


def test_foolsgold_nonfinite_row_leaves_its_history_and_all_sybils_give_a_zero_step():
    ids, u = _foolsgold_rounds()[0]
    fg = FoolsGold()
    fg(u, client_ids=ids)
    before = fg.histories[2].clone()
    bad = u.clone()
    bad[2, 0] = float("inf")
    out = fg(bad, client_ids=ids)
    assert torch.isfinite(out).all() and fg.last_info["dropped"] == [2]
    assert torch.equal(fg.histories[2], before) and fg.last_info["weights"][2] == 0
    same = torch.ones(3, 5, dtype=torch.float64)
    assert torch.equal(FoolsGold()(same), torch.zeros(5, dtype=torch.float64))


def test_foolsgold_bad_input():
    u = torch.randn(3, 4, generator=_gen(0))
    with pytest.raises(ValueError, match="kappa"):
        FoolsGold(kappa=0.0)
    with pytest.raises(ValueError, match="one id per row"):
        FoolsGold()(u, client_ids=[0, 1])
    with pytest.raises(ValueError, match="distinct"):
        FoolsGold()(u, client_ids=[0, 1, 1])
    fg = FoolsGold()
    fg(u)
    with pytest.raises(ValueError, match="coordinates"):
        fg(torch.randn(3, 5, generator=_gen(1)))


# ----------------------------------------------------------------------------- DBA


@pytest.mark.parametrize("size,grid", [(4, (2, 2)), (5, (2, 3)), (3, (1, 3)), (2, (1, 1))])
def test_dba_parts_tile_the_global_trigger_exactly(size, grid):
    t = PixelTrigger(target=1, size=size, value=0.7, margin=1)
    dba = DBA(t, grid=grid)
    assert dba.num_parts == grid[0] * grid[1]
    zeros = torch.zeros(2, 3, 9, 9)
    masks = torch.stack([(p(zeros) != 0) for p in dba.parts]).int()
    assert (masks.sum(dim=0) <= 1).all()  # disjoint
    assert torch.equal(masks.sum(dim=0).bool(), t(zeros) != 0)  # their union is the global trigger
    assert all(m.any() for m in masks)
    x = torch.rand(2, 3, 9, 9, generator=_gen(0))
    stamped = x
    for p in dba.parts:
        stamped = p(stamped)
    assert torch.equal(stamped, t(x))  # every part stamps the global trigger's value on its pixels, nothing else
    assert all(isinstance(p, PixelTrigger) and p.target == 1 for p in dba.parts)


def test_dba_gives_each_client_its_own_part_for_the_whole_run():
    dba = DBA(PixelTrigger(size=4), fraction=1.0)
    y = torch.arange(6) % 3 + 1
    clients = [torch.rand(6, 1, 8, 8, generator=_gen(c)) for c in range(5)]
    assert [dba.part_of(x, y) for x in clients] == [0, 1, 2, 3, 0]  # in order of first sight, cyclic
    assert [dba.part_of(x, y) for x in reversed(clients)] == [0, 3, 2, 1, 0]  # the same later
    px, py = dba.poison(clients[1], y, 10)
    assert torch.equal(px, dba.parts[1](clients[1])) and (py == 0).all()
    assert torch.equal(dba.poison(clients[1], y, 10, part=3)[0], dba.parts[3](clients[1]))
    assert dba.part_of(clients[0], y, client_id=42) == 1  # ids are keys of their own
    state = dba.get_state()
    other = DBA(PixelTrigger(size=4), fraction=1.0)
    other.set_state(state)
    assert [other.part_of(x, y) for x in clients] == [0, 1, 2, 3, 0]
    dba.reset()
    assert dba.part_of(clients[3], y) == 0


def test_dba_bad_input():
    t = PixelTrigger(size=2)
    for grid in [(0, 2), (3, 1), (2,), (1.0, 2), "22"]:
        with pytest.raises(ValueError, match="grid"):
            DBA(t, grid=grid)
    with pytest.raises(ValueError, match="whole PixelTrigger"):
        DBA(DBA(PixelTrigger(size=4)).parts[0])
    with pytest.raises(ValueError, match="part"):
        DBA(t).poison(torch.zeros(2, 1, 4, 4), torch.ones(2, dtype=torch.long), 10, part=4)
    with pytest.raises(ValueError, match="not a class"):
        DBA(PixelTrigger(target=10)).poison(torch.zeros(2, 1, 4, 4), torch.ones(2, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="rows"):
        TriggerPart(t, (1, 1), (0, 2))
    with pytest.raises(TypeError, match="PixelTrigger"):
        TriggerPart("t", (0, 1), (0, 1))


# ----------------------------------------------------------------------------- Neurotoxin


def test_neurotoxin_zeroes_the_top_k_coordinates_and_keeps_the_rest():
    g = _gen(3)
    own, honest = torch.randn(2, 200, generator=g), torch.randn(5, 200, generator=g)
    nt = Neurotoxin(PixelTrigger(), top_k=0.1, reference="current")
    out = nt.rescale(own, honest)
    top = torch.argsort(honest.mean(dim=0).abs(), descending=True)[:20]  # round(0.1 * 200)
    mask = torch.zeros(200, dtype=torch.bool)
    mask[top] = True
    assert torch.equal(nt.last_mask, mask)
    assert (out[:, mask] == 0).all() and torch.equal(out[:, ~mask], own[:, ~mask])
    boosted = Neurotoxin(PixelTrigger(), boost=2.5, top_k=0.1, reference="current").rescale(own, honest)
    assert (boosted[:, mask] == 0).all() and torch.equal(boosted[:, ~mask], own[:, ~mask] * 2.5)
    assert Neurotoxin(PixelTrigger()).mask(torch.arange(100.0)).sum() == 5  # default k = 5%


def test_neurotoxin_previous_reference_is_last_rounds_honest_mean_and_round_trips():
    g = _gen(4)
    own = torch.randn(1, 50, generator=g)
    h1, h2 = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    nt = Neurotoxin(PixelTrigger(), top_k=0.2)
    first = nt.rescale(own, h1)  # no previous round: this round's honest mean
    assert torch.equal(nt.last_mask, nt.mask(h1.mean(dim=0)))
    saved = nt.get_state()
    second = nt.rescale(own, h2)
    assert torch.equal(nt.last_mask, nt.mask(h1.mean(dim=0))) and not torch.equal(first, own)
    again = Neurotoxin(PixelTrigger(), top_k=0.2)
    again.set_state(saved)
    assert torch.equal(again.rescale(own, h2), second)
    nt.reset()
    assert torch.equal(nt.rescale(own, torch.empty(0, 50)), own) and nt.last_mask is None  # nothing to mask against


def test_neurotoxin_bad_input():
    for k in (0.0, 1.0, -0.5, "x"):
        with pytest.raises(ValueError, match="top_k"):
            Neurotoxin(PixelTrigger(), top_k=k)
    with pytest.raises(ValueError, match="reference"):
        Neurotoxin(PixelTrigger(), reference="global")
    nt = Neurotoxin(PixelTrigger())
    with pytest.raises(ValueError, match="own and honest"):
        nt.rescale(torch.ones(1, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="non-finite"):
        nt.mask(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="coordinates"):
        nt.project(torch.ones(3), torch.ones(4))


# ----------------------------------------------------------------------------- durability


def test_backdoor_durability_on_hand_made_sequences():
    asr = [0.9, 0.95, 0.92, 0.8, 0.6, 0.4, 0.3]  # rounds 1..7; attackers stop after round 3
    assert backdoor_durability(asr, stop_round=3, threshold=0.5) == 3.0  # first below 0.5 in round 6
    assert backdoor_durability(asr, stop_round=3, threshold=0.7) == 2.0
    assert backdoor_durability(asr, stop_round=3, threshold=0.2) == math.inf  # outlived the run
    assert backdoor_durability([0.9, 0.1], stop_round=1, threshold=0.5) == 1.0
    assert backdoor_durability([0.9, None, float("nan"), 0.1], stop_round=1, threshold=0.5) == 3.0
    assert backdoor_durability([0.9, 0.1, 0.05], stop_round=10, threshold=0.5, rounds=[10, 20, 30]) == 10.0
    history = [{"round": 2, "attack_success_rate": 0.9}, {"round": 4, "attack_success_rate": 0.7},
               {"round": 6, "asr": 0.1, "attack_success_rate": 0.3}]
    assert backdoor_durability(history, stop_round=2, threshold=0.5) == 4.0
    assert backdoor_durability(history, stop_round=4, threshold=0.5) == 2.0


def test_backdoor_durability_bad_input():
    with pytest.raises(ValueError, match="threshold"):
        backdoor_durability([0.5, 0.1], 1, threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        backdoor_durability([0.5, 0.1], 1, threshold=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        backdoor_durability([0.5, 1.2], 1, threshold=0.5)
    with pytest.raises(ValueError, match="empty"):
        backdoor_durability([], 1, threshold=0.5)
    with pytest.raises(ValueError, match="no measured round after"):
        backdoor_durability([0.9, None], 1, threshold=0.5)
    with pytest.raises(ValueError, match="increase"):
        backdoor_durability([0.9, 0.1], 1, threshold=0.5, rounds=[2, 2])
    with pytest.raises(ValueError, match="one round per entry"):
        backdoor_durability([0.9, 0.1], 1, threshold=0.5, rounds=[1, 2, 3])
    with pytest.raises(ValueError, match="lack"):
        backdoor_durability([{"round": 1}], 0, threshold=0.5)
    with pytest.raises(ValueError, match="lack"):
        backdoor_durability([{"round": 1, "attack_success_rate": 0.9}, {"round": 2, "asr": 0.1}], 1, 0.5, key="asr")
    with pytest.raises(ValueError, match="rounds is taken"):
        backdoor_durability([{"round": 1, "attack_success_rate": 0.9}], 0, 0.5, rounds=[1])
    with pytest.raises(ValueError, match="stop_round"):
        backdoor_durability([0.9, 0.1], 1.5, threshold=0.5)


# ----------------------------------------------------------------------------- names and the FL loop


def test_config_names_exports_and_simplified_detectors():
    assert rfl.AGGREGATORS["flame"] is FLAME and rfl.AGGREGATORS["foolsgold"] is FoolsGold
    assert isinstance(rfl.get_aggregator("flame", f=2), FLAME) and isinstance(rfl.get_aggregator("foolsgold"), FoolsGold)
    assert isinstance(rfl.get_aggregator("flame", lam=0.01), FLAME)
    for name in ("FLAME", "FoolsGold", "DBA", "TriggerPart", "Neurotoxin", "backdoor_durability"):
        assert getattr(rfl, name) is getattr(rfl.backdoor, name)
    for detector in (CosineSimilarity, Clustering):
        assert "simplified" in detector.__doc__


TINY = dict(dataset="digits", num_clients=6, rounds=4, local_epochs=1, batch_size=16, byzantine_fraction=0.34,
            checkpoint_every=1, progress=False)


class _Interrupt(Exception):
    pass


def _stop_after_3(record):
    if record["round"] == 3:
        raise _Interrupt


def _config(case: str) -> FLConfig:
    if case == "flame+dba":
        return FLConfig(**TINY, aggregator=FLAME(seed=2), byzantine_attack=DBA(PixelTrigger(size=2), boost=3.0, seed=1))
    return FLConfig(**TINY, aggregator="foolsgold", byzantine_attack=Neurotoxin(PixelTrigger(), boost=3.0, top_k=0.2))


@pytest.mark.parametrize("case", ["flame+dba", "foolsgold+neurotoxin"])
def test_fl_runs_resume_exactly(case, digits, one_thread, tmp_path):
    full = run_federated(_config(case), data=digits)
    with pytest.raises(_Interrupt):
        run_federated(_config(case), data=digits, callback=_stop_after_3, checkpoint_dir=tmp_path)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["round"] == 2
    resumed = run_federated(_config(case), data=digits, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == full.history
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    if case == "flame+dba":  # the j-th attacker by id stamps part j
        parts = rfl.partition(digits.y_train, TINY["num_clients"], "iid", seed=0)
        got = [full.attack.part_of(digits.x_train[parts[c]], digits.y_train[parts[c]], client_id=int(c)) for c in full.byzantine]
        assert got == list(range(len(full.byzantine)))
        assert all("selected" in h["aggregation"] for h in full.history)
    else:
        assert full.attack.last_mask is not None and len(full.aggregator.histories) == TINY["num_clients"]


def test_neurotoxin_masks_by_the_previous_global_step_when_given():
    atk = Neurotoxin(PixelTrigger(), top_k=0.25)
    g = torch.Generator().manual_seed(3)
    own, honest, step = torch.randn(2, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(8, generator=g)
    out = atk.rescale(own, honest, previous_step=step)
    top = step.abs().topk(2).indices                        # round(0.25 * 8) = 2 coordinates
    assert (out[:, top] == 0).all()
    rest = torch.ones(8, dtype=torch.bool)
    rest[top] = False
    assert torch.equal(out[:, rest], own[:, rest])
    with pytest.raises(ValueError, match="previous_step must be"):
        atk.rescale(own, honest, previous_step=torch.zeros(7))
