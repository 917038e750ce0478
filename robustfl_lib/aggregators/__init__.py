"""Aggregation rules: how the server combines client updates, one module per family.

* :mod:`.base`: :class:`Aggregator`, :class:`RobustAggregator` (requirements on ``n`` and ``f``,
  non-finite rows, ``last_info``: the conventions every rule shares, described there),
  :class:`Pipeline`, the registry of names and :func:`get_aggregator`, :func:`aggregate_states`;
* :mod:`.coordinatewise`: :class:`Mean`, :class:`Median`, :class:`TrimmedMean`;
* :mod:`.distance`: :class:`Krum`, :class:`MultiKrum`, :class:`Bulyan`;
* :mod:`.iterative`: :class:`GeometricMedian`, :class:`CenteredClipping`;
* :mod:`.preaggregation`: :class:`NNM`, :class:`Clipping` (maps ``(n, d)`` to ``(n, d)`` before a rule).

Every public name is importable from here and from ``robustfl_lib``. Chapters ``00_introduction``
and ``04_median`` to ``08_stronger_aggregators`` teach them.
"""

from ..robust_stats import coordinate_median, pairwise_sq_distances, sort_columns
from .base import (
    AGGREGATORS,
    Aggregator,
    NonFiniteBeyondTolerance,
    Pipeline,
    RobustAggregator,
    aggregate_states,
    get_aggregator,
)
from .coordinatewise import Mean, Median, TrimmedMean
from .distance import Bulyan, Krum, MultiKrum, krum_scores
from .iterative import CenteredClipping, GeometricMedian, spread_radius
from .preaggregation import NNM, PRE_AGGREGATORS, Clipping, PreAggregator

__all__ = [
    "Aggregator",
    "RobustAggregator",
    "NonFiniteBeyondTolerance",
    "spread_radius",
    "Mean",
    "Median",
    "TrimmedMean",
    "Krum",
    "MultiKrum",
    "GeometricMedian",
    "CenteredClipping",
    "Bulyan",
    "Pipeline",
    "PreAggregator",
    "NNM",
    "Clipping",
    "PRE_AGGREGATORS",
    "krum_scores",
    "pairwise_sq_distances",
    "coordinate_median",
    "sort_columns",
    "AGGREGATORS",
    "get_aggregator",
    "aggregate_states",
]

# Names accepted by get_aggregator (and FLConfig.aggregator), in the order they were introduced.
AGGREGATORS.update({
    "mean": Mean,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "multi_krum": MultiKrum,
    "geometric_median": GeometricMedian,
    "centered_clipping": CenteredClipping,
    "bulyan": Bulyan,
})
