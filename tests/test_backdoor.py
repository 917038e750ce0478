"""Backdoor trigger, poisoning, metrics and detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustfl_lib import MLP, make_generator, train
from robustfl_lib.aggregators import Median
from robustfl_lib.backdoor import (
    Clustering,
    CosineSimilarity,
    Detect,
    NormClipNoise,
    NormZScore,
    PixelTrigger,
    attack_success_rate,
    detection_scores,
    poison,
)


def test_trigger_stamps_corner_only():
    x = torch.zeros(3, 1, 8, 8)
    t = PixelTrigger(target=7, size=2, value=1.0)
    out = t(x)
    assert torch.equal(out[:, :, 6:, 6:], torch.ones(3, 1, 2, 2))
    assert out.sum() == 3 * 4 and x.sum() == 0
    assert PixelTrigger(size=1, margin=1)(x)[0, 0, 6, 6] == 1
    with pytest.raises(ValueError, match="does not fit"):
        PixelTrigger(size=8, margin=1)(x)
    with pytest.raises(ValueError, match="N, C, H, W"):
        t(torch.zeros(8, 8))


def test_poison_fraction_and_labels():
    x, y = torch.rand(50, 1, 8, 8), torch.arange(50) % 10
    t = PixelTrigger(target=3)
    px, py = poison(x, y, t, 0.2, make_generator(0))
    changed = (px != x).flatten(1).any(dim=1)
    assert changed.sum() <= 10 and (py != y).sum() <= 10
    relabelled = py != y
    assert (py[relabelled] == 3).all() and changed[relabelled].all()
    with pytest.raises(ValueError, match="fraction"):
        poison(x, y, t, 1.5)


def test_backdoor_learned_and_measured(digits):
    t = PixelTrigger(target=0, size=2)
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10)
    asr_before = attack_success_rate(model, digits.x_test, digits.y_test, t)
    px, py = poison(digits.x_train, digits.y_train, t, 0.2, make_generator(0))
    train(model, px, py, epochs=15, lr=0.2, generator=make_generator(1))
    asr = attack_success_rate(model, digits.x_test, digits.y_test, t)
    assert asr > 0.9 and asr > asr_before
    with pytest.raises(ValueError, match="outside the target"):
        attack_success_rate(model, digits.x_test[:3], torch.zeros(3, dtype=torch.long), t)


def test_detection_scores():
    assert detection_scores([1, 1, 0, 0], [1, 0, 1, 0]) == {"precision": 0.5, "recall": 0.5}
    assert detection_scores([0, 0], [0, 0]) == {"precision": 1.0, "recall": 1.0}
    with pytest.raises(ValueError):
        detection_scores([1], [1, 0])


def _updates(n_honest=9, d=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_honest, d, generator=g) + 0.5 * torch.randn(1, d, generator=g)


def test_norm_zscore_flags_boosted_update():
    u = _updates()
    boosted = torch.cat([u, 20 * u[:1]])
    flags = NormZScore(3.0)(boosted)
    assert flags.tolist() == [False] * 9 + [True]
    nan = torch.cat([u, torch.full((1, 50), float("nan"))])
    assert NormZScore()(nan)[-1] and not NormZScore()(nan)[:-1].any()


def test_cosine_flags_colluding_sybils():
    u = _updates()
    direction = torch.randn(50, generator=torch.Generator().manual_seed(9))
    sybils = direction + 0.01 * torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    flags = CosineSimilarity(0.9)(torch.cat([u, sybils]))
    assert flags.tolist() == [False] * 9 + [True] * 3


def test_clustering_keeps_majority():
    # Honest updates share the task's direction (as real FL updates do); the attackers push elsewhere.
    g = torch.Generator().manual_seed(0)
    u = 3 * torch.randn(1, 40, generator=g) + torch.randn(10, 40, generator=g)
    mal = -3 * u.mean(0) + 0.05 * torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    flags = Clustering()(torch.cat([u, mal]))
    # The attackers are flagged; the majority cluster (at least n // 2 + 1 updates) is kept, though FLAME may
    # also drop honest updates that HDBSCAN calls noise.
    assert flags[-3:].all() and (~flags).sum() >= 13 // 2 + 1
    # With no majority cluster (mutually orthogonal updates) nothing is flagged.
    assert not Clustering()(torch.eye(6)).any()


def test_detect_aggregates_unflagged_only():
    u = _updates()
    x = torch.cat([u, 50 * torch.ones(1, 50)])
    agg = Detect(NormZScore(), then=Median())
    out = agg(x)
    torch.testing.assert_close(out, Median()(u))
    assert agg.last_info["flagged"][-1] is True and 9 not in agg.last_info["selected"].tolist()


def test_norm_clip_noise():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]])
    out = NormClipNoise(threshold=1.0)(x)
    torch.testing.assert_close(out, torch.tensor([(0.6 + 0.3 + 0.6) / 3, (0.8 + 0.4 + 0.8) / 3]))
    adaptive = NormClipNoise()(x)  # clip to the median norm (5)
    assert adaptive.norm() <= 5.0 + 1e-6
    a = NormClipNoise(1.0, sigma=0.1, generator=make_generator(0))(x)
    b = NormClipNoise(1.0, sigma=0.1, generator=make_generator(0))(x)
    assert torch.equal(a, b) and not torch.equal(a, out)
    assert torch.isfinite(NormClipNoise(1.0)(torch.cat([x, torch.full((1, 2), float("inf"))]))).all()
    with pytest.raises(ValueError):
        NormClipNoise(threshold=0)


# --- backdoor clients in the FL loop, and detection over rounds (chapter 11)

from robustfl_lib import FLConfig, run_federated  # noqa: E402
from robustfl_lib.aggregators import Mean  # noqa: E402
from robustfl_lib.backdoor import BackdoorPoisoning, detection_over_rounds  # noqa: E402


class _RecordingMean(Mean):
    """The mean, keeping every round's updates (to look at what the server received)."""

    def __init__(self):
        self.seen = []

    def aggregate_finite(self, updates, weights, dropped):
        self.seen.append(updates.clone())
        return super().aggregate_finite(updates, weights, dropped)


