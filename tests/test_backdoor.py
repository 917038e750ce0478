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
