"""Aggregation rules: how the server combines client updates.

Every aggregator is an object called on a 2-D tensor of flattened client
updates ``(n, d)`` and returning ``(d,)``. Chapter ``00_introduction`` uses
:class:`Mean` (FedAvg); the robust rules are taught from chapter ``04`` on.
"""

from __future__ import annotations

import torch

__all__ = ["Aggregator", "Mean", "AGGREGATORS", "get_aggregator"]


class Aggregator:
    """Base class: checks the input, then calls :meth:`aggregate`.

    Subclasses implement ``aggregate(updates, weights)``; ``weights`` are the
    clients' sample counts, which only rules that trust clients (the mean) use.
    """

    #: Whether a non-finite row may be passed on (robust rules must tolerate them).
    robust: bool = False

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(updates, torch.Tensor):
            raise TypeError(f"updates must be a torch.Tensor, got {type(updates).__name__}")
        if updates.ndim != 2 or updates.shape[0] == 0 or updates.shape[1] == 0:
            raise ValueError(f"updates must be a non-empty 2-D tensor (n, d), got shape {tuple(updates.shape)}")
        if not torch.is_floating_point(updates):
            raise ValueError(f"updates must be a floating-point tensor, got {updates.dtype}")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=updates.dtype, device=updates.device)
            if weights.shape != (updates.shape[0],):
                raise ValueError(
                    f"weights must have shape ({updates.shape[0]},) to match updates, got {tuple(weights.shape)}"
                )
            if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError("weights must be finite, non-negative and not all zero")
        return self.aggregate(updates, weights)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Mean(Aggregator):
    r"""FedAvg (McMahan et al. 2017): :math:`\sum_i w_i u_i / \sum_i w_i`.

    With ``weights=None`` every client counts the same. One arbitrary client
    moves it arbitrarily far (breakdown point 0), which chapter ``03`` shows.
    It is not robust: a non-finite update raises ``ValueError`` instead of
    silently producing NaN.
    """

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        bad = ~torch.isfinite(updates).all(dim=1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"non-finite update from client row(s) {rows}; Mean is not robust to them")
        if weights is None:
            return updates.mean(dim=0)
        return (weights / weights.sum()) @ updates


#: Names accepted by :func:`get_aggregator` (and ``FLConfig.aggregator``).
AGGREGATORS: dict[str, type[Aggregator]] = {"mean": Mean}


def get_aggregator(spec: str | Aggregator, f: int = 0, **kwargs) -> Aggregator:
    """An aggregator from its name (``"mean"``, ``"median"``, ...) or the object itself.

    ``f`` (the number of Byzantine clients to tolerate) is passed to rules
    that take it.
    """
    if isinstance(spec, Aggregator) or (callable(spec) and not isinstance(spec, str)):
        return spec
    if spec not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {spec!r}; choose one of {sorted(AGGREGATORS)}")
    cls = AGGREGATORS[spec]
    import inspect

    if "f" in inspect.signature(cls).parameters:
        kwargs["f"] = f
    return cls(**kwargs)
