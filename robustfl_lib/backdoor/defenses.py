"""Defenses that bound or re-weight every update: :class:`NormClipNoise` (clipping and noise),
and the published backdoor defenses :class:`FLAME` (clustering, clipping at the median norm,
adaptive noise) and :class:`FoolsGold` (per-client learning rates from the similarity of update
histories). Chapter ``11_exercise_backdoor_detection``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..aggregators import RobustAggregator
from ..robust_stats import compute_dtype, finite_rows, pairwise_sq_distances
from ..runtime import make_generator
from .detectors import majority_cluster_labels

__all__ = ["NormClipNoise", "FLAME", "FoolsGold"]


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


class FLAME(RobustAggregator):
    r"""FLAME (Nguyen, Rieger, Chen, Yalame, Möllering, Fereidooni, Marchal, Miettinen,
    Mirhoseini, Zeitouni, Koushanfar, Sadeghi & Schneider 2022, "FLAME: Taming Backdoors in
    Federated Learning", USENIX Security), as published, in three steps on the ``n`` updates
    :math:`u_i = W_i - G_{t-1}` (local models minus the global one):

    1. **Clustering.** HDBSCAN on the pairwise cosine distances
       :math:`c_{ij} = 1 - \cos(p_i, p_j)` with ``min_cluster_size`` :math:`= \lfloor n/2 \rfloor + 1`
       and ``min_samples = 1`` (a single cluster allowed); the models of the majority cluster
       (there is at most one) are admitted, the others dropped.
    2. **Clipping.** :math:`S_t = \operatorname{median}_i \|u_i\|` over *all* clients, admitted or
       not (the mean of the two middle norms when :math:`n` is even), and every admitted update is
       clipped to it: :math:`u_i \min(1, S_t / \|u_i\|)`.
    3. **Adaptive noise.** The admitted, clipped updates are averaged and Gaussian noise of
       standard deviation :math:`\sigma = \lambda S_t` is added to every coordinate:

    .. math:: \bar u = \frac{1}{|A|}\sum_{i \in A} u_i \min\Big(1, \frac{S_t}{\|u_i\|}\Big)
        + \mathcal N(0, \lambda^2 S_t^2 I),

    so :math:`G_t = G_{t-1} + \bar u` is the paper's noised aggregate of clipped models.
    ``lam`` :math:`= \lambda = 0.001` by default, the value the paper uses for its image
    classification tasks.

    **Models or updates.** The paper clusters the local *models* :math:`p_i = W_i`. Called on
    updates alone, :math:`p_i = u_i`; with the global model's flat weights,
    ``flame(updates, global_model=g)`` clusters :math:`p_i = g + u_i`, the paper's choice, and the FL
    loop (:func:`~robustfl_lib.run_federated`, the Flower strategy) passes them (the clipping and the noise are the same either way, both measured on the updates).
    The two differ: the models share :math:`G_{t-1}`, which dominates their cosines, so their
    distances are small and scaled by :math:`\|G_{t-1}\|`; the updates' cosines compare the
    directions the clients moved in. Distances are computed in float64 from unit vectors
    (:func:`~robustfl_lib.robust_stats.pairwise_sq_distances`, :math:`c_{ij} = \|\hat p_i - \hat p_j\|^2 / 2`).

    If HDBSCAN calls every model noise (no majority cluster), all are admitted: clipping and
    noise still bound each one's effect. Non-finite updates are dropped first (see
    :class:`~robustfl_lib.aggregators.RobustAggregator`) and the median is over the finite ones.
    Requirement: at least 2 updates. Sample counts are ignored (a robust rule).

    **Randomness.** The noise is drawn from ``generator`` (a ``torch.Generator``), by default a CPU
    generator seeded with ``seed``; its state is saved and restored by the FL checkpoints, as for
    every generator an aggregator holds, so a resumed run draws the same noise. ``lam=0`` draws
    nothing. ``last_info``: ``"selected"`` (admitted rows), ``"weights"`` (each row's factor
    :math:`\min(1, S_t/\|u_i\|)/|A|` in the average, 0 if dropped), ``"clip_norm"``
    (:math:`S_t`), ``"noise_std"`` (:math:`\sigma`), ``"clusters"`` (HDBSCAN's labels of the
    finite rows, -1 = noise). Config name ``"flame"``. Chapter ``11_exercise_backdoor_detection``
    (whose :class:`~robustfl_lib.backdoor.Clustering` is FLAME's first step alone).
    """

    def __init__(self, lam: float = 0.001, seed: int = 0, generator: torch.Generator | None = None):
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam (the noise level lambda) must be a finite number >= 0, got {lam!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.lam, self.seed, self.f = float(lam), seed, 0
        self.generator = generator if generator is not None else make_generator(seed)
        self._global: torch.Tensor | None = None

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor | None = None,
                 global_model: torch.Tensor | None = None) -> torch.Tensor:
        if global_model is not None:
            if not isinstance(global_model, torch.Tensor) or not torch.is_floating_point(global_model):
                raise ValueError("global_model must be a floating-point tensor (the flat global weights)")
            if updates.ndim == 2 and global_model.shape != (updates.shape[1],):
                raise ValueError(f"global_model must have shape ({updates.shape[1]},), got {tuple(global_model.shape)}")
            if not bool(torch.isfinite(global_model).all()):
                raise ValueError("global_model has non-finite entries")
        self._global = global_model
        try:
            return super().__call__(updates, weights)
        finally:
            self._global = None

    def requirement(self, n: int, f: int) -> None:
        if n < 2:
            raise ValueError(f"FLAME clusters the updates and needs at least 2 of them, got n={n}")

    def aggregate_finite(self, updates, weights, dropped):
        x = updates.to(compute_dtype(updates.dtype))
        n, d = x.shape
        points = x.double()
        if self._global is not None:
            points = points + self._global.to(device=x.device, dtype=torch.float64)
        unit = points / points.norm(dim=1, keepdim=True).clamp_min(1e-300)
        dist = (0.5 * pairwise_sq_distances(unit)).clamp(0.0, 2.0).cpu().numpy()
        dist = 0.5 * (dist + dist.T)
        np.fill_diagonal(dist, 0.0)
        labels = majority_cluster_labels(dist)
        clustered = labels >= 0
        if clustered.any():
            admitted = labels == np.bincount(labels[clustered]).argmax()
        else:
            admitted = np.ones(n, dtype=bool)
        kept = torch.from_numpy(admitted.nonzero()[0]).to(x.device)
        norms = x.norm(dim=1)
        s = norms.sort().values
        clip = 0.5 * (s[(n - 1) // 2] + s[n // 2])
        scale = torch.clamp(clip / norms.clamp_min(1e-30), max=1.0)
        w = torch.zeros(n, dtype=x.dtype, device=x.device)
        w[kept] = scale[kept] / len(kept)
        out = (x[kept] * scale[kept, None]).sum(dim=0) / len(kept)
        sigma = self.lam * float(clip)
        if self.lam > 0:
            noise = torch.randn(d, generator=self.generator, dtype=x.dtype, device=self.generator.device)
            out = out + sigma * noise.to(x.device)
        return out, {"selected": kept, "weights": w, "clip_norm": float(clip), "noise_std": sigma,
                     "clusters": labels.tolist()}


class FoolsGold(RobustAggregator):
    r"""FoolsGold (Fung, Yoon & Beschastnikh 2020, "The Limitations of Federated Learning in Sybil
    Settings", RAID), as published: per-client learning rates from the cosine similarity of the
    clients' update *histories*.

    Each round, for the participating clients :math:`i = 1..n` with updates :math:`u_i`:

    1. **History.** :math:`H_i \leftarrow H_i + u_i`, the sum of all updates client :math:`i`
       has sent so far (by client id, across rounds).
    2. **Similarity.** :math:`cs_{ij} = \cos(H_i, H_j)` for :math:`i \ne j`, and
       :math:`cs_{ii} = 0` (the authors' reference code subtracts the identity from the cosine
       matrix, so :math:`v_i \ge 0`); :math:`v_i = \max_j cs_{ij}`.
    3. **Pardoning.** :math:`cs_{ij} \leftarrow cs_{ij}\, v_i / v_j` when :math:`v_j > v_i`: an
       honest client that merely resembles a sybil is not punished for the sybil's similarity.
    4. **Weights.** :math:`\alpha_i = 1 - \max_j cs_{ij}`, clipped to :math:`[0, 1]`, divided by
       :math:`\max_i \alpha_i`, then :math:`\alpha_i = 1` lowered to :math:`0.99` (as the authors
       do, so that the logit is finite) and the logit applied,
       :math:`\alpha_i \leftarrow \kappa\big(\ln\frac{\alpha_i}{1 - \alpha_i} + 0.5\big)`,
       clipped to :math:`[0, 1]`; ``kappa`` :math:`= \kappa = 1` by default, the paper's
       confidence parameter.
    5. **Update.** :math:`\bar u = \frac1n \sum_i \alpha_i u_i`: every client's update scaled by
       its own learning rate (the authors' aggregation), so honest, diverse clients
       (:math:`\alpha_i \approx 1`) give about the mean, and sybils with identical histories
       (:math:`cs_{ij} = 1`, :math:`\alpha_i = 0`) nothing. If every :math:`\alpha_i` is 0 (each
       history is parallel to another's) the update is zero.

    We use the whole update; the paper can also restrict the similarity to the output layer's
    important features (not implemented).

    **Client ids.** The history needs to know which client sent which row: call
    ``foolsgold(updates, client_ids=ids)``. The FL loop (:func:`~robustfl_lib.run_federated`, and
    the Flower strategy) passes the participants' ids; called without them, row :math:`i` is taken to be client
    :math:`i` every round, which is right for full participation without dropout (every client,
    every round, in client order: the default ``FLConfig``) and wrong otherwise, so a call without
    ids whose number of rows differs from the previous one's raises ``ValueError``. Only the
    participants' histories are compared in a round. Non-finite rows are dropped (their clients'
    histories unchanged) before anything else.

    Stateful: ``reset()`` forgets the histories (at the start of every FL run), ``get_state()`` /
    ``set_state()`` carry them through checkpoints. Memory: one history row of :math:`d` numbers
    per client ever seen, in the updates' compute dtype. ``last_info``: ``"weights"``
    (:math:`\alpha_i / n`, each row's factor in the output), ``"selected"`` (rows with
    :math:`\alpha_i > 0`). Config name ``"foolsgold"``. Chapter ``11_exercise_backdoor_detection``
    (whose :class:`~robustfl_lib.backdoor.CosineSimilarity` is the simplified, one-round filter).
    """

    def __init__(self, kappa: float = 1.0):
        if not (isinstance(kappa, (int, float)) and math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa (the logit's confidence) must be a finite number > 0, got {kappa!r}")
        self.kappa, self.f = float(kappa), 0
        self._call_ids: list[int] | None = None
        self._row_ids: list[int] | None = None
        self.reset()

    # -- state
    def reset(self) -> None:
        self._ids: list[int] = []
        self._history: torch.Tensor | None = None
        self._fallback_rows: int | None = None

    def get_state(self) -> dict[str, Any]:
        history = self._history if self._history is not None else torch.empty(0, 0)
        return {"ids": torch.tensor(self._ids, dtype=torch.int64), "history": history,
                "fallback_rows": -1 if self._fallback_rows is None else self._fallback_rows}

    def set_state(self, state: dict[str, Any]) -> None:
        ids = [int(c) for c in state["ids"].tolist()]
        history = state["history"]
        if history.shape[0] != len(ids):
            raise ValueError(f"FoolsGold state holds {len(ids)} ids but {history.shape[0]} histories")
        self._ids = ids
        self._history = history.clone() if len(ids) else None
        rows = int(state["fallback_rows"])
        self._fallback_rows = None if rows < 0 else rows

    @property
    def histories(self) -> dict[int, torch.Tensor]:
        """Each client's history :math:`H_i` (a view), by client id."""
        if self._history is None:
            return {}
        return {c: self._history[k] for k, c in enumerate(self._ids)}

    # -- one round
    def __call__(self, updates: torch.Tensor, weights: torch.Tensor | None = None,
                 client_ids: Sequence[int] | torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        ids = None
        if client_ids is not None:
            ids = [int(c) for c in np.asarray(torch.as_tensor(client_ids).cpu()).reshape(-1).tolist()]
            if isinstance(updates, torch.Tensor) and updates.ndim >= 1 and len(ids) != updates.shape[0]:
                raise ValueError(f"client_ids must give one id per row: {updates.shape[0]} rows, {len(ids)} ids")
            if len(set(ids)) != len(ids):
                raise ValueError("client_ids must be distinct (one row per client)")
        self._call_ids = ids
        try:
            return super().__call__(updates, weights)
        finally:
            self._call_ids = None

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        n = updates.shape[0]
        ids = self._call_ids
        if ids is None:
            if self._fallback_rows is not None and n != self._fallback_rows:
                raise ValueError(
                    f"FoolsGold was called without client_ids on {self._fallback_rows} rows before and on {n} now: "
                    "without ids, row i must be client i every round (full participation); pass client_ids")
            ids = list(range(n))
        finite = finite_rows(updates).tolist()
        self._row_ids = [c for c, ok in zip(ids, finite) if ok]
        try:
            out = super().aggregate(updates, weights)
        finally:
            self._row_ids = None
        if self._call_ids is None:
            self._fallback_rows = n
        return out

    def learning_rates(self, histories: torch.Tensor) -> torch.Tensor:
        """Steps 2-4 on ``(n, d)`` histories: the ``(n,)`` float64 learning rates :math:`\alpha`."""
        h = histories.to(compute_dtype(histories.dtype))
        unit = h / h.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cs = (unit @ unit.T).double()
        cs.fill_diagonal_(0.0)
        v = cs.max(dim=1).values
        pardon = v[:, None] < v[None, :]
        cs = torch.where(pardon, cs * v[:, None] / v[None, :].clamp_min(1e-300), cs)
        alpha = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
        top = alpha.max()
        if not bool(top > 0):
            return torch.zeros_like(alpha)
        alpha = alpha / top
        alpha = torch.where(alpha == 1.0, torch.full_like(alpha, 0.99), alpha)
        return (self.kappa * (torch.log(alpha / (1.0 - alpha)) + 0.5)).clamp(0.0, 1.0)

    def aggregate_finite(self, updates, weights, dropped):
        x = updates.to(compute_dtype(updates.dtype))
        n, d = x.shape
        ids = self._row_ids if self._row_ids is not None and len(self._row_ids) == n else list(range(n))
        if self._history is None:
            self._history = torch.zeros(0, d, dtype=x.dtype, device=x.device)
        elif self._history.shape[1] != d:
            raise ValueError(f"updates have {d} coordinates but the histories {self._history.shape[1]}")
        index = {c: k for k, c in enumerate(self._ids)}
        new = [c for c in ids if c not in index]
        if new:
            index.update({c: len(self._ids) + k for k, c in enumerate(new)})
            self._ids = self._ids + new
            self._history = torch.cat([self._history, self._history.new_zeros(len(new), d)])
        rows = torch.tensor([index[c] for c in ids], dtype=torch.long, device=self._history.device)
        self._history.index_add_(0, rows, x.to(self._history))
        alpha = self.learning_rates(self._history[rows]).to(x.device)
        out = (x * alpha.to(x.dtype)[:, None]).sum(dim=0) / n
        return out, {"weights": alpha / n, "selected": (alpha > 0).nonzero().flatten()}
