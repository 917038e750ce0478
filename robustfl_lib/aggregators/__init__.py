"""Aggregation rules: how the server combines client updates (a package; see :mod:`.base`)."""

from .base import *  # noqa: F401,F403
from .base import __all__  # noqa: F401
