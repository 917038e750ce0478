"""Aggregation rules: the base classes, pipelines of pre-aggregation steps, and the registry of names.

Every aggregator is an object called on a 2-D tensor of flattened client
updates ``(n, d)`` (any device, any floating dtype) and returning ``(d,)`` in
the same dtype. Chapter ``00_introduction`` uses :class:`Mean` (FedAvg); the
robust rules are taught in chapters ``04_median`` to ``08_stronger_aggregators``.

Conventions shared by every robust rule (:class:`RobustAggregator`):

* **Requirements** on ``n`` and ``f`` (the number of Byzantine clients to
  tolerate) raise ``ValueError`` stating them, e.g. ``n > 2f + 2`` for Krum.
* **Non-finite updates.** An honest client never sends NaN or Inf (its training
  would have stopped), so a row with any non-finite entry is certainly
  Byzantine. Robust rules drop such rows before aggregating and lower ``f`` by
  one per dropped row (at least 0): the remaining rows contain at most
  ``f - k`` Byzantine ones, so every guarantee still holds, and the output is
  finite. ``last_info["dropped"]`` lists them. :class:`Mean` is not robust and
  refuses them with ``ValueError`` rather than returning NaN.
* **Sample counts.** ``weights`` (the clients' sample counts) are used by
  :class:`Mean` only: robust rules count every client once, since a Byzantine
  client could claim any number of samples.
* **What was kept.** After each call ``aggregator.last_info`` describes what the
  rule kept, in the input's row numbering: ``"selected"`` (row indices that a
  selection rule such as Krum kept), ``"kept_fraction"`` (per row, the fraction
  of coordinates in which its value entered a coordinate-wise rule; estimated on
  16,384 coordinates spread over the vector when it is longer),
  ``"weights"`` (per row, its weight in an output that is a weighted average of
  the rows), ``"scores"``, ``"iterations"``, ``"dropped"``. The FL loop records
  them per round (:func:`robustfl_lib.federated.run_federated`).
"""


from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..params import flatten_state, unflatten_state
from ..robust_stats import check_updates, finite_rows
from .preaggregation import PRE_AGGREGATORS, PreAggregator, check_f

__all__ = [
    "Aggregator",
    "RobustAggregator",
    "NonFiniteBeyondTolerance",
    "Pipeline",
    "AGGREGATORS",
    "AGGREGATOR_ALIASES",
    "get_aggregator",
    "aggregate_states",
]

# last_info entries holding one value per input row (re-indexed when rows are dropped).
_PER_ROW = ("kept_fraction", "weights", "scores")


class Aggregator:
    """Base class: checks the input, then calls :meth:`aggregate`.

    Subclasses implement ``aggregate(updates, weights)``; ``weights`` are the
    clients' sample counts, which only rules that trust clients (the mean) use.
    ``last_info`` (a dict) describes what the last call kept (see the module
    docstring); :meth:`reset` forgets state kept between calls, if any.
    """

    #: Whether non-finite rows are dropped (robust rules) or refused (the mean).
    robust: bool = False
    #: The number of Byzantine clients the rule tolerates (0 for rules without ``f``).
    f: int = 0

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        check_updates(updates)
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=updates.dtype, device=updates.device)
            if weights.shape != (updates.shape[0],):
                raise ValueError(
                    f"weights must have shape ({updates.shape[0]},) to match updates, got {tuple(weights.shape)}"
                )
            if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError("weights must be finite, non-negative and not all zero")
        self.last_info: dict[str, Any] = {}
        return self.aggregate(updates, weights)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def requirement(self, n: int, f: int) -> None:
        """Raise ``ValueError`` stating the rule's requirement on ``n`` and ``f`` if unmet."""

    def aggregate_finite(
        self, updates: torch.Tensor, weights: torch.Tensor | None, dropped: int
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(result, info)`` on finite rows, ``dropped`` non-finite rows having been removed."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget any state kept between calls (called at the start of every FL run)."""

    def get_state(self) -> dict[str, Any]:
        """State kept between calls, as tensors and plain values (saved in FL checkpoints)."""
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned (when an FL run resumes)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith(("_", "last_")))
        return f"{type(self).__name__}({args})"


