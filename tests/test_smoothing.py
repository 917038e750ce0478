"""Randomized smoothing against closed forms (Cohen et al. 2019)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from robustfl_lib import MLP, make_generator, train
from robustfl_lib.smoothing import (
    ABSTAIN,
    Smooth,
    SmoothedSoftClassifier,
    certified_accuracy,
    clopper_pearson_lower,
    gaussian_noise_loss,
)


class Constant(nn.Module):
    """Always predicts class ``c``."""

    def __init__(self, c: int, k: int = 3):
        super().__init__()
        self.c, self.k, self.w = c, k, nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), self.k) + self.w
        out[:, self.c] = 1.0
        return out


class HalfSpace(nn.Module):
    """Class 1 iff the first coordinate exceeds ``b``: the smoothed probability is Phi((x0 - b) / sigma)."""

    def __init__(self, b: float = 0.0):
        super().__init__()
        self.b, self.w = b, nn.Parameter(torch.zeros(1))

    def forward(self, x):
        s = (x.reshape(len(x), -1)[:, 0] - self.b).unsqueeze(1)
        return torch.cat([-s, s], dim=1) + self.w


@pytest.mark.parametrize("n,alpha,sigma", [(100, 0.001, 0.25), (1000, 0.01, 0.5), (50, 0.05, 1.0)])
def test_constant_classifier_radius_closed_form(n, alpha, sigma):
    smooth = Smooth(Constant(2), 3, sigma, generator=make_generator(0))
    c, r = smooth.certify(torch.zeros(4), n0=10, n=n, alpha=alpha, batch_size=64)
    assert c == 2
    assert r == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)


def test_clopper_pearson_lower_bound():
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** 0.1)
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    # Coverage: the bound is below the true p in at least 1 - alpha of experiments.
    rng = np.random.default_rng(0)
    p, n, alpha = 0.7, 200, 0.05
    below = [clopper_pearson_lower(int(rng.binomial(n, p)), n, alpha) <= p for _ in range(400)]
    assert np.mean(below) >= 1 - alpha - 0.02
    with pytest.raises(ValueError):
        clopper_pearson_lower(11, 10, 0.05)


def test_half_space_radius_matches_distance_to_boundary():
    # For a linear boundary the exact smoothed radius is the distance |x0 - b|; the certificate is a lower bound
    # that approaches it as n grows.
    sigma, x0 = 0.5, 0.6
    smooth = Smooth(HalfSpace(0.0), 2, sigma, generator=make_generator(1))
    c, r = smooth.certify(torch.tensor([x0, 0.0]), n0=100, n=20000, alpha=0.001, batch_size=5000)
    assert c == 1
    assert 0.8 * x0 < r < x0


def test_predict_abstains_at_the_boundary_and_not_far_from_it():
    smooth = Smooth(HalfSpace(0.0), 2, 0.5, generator=make_generator(2))
    assert smooth.predict(torch.tensor([2.0, 0.0]), n=200, alpha=0.01) == 1
    assert smooth.predict(torch.tensor([-2.0, 0.0]), n=200, alpha=0.01) == 0
    abstained = [smooth.predict(torch.tensor([0.0, 0.0]), n=100, alpha=0.001) for _ in range(20)]
    assert abstained.count(ABSTAIN) >= 18


def test_certify_abstains_when_no_majority():
    smooth = Smooth(HalfSpace(0.0), 2, 0.5, generator=make_generator(3))
    c, r = smooth.certify(torch.tensor([0.0, 0.0]), n0=50, n=500, alpha=0.001)
    assert (c, r) == (ABSTAIN, 0.0)


def test_fresh_samples_and_reproducibility():
    def run(seed):
        s = Smooth(HalfSpace(0.0), 2, 0.5, generator=make_generator(seed))
        return s.certify(torch.tensor([0.3, 0.0]), n0=50, n=500, alpha=0.01)

    assert run(5) == run(5)
    calls = []
    smooth = Smooth(HalfSpace(0.0), 2, 0.5)
    orig = smooth.sample_counts
    smooth.sample_counts = lambda x, num, bs: calls.append(num) or orig(x, num, bs)
    smooth.certify(torch.tensor([1.0, 0.0]), n0=17, n=301, alpha=0.01)
    assert calls == [17, 301]


def test_model_mode_restored_and_errors():
    model = MLP((1, 8, 8), 10)
    model.train()
    smooth = Smooth(model, 10, 0.25)
    counts = smooth.sample_counts(torch.rand(1, 8, 8), 37, batch_size=10)
    assert counts.sum() == 37 and model.training
    for bad in (dict(sigma=0), dict(num_classes=1)):
        kw = dict(model=model, num_classes=10, sigma=0.25) | bad
        with pytest.raises(ValueError):
            Smooth(**kw)
    with pytest.raises(ValueError, match="alpha"):
        smooth.predict(torch.rand(1, 8, 8), 10, alpha=1.5)


def test_certified_accuracy_curve():
    acc = certified_accuracy([1, 2, ABSTAIN, 0], [0.5, 1.0, 0.0, 0.2], [1, 2, 0, 1], [0.0, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(acc, [0.5, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="must match"):
        certified_accuracy([1], [0.1, 0.2], [1], [0.0])


def test_noise_training_runs_and_is_seeded(digits):
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        m = MLP((1, 8, 8), 10)
        losses.append(train(m, digits.x_train, digits.y_train, epochs=2, lr=0.1, generator=make_generator(0),
                            loss_fn=gaussian_noise_loss(0.25, make_generator(1))))
    assert losses[0] == losses[1] and losses[0][1] < losses[0][0] and math.isfinite(losses[0][1])


def test_smoothed_soft_classifier_matches_closed_form_and_has_gradients():
    # For the half-space classifier, P(class 1) = Phi(x0 / sigma).
    soft = SmoothedSoftClassifier(HalfSpace(0.0), sigma=0.5, num_samples=20000, generator=make_generator(0))
    x = torch.tensor([[0.25, 0.0], [-0.5, 0.3]], requires_grad=True)
    logp = soft(x)
    assert logp.shape == (2, 2)
    # softmax of (-s, s) is not a hard vote, but its mean still favours the right side of the boundary.
    assert logp[0, 1] > logp[0, 0] and logp[1, 0] > logp[1, 1]
    (grad,) = torch.autograd.grad(logp[:, 1].sum(), x)
    assert grad[0, 0] > 0 and torch.isfinite(grad).all()
    with pytest.raises(ValueError):
        SmoothedSoftClassifier(HalfSpace(), sigma=0.0)
