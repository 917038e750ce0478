"""Attacks with a fixed formula in the honest mean, or none: sign flip, scaling, Gaussian noise,
non-finite updates, and model replacement (which lands the server's weighted mean on a target).
Chapter ``03_byzantine_threats``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..robust_stats import compute_dtype
from .base import ByzantineAttack, _mean, _repeat

__all__ = ["SignFlip", "Scaling", "GaussianNoise", "NonFinite", "ModelReplacement"]


class SignFlip(ByzantineAttack):
    r"""Every Byzantine client sends :math:`-\lambda\,\bar u`, the (unweighted) mean of
    the honest updates reversed: ByzFL's ``SignFlipping``, which credits Allen-Zhu et
    al. ("Byzantine-resilient non-convex stochastic gradient descent", ICLR 2021).
    ``scale`` = :math:`\lambda` (default 1). Against the plain mean, ``f`` such clients
    shrink the step by :math:`(1+\lambda) f/n`.

    It is *not* the "bit flipping" of Karimireddy, He & Jaggi 2021, where each
    Byzantine worker sends its own honest gradient negated, :math:`-u_j`: in this
    engine Byzantine clients do not train, so they have no update of their own
    to negate; all of them send the same omniscient :math:`-\bar u`, which on
    IID data is close to the average of what bit flippers would send, with none
    of their spread. Chapter ``03_byzantine_threats``."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def forge(self, honest, num_byzantine, generator):
        return _repeat(-self.scale * _mean(honest), num_byzantine)


class Scaling(ByzantineAttack):
    r"""Every Byzantine client sends :math:`\lambda\,\bar u`, the (unweighted) honest mean scaled by a
    large factor (default 10; "boosting", Bhagoji et al. 2019): a plausible
    direction with an implausible length, which makes the mean overshoot.
    Chapter ``03_byzantine_threats``."""

    def __init__(self, factor: float = 10.0):
        self.factor = factor

    def forge(self, honest, num_byzantine, generator):
        return _repeat(self.factor * _mean(honest), num_byzantine)


class GaussianNoise(ByzantineAttack):
    r"""Every Byzantine client sends :math:`\mathcal N(0, \sigma^2 I)` noise (``std`` =
    :math:`\sigma`, default 1), independent across clients; the random-update
    attack of Blanchard et al. 2017. Chapter ``03_byzantine_threats``."""

    def __init__(self, std: float = 1.0):
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.std = std

    def forge(self, honest, num_byzantine, generator):
        gen_device = generator.device if generator is not None else honest.device
        noise = torch.randn(
            num_byzantine, honest.shape[1], generator=generator, device=gen_device, dtype=compute_dtype(honest.dtype)
        )
        return self.std * noise


class ModelReplacement(ByzantineAttack):
    r"""Model replacement (Bagdasaryan et al. 2020): the attacker makes what the
    server averages, the weighted mean of all ``n = n_h + b`` updates, equal its
    target :math:`t`. With weights :math:`w_i` of the honest rows and
    :math:`w_j` of the Byzantine ones (``weights``, ``byzantine_weights``: the
    sample counts by which FedAvg weights; equal when not given), every
    Byzantine client sends

    .. math:: u_{\mathrm{byz}} = \frac{W\,t - \sum_{i \le n_h} w_i u_i}{W_{\mathrm{byz}}},
       \qquad W_{\mathrm{byz}} = \sum_j w_j,\quad W = \sum_i w_i + W_{\mathrm{byz}},

    so that :math:`(\sum_i w_i u_i + W_{\mathrm{byz}} u_{\mathrm{byz}}) / W = t`;
    with equal weights, :math:`u_{\mathrm{byz}} = (n\,t - \sum_i u_i)/b`.
    Bagdasaryan et al. scale :math:`t` by :math:`\gamma = n/\eta` (the server's
    weighting and learning rate) and assume the honest updates cancel; the
    omniscient attacker here subtracts them exactly, so the server's mean *is*
    :math:`t`. ``target``: a ``(d,)`` tensor or a function of the honest updates;
    ``None`` (default) reverses and amplifies the honest mean, :math:`t =
    -\lambda \bar u_w` with :math:`\bar u_w` the weighted honest mean and
    ``target_scale`` = :math:`\lambda` (default 5), which undoes training.
    Byzantine weights summing to zero raise ``ValueError`` (they cannot move the
    mean). Chapter ``03_byzantine_threats``.
    """

    uses_weights = True

    def __init__(
        self,
        target: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
        target_scale: float = 5.0,
    ):
        self.target = target
        self.target_scale = target_scale

    def forge(self, honest, num_byzantine, generator, weights=None, byzantine_weights=None):
        ct = compute_dtype(honest.dtype)
        h = honest.to(ct)
        if weights is None:  # kept apart so that equal weights give the same numbers as before
            honest_sum, honest_mean = h.sum(dim=0), h.mean(dim=0)
            total, byz_total = h.shape[0] + num_byzantine, num_byzantine
        else:
            byz_total = byzantine_weights.sum()
            if byz_total <= 0:
                raise ValueError("byzantine_weights sum to 0: clients the server ignores cannot replace the model")
            honest_sum = weights @ h
            honest_mean, total = honest_sum / weights.sum(), weights.sum() + byz_total
        if self.target is None:
            target = -self.target_scale * honest_mean
        elif callable(self.target):
            target = self.target(honest)
        else:
            target = self.target
        target = torch.as_tensor(target, device=honest.device).to(ct)
        if target.shape != (honest.shape[1],):
            raise ValueError(f"target must have shape ({honest.shape[1]},), got {tuple(target.shape)}")
        return _repeat((total * target - honest_sum) / byz_total, num_byzantine)


class NonFinite(ByzantineAttack):
    """Every Byzantine client sends an update full of ``value`` (``"nan"``,
    ``"inf"`` or ``"-inf"``): a crashed or malicious client. The mean becomes
    non-finite; robust rules must drop it. Chapter ``03_byzantine_threats``."""

    def __init__(self, value: str = "nan"):
        if value not in ("nan", "inf", "-inf"):
            raise ValueError(f"value must be 'nan', 'inf' or '-inf', got {value!r}")
        self.value = value

    def forge(self, honest, num_byzantine, generator):
        return torch.full((num_byzantine, honest.shape[1]), float(self.value), dtype=honest.dtype, device=honest.device)
