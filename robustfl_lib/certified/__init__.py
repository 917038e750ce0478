"""Certified linf robustness: IBP and CROWN-IBP bounds, verified accuracy, certified training.

Modules: :mod:`~robustfl_lib.certified.bounds` (:func:`ibp_bounds`, :func:`crown_ibp_bounds`,
:func:`margin_bounds`), :mod:`~robustfl_lib.certified.accuracy` (:func:`verified_accuracy`),
:mod:`~robustfl_lib.certified.training` (:class:`CertifiedLoss`, the ramps) and
:mod:`~robustfl_lib.certified.models` (:class:`GowalSmallCNN`, :func:`ibp_init`). Gowal et al. 2018;
Zhang et al. 2020; Shi et al. 2021. Taught in chapter ``19_certified_linf_robustness``.
"""

from .accuracy import *  # noqa: F401,F403
from .bounds import *  # noqa: F401,F403
from .models import *  # noqa: F401,F403
from .training import *  # noqa: F401,F403
from .accuracy import __all__ as _accuracy_all
from .bounds import __all__ as _bounds_all
from .models import __all__ as _models_all
from .training import __all__ as _training_all

__all__ = [*_bounds_all, *_accuracy_all, *_training_all, *_models_all]