class NonFiniteBeyondTolerance(RuntimeWarning):
    """More updates were non-finite than the rule tolerates Byzantine clients (see
    :meth:`RobustAggregator.tolerated`): dropping them all leaves a result without a guarantee."""


class RobustAggregator(Aggregator):
    """Base class of the robust rules: checks ``n`` against ``f``, drops non-finite
    rows (lowering ``f`` by one per dropped row), calls :meth:`aggregate_finite`
    and records ``last_info`` in the input's row numbering.

    Dropping rests on a premise: every non-finite row is Byzantine, so ``k`` of them
    leave at most ``f - k`` Byzantine rows among the rest. When ``k`` exceeds what the
    rule tolerates (:meth:`tolerated`: ``f`` for rules that take it; fewer than half the
    rows for the median, the geometric median and centered clipping), the premise is
    broken: the rule still returns its value on the finite rows, computed with
    ``f = 0``, but it warns (:class:`NonFiniteBeyondTolerance`) and records
    ``last_info["nonfinite_beyond_tolerance"] = k - tolerated`` (0 when the premise holds).
    """

    robust = True

    def tolerated(self, n: int) -> int:
        """How many of ``n`` rows may be Byzantine (non-finite rows included) with the
        rule's guarantee intact: ``f`` for rules that take ``f``, else ``ceil(n/2) - 1``."""
        if "f" in inspect.signature(type(self)).parameters:
            return self.f
        return (n + 1) // 2 - 1

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        n = updates.shape[0]
        self.requirement(n, self.f)
        finite = finite_rows(updates)
        if bool(finite.all()):
            out, info = self.aggregate_finite(updates, weights, 0)
            info["dropped"] = []
            info["nonfinite_beyond_tolerance"] = 0
            self.last_info = info
            return out.to(updates.dtype)
        rows = finite.nonzero().flatten()
        dropped = n - len(rows)
        if len(rows) == 0:
            raise ValueError(f"all {n} updates are non-finite; there is nothing to aggregate")
        try:
            self.requirement(len(rows), max(self.f - dropped, 0))
        except ValueError as err:
            raise ValueError(f"after dropping {dropped} non-finite update(s), {len(rows)} remain: {err}") from None
        beyond = dropped - self.tolerated(n)
        if beyond > 0:
            warnings.warn(
                f"{self!r}: {dropped} of {n} updates are non-finite, more than the {self.tolerated(n)} Byzantine "
                f"client(s) the rule tolerates; the premise that every non-finite update is Byzantine and the "
                f"rest are mostly honest no longer holds, so the result carries no guarantee (it is the rule "
                f"applied to the {len(rows)} finite updates with f = 0)",
                NonFiniteBeyondTolerance,
                stacklevel=3,
            )
        out, info = self.aggregate_finite(updates[rows], None if weights is None else weights[rows], dropped)
        info["nonfinite_beyond_tolerance"] = max(beyond, 0)
        for key, value in info.items():
            if key == "selected":
                info[key] = rows[value]
            elif key in _PER_ROW:
                fill = torch.inf if key == "scores" else 0.0
                full = torch.full((n,), fill, dtype=value.dtype, device=value.device)
                info[key] = full.index_copy_(0, rows, value)
        info["dropped"] = (~finite).nonzero().flatten().tolist()
        self.last_info = info
        return out.to(updates.dtype)


def _to_clients(info: dict[str, Any], mix: torch.Tensor) -> dict[str, Any]:
    """A rule's ``last_info`` on regrouped rows ``y = M x`` in terms of the clients (see :class:`Pipeline`)."""
    home = mix.argmax(dim=0)  # per client, the row it weighs most in
    for key, value in info.items():
        if key == "weights":
            info[key] = mix.T @ value.to(mix.dtype)
        elif key == "selected":
            info[key] = (mix[value.reshape(-1)] != 0).any(dim=0).nonzero().flatten()
        elif key in _PER_ROW:
            info[key] = value[home]
    return info


