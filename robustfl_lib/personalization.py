r"""Personalization after federated training: each client fine-tunes the global model on its own data.

A federated model is one compromise for all clients; on non-IID data each client
would rather have a model for *its* label mix. The simplest personalization
(Yu, Bagdasaryan & Shmatikov 2020; the "local fine-tuning" baseline of Li et al.
2021) starts every client from the global weights :math:`w` and runs a few
epochs of local training:

.. math:: w_i = w - \eta \sum_{t} \nabla L_i(w^{(t)}),

standard (cross-entropy) or adversarial (PGD inside every minibatch, the same
recipe as the FL clients' local adversarial training). Fine-tuning uses only the
client's own data, so a Byzantine client cannot touch another client's
personal model.

* :func:`fine_tune_clients`: every client's fine-tuned weights, ``(K, d)``, trained
  in one batched computation (:func:`robustfl_lib.vectorized.train_stacked`);
* :func:`evaluate_clients`: per-client clean and robust accuracy of per-client
  weights (or of one model for all), on per-client test sets
  (:func:`robustfl_lib.data.partition_like`), also batched;
* :func:`personalize`: both, before and after, for the honest clients of an FL run.

Taught in chapter ``13_exercise_robust_personalization``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .data import Dataset, partition, partition_like
from .federated import FLConfig, FLResult, _adversarial_sample_loss
from .params import flatten_state
from .runtime import make_generator
from .vectorized import StackedModel, train_stacked

__all__ = ["fine_tune_clients", "evaluate_clients", "personalize"]


def _stacked(model: nn.Module, weights: torch.Tensor) -> StackedModel:
    """``K`` copies of ``model`` with the flat weights ``weights`` ``(K, d)``."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    d = sum(s.numel() for s in shapes.values())
    if weights.ndim != 2 or weights.shape[1] != d or len(flatten_state(model.state_dict())) != d:
        raise ValueError(f"weights must have shape (K, {d}) for this model (and the model no buffers), "
                         f"got {tuple(weights.shape)}")
    chunks = weights.detach().split([s.numel() for s in shapes.values()], dim=1)
    return StackedModel(model, {n: c.reshape(len(weights), *shapes[n]) for n, c in zip(shapes, chunks)})


