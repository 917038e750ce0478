"""Defenses that bound every update instead of flagging some: :class:`NormClipNoise`.
Chapter ``11_exercise_backdoor_detection``.
"""

from __future__ import annotations

import torch

from ..aggregators import RobustAggregator
from ..robust_stats import compute_dtype

__all__ = ["NormClipNoise"]


class NormClipNoise(RobustAggregator):
    r"""Sun et al. (2019): clip each update to norm :math:`M`, average, add :math:`\mathcal N(0, \sigma^2 I)`.

    .. math:: \bar u = \frac1n \sum_i u_i \min\Big(1, \frac{M}{\|u_i\|}\Big) + \mathcal N(0, \sigma^2 I)

    Clipping caps what a boosted update can contribute; the noise blurs the
    small, precise change a backdoor needs. ``threshold=None`` clips to the
    median norm of the round (FLAME's adaptive choice).
    """

    def __init__(self, threshold: float | None = None, sigma: float = 0.0, generator: torch.Generator | None = None):
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold must be > 0 or None, got {threshold}")
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.threshold, self.sigma, self.generator, self.f = threshold, float(sigma), generator, 0

    def aggregate_finite(self, updates, weights, dropped):
        x = updates.to(compute_dtype(updates.dtype))
        norms = x.norm(dim=1)
        m = norms.median() if self.threshold is None else torch.tensor(self.threshold, dtype=x.dtype)
        scale = torch.clamp(m / norms.clamp_min(1e-30), max=1.0)
        out = (x * scale.unsqueeze(1)).mean(dim=0)
        if self.sigma > 0:
            gen_device = self.generator.device if self.generator is not None else out.device
            out = out + self.sigma * torch.randn(out.shape, generator=self.generator, dtype=out.dtype,
                                                 device=gen_device).to(out.device)
        return out, {"weights": scale / len(scale), "clip_norm": float(m)}