class Pipeline(RobustAggregator):
    r"""Pre-aggregation steps followed by an aggregator: ``Pipeline(NNM(f), Krum(f))``.

    Non-finite rows are dropped once, before the first step (each step's ``f``
    then shrinks by their number); NNM, Clipping and ARC map ``(n, d)`` to
    ``(n, d)`` with rows still in client order, so ``last_info`` (the final
    aggregator's, plus ``"pre"``: one dict per step, its name and what it reports)
    refers to clients. ``get_aggregator("nnm+krum", f=2)`` builds the same.

    A step that regroups rows (:class:`~robustfl_lib.aggregators.Bucketing`: ``m`` bucket
    means) gives the rows that follow as :math:`y = M x`, ``M`` being ``(m, n)``; each later
    step and the rule get the same ``f`` (see Bucketing for why) and their requirement is
    checked on ``m`` rows. The rule's ``last_info`` is then mapped back to clients:
    ``"weights"`` :math:`w` becomes :math:`M^\top w` (each client's weight in an output that is
    a weighted average), ``"selected"`` the clients of the selected rows, and
    ``"scores"``/``"kept_fraction"`` give each client the value of the row it weighs most in.
    Sample counts (``weights``) do not reach the rule after regrouping. Chapter
    ``08_stronger_aggregators``; bucketing and ARC: ``15_heterogeneity_and_its_fixes``.
    """

    def __init__(self, *steps: PreAggregator | Aggregator):
        if not steps or not isinstance(steps[-1], Aggregator):
            raise ValueError("Pipeline needs pre-aggregators followed by one Aggregator as its last step")
        for s in steps[:-1]:
            if not isinstance(s, PreAggregator):
                raise ValueError(f"every step but the last must be a PreAggregator (NNM, Clipping, ARC, Bucketing), got {s!r}")
        self.steps = steps

    @property
    def f(self) -> int:  # type: ignore[override]
        return max(s.f for s in self.steps)

    def requirement(self, n: int, f: int) -> None:
        regrouped = None
        for s in self.steps:
            try:
                s.requirement(n, max(s.f - (self.f - f), 0))
            except ValueError as err:
                if regrouped is None:
                    raise
                raise ValueError(f"after {regrouped}, {n} bucket means remain: {err}") from None
            if isinstance(s, PreAggregator) and s.regroups:
                n, regrouped = s.rows_out(n), type(s).__name__

    def _rows_out(self, n: int) -> int:
        for s in self.steps[:-1]:
            n = s.rows_out(n)
        return n

    def tolerated(self, n: int) -> int:
        """The least that any step tolerates: ``f`` of each pre-aggregator that takes ``f``,
        and the final rule's own tolerance (0 for a rule that is not robust) on the rows it gets."""
        last = self.steps[-1]
        bounds = [s.f for s in self.steps[:-1] if "f" in inspect.signature(type(s)).parameters]
        bounds.append(last.tolerated(self._rows_out(n)) if isinstance(last, RobustAggregator) else 0)
        return min(bounds)

    def reset(self) -> None:
        self.steps[-1].reset()

    def get_state(self) -> dict[str, Any]:
        return self.steps[-1].get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.steps[-1].set_state(state)

    def aggregate_finite(self, updates, weights, dropped):
        x = updates
        pre_info = []
        mix = None  # (rows of x, clients) once a step has regrouped the rows
        for step in self.steps[:-1]:
            step.last_info = {}
            if step.regroups:
                x, m = step.transform_with_mixing(x, dropped)
                mix = m if mix is None else m @ mix
                weights = None
            else:
                x = step.transform(x, dropped)
            pre_info.append({"name": type(step).__name__, **step.last_info})
        out, info = self.steps[-1].aggregate_finite(x, weights, dropped)
        if mix is not None:
            info = _to_clients(info, mix)
        info["pre"] = pre_info
        return out, info

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(map(repr, self.steps))})"


#: Names accepted by :func:`get_aggregator` (and ``FLConfig.aggregator``).
AGGREGATORS: dict[str, type[Aggregator]] = {}  # filled by the package, family by family (``__init__.py``)
#: Short names :func:`get_aggregator` also accepts (not listed in ``AGGREGATORS``, which holds each rule once).
AGGREGATOR_ALIASES: dict[str, str] = {"cc": "centered_clipping"}


