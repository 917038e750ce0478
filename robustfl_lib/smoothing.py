r"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): a classifier with a certified L2 radius.

The smoothed classifier predicts the class the base classifier :math:`f` returns most
often under Gaussian noise,

.. math:: g(x) = \arg\max_c \; P\big(f(x + \varepsilon) = c\big), \qquad \varepsilon \sim \mathcal N(0, \sigma^2 I),

and if the top class has probability at least :math:`\underline{p_A} > 1/2`, then
:math:`g(x + \delta) = g(x)` for every :math:`\|\delta\|_2 < R = \sigma\,\Phi^{-1}(\underline{p_A})`.
:meth:`Smooth.certify` estimates :math:`\underline{p_A}` by Monte Carlo with a one-sided
Clopper-Pearson bound that holds with probability at least :math:`1 - \alpha`;
:meth:`Smooth.predict` abstains unless a two-sided binomial test separates the top two
classes at level :math:`\alpha`. Taught in chapter ``10_exercise_randomized_smoothing``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta, binomtest, norm
from torch import nn

__all__ = [
    "Smooth",
    "ABSTAIN",
    "SmoothedSoftClassifier",
    "gaussian_noise_loss",
    "certified_accuracy",
    "clopper_pearson_lower",
]

#: The class index returned when the smoothed classifier abstains.
ABSTAIN = -1


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound on a binomial proportion.

    ``Beta(alpha; k, n - k + 1)``, and 0 when ``k = 0``.
    """
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}, {trials}")
    if successes == 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


class Smooth:
    """The smoothed version of ``model`` (a classifier returning logits) with noise level ``sigma``.

    ``x`` is one input without a batch dimension, e.g. ``(1, 8, 8)``. Noise is drawn
    in batches of ``batch_size`` on the model's device, from ``generator`` when given
    (reproducible certificates). The model is put in eval mode during sampling and
    restored afterwards.
    """

    def __init__(self, model: nn.Module, num_classes: int, sigma: float, generator: torch.Generator | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.model, self.num_classes, self.sigma, self.generator = model, num_classes, float(sigma), generator

    def _device(self) -> torch.device:
        return next(iter(self.model.parameters()), torch.empty(0)).device

    @torch.no_grad()
    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int = 1000) -> torch.Tensor:
        """How often the base model predicts each class on ``num`` noisy copies of ``x`` (int64, (num_classes,))."""
        if num < 1 or batch_size < 1:
            raise ValueError(f"num and batch_size must be >= 1, got {num}, {batch_size}")
        device = self._device()
        x = x.to(device)
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            remaining = num
            while remaining > 0:
                b = min(batch_size, remaining)
                noise = torch.randn((b, *x.shape), generator=self.generator, device=device if self.generator is None
                                    else self.generator.device, dtype=x.dtype).to(device)
                preds = self.model(x.unsqueeze(0) + self.sigma * noise).argmax(dim=1)
                counts += torch.bincount(preds, minlength=self.num_classes)
                remaining -= b
        finally:
            self.model.train(was_training)
        return counts.cpu()

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int = 1000) -> int:
        """The smoothed prediction, or ``ABSTAIN`` (-1) if the top two counts are not
        significantly different (two-sided binomial test at ``p = 1/2``, level ``alpha``)."""
        _check_alpha(alpha)
        counts = self.sample_counts(x, n, batch_size)
        top2 = counts.topk(2)
        n_a, n_b = int(top2.values[0]), int(top2.values[1])
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2.indices[0])

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int = 1000) -> tuple[int, float]:
        """``(class, radius)`` with ``radius = sigma * Phi^-1(pA_lower)``, or ``(ABSTAIN, 0.0)``.

        The class is guessed from ``n0`` noisy samples; its probability is then
        estimated from ``n`` *fresh* samples (never the first ones), whose one-sided
        Clopper-Pearson lower bound ``pA_lower`` must exceed 1/2.
        """
        _check_alpha(alpha)
        guess = int(self.sample_counts(x, n0, batch_size).argmax())
        n_a = int(self.sample_counts(x, n, batch_size)[guess])
        p_a = clopper_pearson_lower(n_a, n, alpha)
        if p_a < 0.5:
            return ABSTAIN, 0.0
        return guess, self.sigma * float(norm.ppf(p_a))

    def certify_many(self, xs: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int = 1000):
        """:meth:`certify` for each row of ``xs``: returns ``(classes, radii)`` as numpy arrays."""
        results = [self.certify(x, n0, n, alpha, batch_size) for x in xs]
        return np.array([c for c, _ in results]), np.array([r for _, r in results])


class SmoothedSoftClassifier(nn.Module):
    r"""A differentiable stand-in for the smoothed classifier, to attack it with PGD (Salman et al. 2019).

    ``forward(x)`` returns :math:`\log \frac1m \sum_{j=1}^m \mathrm{softmax}(f(x + \varepsilon_j))`,
    :math:`\varepsilon_j \sim \mathcal N(0, \sigma^2 I)` drawn afresh at each call. An
    attack that raises this loss moves ``x`` towards where the smoothed classifier
    changes its mind; its success rate is an *empirical* upper bound on the smoothed
    classifier's robust accuracy, which the certificate must never exceed.
    """

    def __init__(self, model: nn.Module, sigma: float, num_samples: int = 32, generator: torch.Generator | None = None):
        super().__init__()
        if not sigma > 0 or num_samples < 1:
            raise ValueError(f"need sigma > 0 and num_samples >= 1, got {sigma}, {num_samples}")
        self.model, self.sigma, self.num_samples, self.generator = model, float(sigma), int(num_samples), generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.num_samples
        gen_device = self.generator.device if self.generator is not None else x.device
        noise = torch.randn((m, *x.shape), generator=self.generator, dtype=x.dtype, device=gen_device).to(x.device)
        logits = self.model((x.unsqueeze(0) + self.sigma * noise).reshape(m * len(x), *x.shape[1:]))
        probs = logits.softmax(dim=-1).reshape(m, len(x), -1).mean(dim=0)
        return probs.clamp_min(1e-12).log()


def gaussian_noise_loss(sigma: float, generator: torch.Generator | None = None):
    """A ``loss_fn`` for :func:`robustfl_lib.training.train`: cross-entropy on ``x + N(0, sigma^2 I)``.

    Training the base model under the noise it will be smoothed with is what makes
    the smoothed classifier accurate (Cohen et al. 2019, section 5).
    """
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                            device=x.device if generator is None else generator.device).to(x.device)
        return F.cross_entropy(model(x + sigma * noise), y)

    return loss


def certified_accuracy(classes, radii, labels, radius_grid: Sequence[float]) -> np.ndarray:
    """Fraction of examples certified correct at each radius: ``class == label`` and ``radius >= r``.

    An abstention counts as wrong. Plotted against ``r``, this is the certified
    accuracy curve of Cohen et al. (2019, figure 1).
    """
    classes, radii = np.asarray(classes), np.asarray(radii, dtype=float)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if not classes.shape == radii.shape == labels.shape:
        raise ValueError(f"classes {classes.shape}, radii {radii.shape} and labels {labels.shape} must match")
    correct = classes == labels
    return np.array([(correct & (radii >= r)).mean() for r in radius_grid])
