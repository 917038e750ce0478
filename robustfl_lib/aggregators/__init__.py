"""Aggregation rules: how the server combines client updates, one module per family.

* :mod:`.base`: :class:`Aggregator`, :class:`RobustAggregator` (requirements on ``n`` and ``f``,
  non-finite rows, ``last_info``: the conventions every rule shares, described there),
  :class:`Pipeline`, the registry of names and :func:`get_aggregator`, :func:`aggregate_states`;
* :mod:`.coordinatewise`: :class:`Mean`, :class:`Median`, :class:`TrimmedMean`, :class:`Meamed`;
* :mod:`.distance`: :class:`Krum`, :class:`MultiKrum`, :class:`Bulyan`, :class:`MDA`, :class:`MoNNA`;
* :mod:`.iterative`: :class:`GeometricMedian`, :class:`CenteredClipping`;
* :mod:`.spectral`: :class:`SMEA`, :class:`CAF` (the covariance's largest eigenvalue);
* :mod:`.filters`: :class:`DnC`, :class:`SignGuard` (detect suspicious updates, drop them, average the rest);
* :mod:`.server_data`: :class:`FLTrust` (filters that need server data: trust by cosine to the server's own update);
* :mod:`.preaggregation`: :class:`NNM`, :class:`Clipping`, :class:`ARC` (``(n, d)`` to ``(n, d)``
  before a rule) and :class:`Bucketing` (``(n, d)`` to ``(ceil(n/s), d)``).

Every public name is importable from here and from ``robustfl_lib``. Chapters ``00_introduction``
and ``04_median`` to ``08_stronger_aggregators`` teach the rules of 2017-2019; the rest (ByzFL's
rules, Bucketing, ARC, the filters) in chapters ``15_heterogeneity_and_its_fixes`` (bucketing, NNM, ARC) and
``16_optimising_attacks`` (DnC, SignGuard, FLTrust); MDA, MoNNA, Meamed, CAF and SMEA in
``18_more_robust_rules``.
"""

from ..robust_stats import coordinate_median, pairwise_sq_distances, sort_columns
from .base import (
    AGGREGATOR_ALIASES,
    AGGREGATORS,
    Aggregator,
    NonFiniteBeyondTolerance,
    Pipeline,
    RobustAggregator,
    aggregate_states,
    get_aggregator,
)
from .coordinatewise import Meamed, Mean, Median, TrimmedMean, mean_around_median
from .distance import MDA, Bulyan, Krum, MoNNA, MultiKrum, krum_scores, subset_complements
from .filters import DnC, SignGuard
from .iterative import CenteredClipping, GeometricMedian, spread_radius
from .preaggregation import ARC, NNM, PRE_AGGREGATORS, Bucketing, Clipping, PreAggregator
from .server_data import FLTrust
from .spectral import CAF, SMEA

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
    # issue 14
    "Meamed",
    "MDA",
    "MoNNA",
    "CAF",
    "SMEA",
    "Bucketing",
    "ARC",
    "AGGREGATOR_ALIASES",
    "mean_around_median",
    "subset_complements",
    "DnC",
    "SignGuard",
    "FLTrust",
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
    "meamed": Meamed,
    "mda": MDA,
    "monna": MoNNA,
    "caf": CAF,
    "smea": SMEA,
    "dnc": DnC,
    "signguard": SignGuard,
    "fltrust": FLTrust,
})