def _build(cls: type, f: int, kwargs: dict[str, Any]):
    if "f" in inspect.signature(cls).parameters:
        kwargs = {**kwargs, "f": f}
    return cls(**kwargs)


def get_aggregator(spec: str | Aggregator, f: int = 0, **kwargs) -> Aggregator:
    """An aggregator from its name or the object itself (returned unchanged).

    Names: ``"mean"``, ``"median"``, ``"trimmed_mean"``, ``"krum"``,
    ``"multi_krum"``, ``"geometric_median"``, ``"centered_clipping"`` (or ``"cc"``),
    ``"bulyan"``, ``"meamed"``, ``"mda"``, ``"monna"``, ``"caf"``, ``"smea"``, ``"dnc"``, ``"signguard"``; pre-aggregators
    (``"nnm"``, ``"clipping"``, ``"arc"``, ``"bucketing"``) are prefixed with ``+``: ``"nnm+krum"``,
    ``"clipping+mean"``, ``"nnm+clipping+median"``, ``"bucketing+cc"``, ``"arc+nnm+trimmed_mean"``. ``f`` (the number of
    Byzantine clients to tolerate) goes to every step that takes it; ``kwargs``
    go to the final aggregator.
    """
    if isinstance(spec, Aggregator) or (callable(spec) and not isinstance(spec, str)):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"aggregator must be a name or an Aggregator, got {spec!r}")
    check_f(f)
    *pre, final = spec.split("+")
    final = AGGREGATOR_ALIASES.get(final, final)
    if final not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {final!r}; choose one of {sorted(AGGREGATORS)}")
    unknown = [p for p in pre if p not in PRE_AGGREGATORS]
    if unknown:
        raise ValueError(f"unknown pre-aggregator(s) {unknown}; choose from {sorted(PRE_AGGREGATORS)}")
    agg = _build(AGGREGATORS[final], f, kwargs)
    if not pre:
        return agg
    return Pipeline(*(_build(PRE_AGGREGATORS[p], f, {}) for p in pre), agg)


def aggregate_states(
    states: Sequence[Mapping[str, torch.Tensor]],
    aggregator: str | Aggregator,
    weights: torch.Tensor | Sequence[float] | None = None,
    f: int = 0,
) -> dict[str, torch.Tensor]:
    """Apply any aggregator to a list of ``state_dict``\\s (models or deltas).

    Floating entries (parameters and float buffers) are flattened
    (:func:`robustfl_lib.params.flatten_state`), aggregated as one ``(n, d)``
    tensor and unflattened. Integer and boolean buffers (BatchNorm's
    ``num_batches_tracked``) cannot be averaged: each gets the element-wise
    median over clients (lower median, so an integer; for booleans the majority),
    which no minority of clients can set. All states must share keys, shapes
    and dtypes (``ValueError`` otherwise). ``aggregator`` may be a name (with
    ``f``). Chapter ``04_median``.
    """
    if len(states) == 0:
        raise ValueError("states is empty")
    ref = states[0]
    for i, s in enumerate(states[1:], 1):
        if list(s.keys()) != list(ref.keys()):
            raise ValueError(f"state {i} has keys {list(s.keys())}, state 0 has {list(ref.keys())}")
        for k, v in s.items():
            if v.shape != ref[k].shape or v.dtype != ref[k].dtype:
                raise ValueError(
                    f"state {i}[{k!r}] is {tuple(v.shape)} {v.dtype}, state 0 has {tuple(ref[k].shape)} {ref[k].dtype}"
                )
    agg = get_aggregator(aggregator, f=f)
    out = unflatten_state(agg(torch.stack([flatten_state(s) for s in states]), weights=weights), ref)
    for k, v in ref.items():
        if not torch.is_floating_point(v):
            stacked = torch.stack([s[k] for s in states])
            if v.dtype == torch.bool:
                out[k] = stacked.to(torch.uint8).median(dim=0).values.bool()
            else:
                out[k] = stacked.median(dim=0).values
    return out