def fine_tune_clients(
    model: nn.Module,
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    config: FLConfig,
    local_training: str = "standard",
    epochs: int = 5,
    lr: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Fine-tune a copy of ``model`` on each client's ``(xs[k], ys[k])``; return the ``(K, d)`` weights.

    ``local_training`` is ``"standard"`` (SGD on cross-entropy) or
    ``"adversarial"`` (PGD inside every minibatch, with ``config``'s ``adv_*``
    settings: the FL clients' recipe). ``lr`` defaults to ``config.lr``; the
    batch size is ``config.batch_size``. Client ``k`` shuffles with a generator
    seeded from ``seed`` and ``k``, so the same call gives the same weights.
    ``model`` is not changed. Local fine-tuning as in Yu, Bagdasaryan & Shmatikov
    (2020); chapter ``13_exercise_robust_personalization``.
    """
    if local_training not in ("standard", "adversarial"):
        raise ValueError(f"local_training must be 'standard' or 'adversarial', got {local_training!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    cfg = dataclasses.replace(config, local_training=local_training, local_epochs=epochs,
                              lr=config.lr if lr is None else lr)
    cfg.validate()
    sample_loss = None
    if local_training == "adversarial":
        sample_loss = _adversarial_sample_loss(cfg, make_generator(seed * 7_907 + 1))
    gens = [make_generator(seed * 10_007 + k) for k in range(len(xs))]
    return train_stacked(model, list(xs), list(ys), epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                         generators=gens, sample_loss=sample_loss)


def evaluate_clients(
    model: nn.Module,
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    weights: torch.Tensor | None = None,
    attack=None,
) -> dict[str, np.ndarray | None]:
    """Per-client ``"clean_accuracy"`` and ``"robust_accuracy"`` (arrays of length ``K``).

    Client ``k`` is evaluated on ``(xs[k], ys[k])`` with the weights ``weights[k]``
    (``(K, d)``, e.g. from :func:`fine_tune_clients`), or with ``model`` itself
    when ``weights`` is ``None``. With ``attack`` (e.g. ``PGD``), an example counts
    as robust when both it and ``attack``'s adversarial version are classified
    correctly (as :func:`robustfl_lib.training.evaluate`); else robust accuracy is
    ``None``. All clients are evaluated in one batched computation: the test sets
    are padded to a common length (padding is masked out), and the attack runs
    on the stacked models, whose examples do not interact. Chapter
    ``13_exercise_robust_personalization``.
    """
    if len(xs) != len(ys) or not xs or any(len(x) != len(y) or len(x) == 0 for x, y in zip(xs, ys)):
        raise ValueError("need one non-empty label tensor per non-empty input tensor")
    K = len(xs)
    if weights is None:
        weights = flatten_state(model.state_dict()).expand(K, -1)
    if len(weights) != K:
        raise ValueError(f"{len(weights)} weight vectors for {K} clients")
    device = weights.device
    stacked = _stacked(model, weights.to(next(model.parameters()).dtype))
    sizes = torch.tensor([len(x) for x in xs])
    m = int(sizes.max())
    # Pad each client's test set to m examples by repeating it; the mask keeps only the real ones.
    pos = torch.arange(m)
    index = (torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])[:, None] + pos % sizes[:, None])
    mask = (pos[None, :] < sizes[:, None]).to(device)
    x_all, y_all = torch.cat(list(xs)), torch.cat(list(ys))
    x, y = x_all[index.reshape(-1)].to(device), y_all[index.reshape(-1)].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ok = (stacked(x).argmax(dim=1) == y).reshape(K, m)
        out: dict[str, np.ndarray | None] = {"clean_accuracy": _masked_mean(ok, mask), "robust_accuracy": None}
        if attack is not None:
            x_adv = attack(stacked, x, y)
            with torch.no_grad():
                ok &= (stacked(x_adv).argmax(dim=1) == y).reshape(K, m)
            out["robust_accuracy"] = _masked_mean(ok, mask)
    finally:
        model.train(was_training)
    return out


def _masked_mean(ok: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    return ((ok & mask).sum(dim=1).double() / mask.sum(dim=1)).cpu().numpy()


def personalize(
    result: FLResult,
    data: Dataset,
    clients: Sequence[int] | None = None,
    local_training: str = "standard",
    epochs: int = 5,
    lr: float | None = None,
    attack=None,
    seed: int = 0,
) -> dict[str, np.ndarray | None]:
    """Fine-tune an FL run's global model on each of ``clients`` (default: the honest
    ones) and measure it before and after, on each client's own test data.

    The clients' training data are the run's partition of ``data``
    (``result.config``'s scheme and seed); their test data are
    :func:`partition_like` of the test split (same label mix as their training
    data). Returns ``"clients"`` and, per client, ``"clean_before"``,
    ``"clean_after"``, ``"robust_before"``, ``"robust_after"`` (the robust ones
    ``None`` without ``attack``) and ``"weights"`` (the fine-tuned ``(K, d)``).
    Chapter ``13_exercise_robust_personalization``.
    """
    config = result.config
    parts = partition(data.y_train, config.num_clients, config.partition, alpha=config.alpha, seed=config.seed)
    test_parts = partition_like(data.y_test, data.y_train, parts, seed=config.seed)
    if clients is None:
        clients = [c for c in range(config.num_clients) if c not in set(result.byzantine)]
    clients = [int(c) for c in clients]
    if not clients or not all(0 <= c < config.num_clients for c in clients):
        raise ValueError(f"clients must be a non-empty list of ids in [0, {config.num_clients}), got {clients}")
    device = next(result.model.parameters()).device
    xs = [data.x_train[parts[c]].to(device) for c in clients]
    ys = [data.y_train[parts[c]].to(device) for c in clients]
    xt = [data.x_test[test_parts[c]].to(device) for c in clients]
    yt = [data.y_test[test_parts[c]].to(device) for c in clients]
    before = evaluate_clients(result.model, xt, yt, attack=attack)
    weights = fine_tune_clients(result.model, xs, ys, config, local_training, epochs, lr, seed)
    after = evaluate_clients(result.model, xt, yt, weights=weights, attack=attack)
    return {"clients": np.array(clients), "clean_before": before["clean_accuracy"],
            "clean_after": after["clean_accuracy"], "robust_before": before["robust_accuracy"],
            "robust_after": after["robust_accuracy"], "weights": weights}
