"""Attacks on a model's inputs (adversarial examples); see :mod:`robustfl_lib.attacks.base`."""

from .base import *  # noqa: F401,F403
from .base import __all__  # noqa: F401
from .base import (  # noqa: F401  (private helpers that were importable from robustfl_lib.attacks)
    Forward,
    _channels_last_forward,
    _check_bounds,
    _check_channels_last,
    _check_eps,
    _check_norm,
    _input_grad,
    _keep_worst,
    _l2_norms,
    _per_example,
    _two_sum_error,
    _use_channels_last,
)