def _fl(digits, attack, aggregator, rounds=1, **kw):
    config = FLConfig(num_clients=5, rounds=rounds, local_epochs=1, batch_size=32, byzantine_fraction=0.4,
                      byzantine_attack=attack, aggregator=aggregator, progress=False, seed=3, **kw)
    return run_federated(config, data=digits)


def test_backdoor_poisoning_is_seeded_and_checked():
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 10
    atk = BackdoorPoisoning(PixelTrigger(target=2), fraction=0.25, boost=4.0, seed=1)
    (px, py), (qx, qy) = atk.poison(x, y, 10), atk.poison(x, y, 10)
    assert torch.equal(px, qx) and torch.equal(py, qy)  # the same samples every round
    stamped = (px != x).flatten(1).any(dim=1) | (py != y)
    assert 0 < stamped.sum() <= 10 and (py[stamped] == 2).all()
    other = BackdoorPoisoning(PixelTrigger(target=2), fraction=0.25, seed=2).poison(x, y, 10)[0]
    assert not torch.equal(px, other)
    with pytest.raises(ValueError, match="not a class"):
        BackdoorPoisoning(PixelTrigger(target=12)).poison(x, y, 10)
    for bad in (dict(boost=0.0), dict(boost=float("inf")), dict(fraction=1.5)):
        with pytest.raises(ValueError):
            BackdoorPoisoning(PixelTrigger(), **bad)
    with pytest.raises(ValueError, match="PixelTrigger"):
        BackdoorPoisoning("corner")


def test_backdoor_clients_are_boosted_in_the_fl_loop(digits):
    plain, boosted = _RecordingMean(), _RecordingMean()
    t = PixelTrigger(target=0)
    # A run aggregates with its own copy of the rule (the config's object is left as it was).
    r1 = _fl(digits, BackdoorPoisoning(t, 0.5, boost=1.0), plain)
    plain = r1.aggregator
    boosted = _fl(digits, BackdoorPoisoning(t, 0.5, boost=3.0), boosted).aggregator
    byz = np.isin(r1.history[0]["participants"], r1.byzantine)
    assert byz.sum() == 2
    # Same seed, same training: boosting multiplies exactly the attackers' rows.
    torch.testing.assert_close(boosted.seen[0][byz], 3.0 * plain.seen[0][byz])
    torch.testing.assert_close(boosted.seen[0][~byz], plain.seen[0][~byz])
    # Poisoned training differs from honest training on the same data.
    clean = _fl(digits, BackdoorPoisoning(t, 0.0, boost=1.0), _RecordingMean()).aggregator
    assert not torch.allclose(clean.seen[0][byz], plain.seen[0][byz])


def test_detection_over_rounds_from_a_history():
    history = [
        {"round": 1, "participants": [0, 1, 2, 3], "byzantine": [3], "aggregation": {"selected": [0, 1, 2]}},
        {"round": 2, "participants": [0, 1, 2, 3], "byzantine": [3], "aggregation": {"selected": [0, 3]}},
        {"round": 3, "participants": [0, 1], "byzantine": [], "aggregation": {"skipped": "quorum"}},
        {"round": 4, "participants": [0, 1, 2], "byzantine": [], "aggregation": {"selected": [0, 1, 2]}},
    ]
    d = detection_over_rounds(history)
    np.testing.assert_array_equal(d["round"], [1, 2, 3, 4])
    np.testing.assert_array_equal(d["precision"], [1.0, 0.0, np.nan, 1.0])
    np.testing.assert_array_equal(d["recall"], [1.0, 0.0, np.nan, 1.0])
    np.testing.assert_array_equal(d["flagged"], [1, 2, np.nan, 0])
    with pytest.raises(ValueError, match="no selection"):
        detection_over_rounds([{"round": 1, "participants": [0], "byzantine": [], "aggregation": {}}])
    with pytest.raises(ValueError, match="empty"):
        detection_over_rounds([])


def test_norm_detector_catches_boosted_backdoor_in_fl(digits):
    t = PixelTrigger(target=0)
    res = _fl(digits, BackdoorPoisoning(t, 0.5, boost=10.0), Detect(NormZScore()), rounds=2)
    d = detection_over_rounds(res.history)
    assert (d["recall"] == 1.0).all() and (d["precision"] == 1.0).all()
    assert all(set(h["aggregation"]["selected"]).isdisjoint(res.byzantine) for h in res.history)


def test_clustering_accepts_float32_rounding(monkeypatch):
    # A float32 cosine matrix need not be exactly symmetric (whether it is depends on the BLAS and its
    # threads), and HDBSCAN refuses an asymmetric one. Make every product asymmetric by one ulp above
    # the diagonal, so the test does not depend on the machine: Clustering must still work.
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 1000, generator=g) + 0.7 * torch.randn(10, 1000, generator=g)
    matmul = torch.Tensor.__matmul__

    def asymmetric(a, b):
        out = matmul(a, b)
        if out.ndim == 2 and out.shape[0] == out.shape[1]:
            out = out + torch.triu(torch.ones_like(out), 1) * torch.finfo(out.dtype).eps * out.abs()
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", asymmetric)
    unit = u / u.norm(dim=1, keepdim=True)
    assert not torch.equal(unit @ unit.T, (unit @ unit.T).T)
    flags = Clustering()(u)
    assert flags.dtype == torch.bool and flags.shape == (10,)
