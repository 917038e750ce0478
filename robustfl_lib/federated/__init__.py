"""The federated-learning simulation (see :mod:`robustfl_lib.federated.simulation`)."""

from .simulation import *  # noqa: F401,F403
from .simulation import __all__  # noqa: F401
# Internal names that other modules, benchmarks and tests import from robustfl_lib.federated.
from .simulation import _Simulation, _adversarial_sample_loss, _train_clients  # noqa: F401
