"""Attacks that know the defense (chapter 12): AdaptiveScaling, stealthy_norm, ConstrainAndScale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustfl_lib import ALIE, FLConfig, run_federated
from robustfl_lib.aggregators import CenteredClipping, Krum, Mean, Median, TrimmedMean
from robustfl_lib.backdoor import (
    BackdoorPoisoning,
    ConstrainAndScale,
    Detect,
    NormZScore,
    PixelTrigger,
    detection_over_rounds,
    stealthy_norm,
)
from robustfl_lib.byzantine import AdaptiveScaling, DataPoisoning


def _honest(n=8, d=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.0 + 0.3 * torch.randn(n, d, generator=g)


def _damage(agg, honest, byz):
    return float((agg(torch.cat([honest, byz])) - honest.mean(0)).norm())


def test_adaptive_scaling_stays_selected_by_krum():
    h = _honest()
    krum = Krum(f=2)
    atk = AdaptiveScaling(krum, direction="sign")
    byz = atk(h, 2)
    assert byz.shape == (2, 60) and torch.equal(byz[0], byz[1])
    krum(torch.cat([h, byz]))
    assert set(krum.last_info["selected"].tolist()) & {8, 9}  # Krum picks the attacker
    # ... and it does more damage than ALIE or than the same direction pushed 4x further (which Krum rejects).
    mu, r = h.mean(0), h.norm(dim=1).median()
    farther = (mu + 4 * atk.last_scale * r * atk.perturbation(h)).expand(2, -1)
    krum(torch.cat([h, farther]))
    assert not set(krum.last_info["selected"].tolist()) & {8, 9}
    assert _damage(krum, h, byz) > _damage(krum, h, farther)
    assert _damage(krum, h, byz) > _damage(krum, h, ALIE()(h, 2))
    # Along -sign(mean), every coordinate moves against the honest direction.
    assert ((byz[0] - mu) * torch.sign(mu) < 0).all()


def test_adaptive_scaling_search_picks_the_most_damaging_scale():
    h = _honest(seed=1)
    scales = (0.0, 0.1, 0.5, 1.0, 2.0, 8.0)
    # Against the mean, damage grows with the scale: the largest one wins, and refining goes beyond it.
    atk = AdaptiveScaling(Mean(), direction="mean", scales=scales, refine=0)
    atk(h, 2)
    assert atk.last_scale == 8.0
    atk = AdaptiveScaling(Mean(), direction="mean", scales=scales, refine=2)
    atk(h, 2)
    assert atk.last_scale == pytest.approx(8.0 * 2**0.5 * 2**0.25)
    # Against the trimmed mean it is the scale of largest measured damage, not the largest scale.
    tm = TrimmedMean(f=2)
    atk = AdaptiveScaling(tm, direction="std", scales=scales, refine=0)
    byz = atk(h, 2)
    mu, r, p = h.mean(0), h.norm(dim=1).median(), atk.perturbation(h)
    damages = [_damage(tm, h, (mu + s * r * p).expand(2, -1)) for s in scales]
    assert atk.last_scale == scales[int(np.argmax(damages))]
    assert _damage(tm, h, byz) == pytest.approx(max(damages))
    np.testing.assert_allclose(atk.damages(h, 2).numpy(), damages, rtol=1e-5)
    with pytest.raises(ValueError, match="num_byzantine"):
        atk.damages(h, 0)
    # Refinement only ever improves on the coarse grid's best damage.
    krum = Krum(f=2)
    coarse = AdaptiveScaling(krum, "sign", refine=0)
    fine = AdaptiveScaling(krum, "sign", refine=3)
    assert _damage(krum, h, fine(h, 2)) >= _damage(krum, h, coarse(h, 2))
    with pytest.raises(ValueError, match="refine"):
        AdaptiveScaling(krum, refine=-1)
    # The "std" direction is ALIE's: minus the coordinate-wise standard deviation.
    torch.testing.assert_close(p, -h.std(0) / h.std(0).norm())


def test_adaptive_scaling_leaves_a_stateful_aggregator_alone_and_checks_input():
    h = _honest(seed=2)
    cc = CenteredClipping(init="previous")
    cc(h)
    before = cc.get_state()["previous"].clone()
    AdaptiveScaling(cc)(h, 2)
    torch.testing.assert_close(cc.get_state()["previous"], before)
    a, b = AdaptiveScaling(Median())(h, 3), AdaptiveScaling(Median())(h, 3)
    assert torch.equal(a, b)
    assert AdaptiveScaling("trimmed_mean", f=2)(h, 2).shape == (2, 60)
    with pytest.raises(ValueError, match="direction"):
        AdaptiveScaling(Median(), direction="up")
    with pytest.raises(ValueError, match="needs the f"):
        AdaptiveScaling("krum")
    with pytest.raises(ValueError, match="scales"):
        AdaptiveScaling(Median(), scales=[-1.0])
    with pytest.raises(ValueError):
        AdaptiveScaling(Median())(torch.full((3, 4), float("nan")), 1)


def test_adaptive_scaling_reasons_about_the_servers_weighted_mean():
    h = _honest(n=6, seed=3).double()
    w = torch.tensor([5.0, 90.0, 20.0, 1.0, 40.0, 12.0], dtype=torch.float64)
    wb = torch.tensor([30.0, 8.0], dtype=torch.float64)
    scales = (0.25, 1.0, 4.0)
    atk = AdaptiveScaling(Mean(), direction="mean", scales=scales, refine=0)
    mu_w = (w / w.sum()) @ h
    p = -mu_w / mu_w.norm()
    torch.testing.assert_close(atk.perturbation(h, w), p)
    r = h.norm(dim=1).median()
    # each trial is what the server computes: the weighted mean of all rows, against the weighted honest mean
    expected = [float((Mean()(torch.cat([h, (mu_w + s * r * p).expand(2, -1)]), weights=torch.cat([w, wb])) - mu_w).norm())
                for s in scales]
    np.testing.assert_allclose(atk.damages(h, 2, weights=w, byzantine_weights=wb).numpy(), expected, rtol=1e-10)
    assert not np.allclose(atk.damages(h, 2).numpy(), expected, rtol=1e-3)  # the unweighted objective differs
    byz = atk(h, 2, weights=w, byzantine_weights=wb)
    assert atk.last_scale == 4.0
    torch.testing.assert_close(byz[0], mu_w + 4.0 * r * p)
    # without weights: the plain mean, as before
    mu = h.mean(0)
    torch.testing.assert_close(atk(h, 2)[0], mu + 4.0 * r * (-mu / mu.norm()))


def test_stealthy_norm_is_the_detectors_threshold():
    h = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98], dtype=torch.float64)
    det = NormZScore(3.0)
    n = stealthy_norm(h, torch.tensor([10.0, 10.0]), det)
    ok = det(torch.cat([h, torch.tensor([n, n], dtype=torch.float64)])[:, None])
    assert not ok.any()
    flagged = det(torch.cat([h, torch.tensor([1.001 * n] * 2, dtype=torch.float64)])[:, None])
    assert flagged[-2:].all()
    # Closed form here: median 1.0 and MAD 0.05 stay put, so N = 1 + 3 * 1.4826 * 0.05.
    assert n == pytest.approx(1.0 + 3 * 1.4826 * 0.05, rel=1e-9)
    # Nothing to hide when even the largest allowed norm passes.
    assert stealthy_norm(h, torch.tensor([1.1]), det) == float("inf")
    with pytest.raises(ValueError):
        stealthy_norm(h, torch.tensor([float("nan")]), det)
    with pytest.raises(ValueError):
        stealthy_norm(torch.tensor([]), torch.tensor([1.0]), det)


def test_constrain_and_scale_rescale_passes_the_detector():
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(8, 200, generator=g) * (1 + 0.05 * torch.rand(8, 1, generator=g))
    own = 3 * torch.randn(2, 200, generator=g)  # poisoned training alone made these too long
    atk = ConstrainAndScale(PixelTrigger(), boost=5.0, detector=NormZScore(3.0))
    out = atk.rescale(own, honest)
    assert not NormZScore(3.0)(torch.cat([honest, out]))[-2:].any()
    assert (atk.last_boost < 1).all()  # it had to shrink
    torch.testing.assert_close(out / out.norm(dim=1, keepdim=True), own / own.norm(dim=1, keepdim=True))
    # With widely spread honest norms there is room: the boost is capped at gamma_max.
    wide = torch.randn(8, 200, generator=g) * torch.linspace(1, 30, 8)[:, None]
    small = 0.1 * own
    torch.testing.assert_close(atk.rescale(small, wide), 5.0 * small)
    assert atk.rescale(own[:0], honest).shape == (0, 200)
    with pytest.raises(ValueError, match="margin"):
        ConstrainAndScale(PixelTrigger(), margin=0.0)
    assert isinstance(atk, DataPoisoning)


def test_constrain_and_scale_evades_the_norm_detector_in_fl(digits):
    # The federated loop calls rescale (the adaptive attacker sees the round's honest updates).
    t = PixelTrigger(target=0)
    base = dict(num_clients=5, rounds=2, local_epochs=1, batch_size=32, byzantine_fraction=0.4,
                aggregator=Detect(NormZScore(3.0)), progress=False, seed=3)
    naive = run_federated(FLConfig(byzantine_attack=BackdoorPoisoning(t, 0.5, boost=10.0), **base), data=digits)
    atk = ConstrainAndScale(t, 0.5, boost=10.0, detector=NormZScore(3.0))
    base["aggregator"] = Detect(NormZScore(3.0))
    stealthy = run_federated(FLConfig(byzantine_attack=atk, **base), data=digits)
    assert (detection_over_rounds(naive.history)["recall"] == 1.0).all()
    assert (detection_over_rounds(stealthy.history)["recall"] == 0.0).all()
    # The run attacks with its own copy of atk (the config's object is left as it was).
    assert atk.last_boost is None
    assert stealthy.attack.last_boost is not None and stealthy.attack.last_boost.shape == (2,)
