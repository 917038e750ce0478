"""Alias of :mod:`robustfl_lib.aggregators.preaggregation`, where the pre-aggregators now live
(beside the aggregation families); kept so that ``robustfl_lib.preaggregation`` still imports."""

from .aggregators.preaggregation import *  # noqa: F401,F403
from .aggregators.preaggregation import __all__  # noqa: F401
