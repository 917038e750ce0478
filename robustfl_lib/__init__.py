"""robustfl_lib: the library behind the robustfl book.

Every module defines ``__all__``; its public names are re-exported here, so
``from robustfl_lib import load_dataset, Krum, PGD`` works.
"""

from .aggregators import *  # noqa: F401,F403
from .attacks import *  # noqa: F401,F403
from .backdoor import *  # noqa: F401,F403
from .byzantine import *  # noqa: F401,F403
from .certified import *  # noqa: F401,F403
from .checkpoint import *  # noqa: F401,F403
from .comparison import *  # noqa: F401,F403
from .data import *  # noqa: F401,F403
from .evidence import *  # noqa: F401,F403
from .diagrams import *  # noqa: F401,F403
from .experiments import *  # noqa: F401,F403
from .federated import *  # noqa: F401,F403
from .models import *  # noqa: F401,F403
from .params import *  # noqa: F401,F403
from .personalization import *  # noqa: F401,F403
from .plotting import *  # noqa: F401,F403
from .runtime import *  # noqa: F401,F403
from .smoothing import *  # noqa: F401,F403
from .training import *  # noqa: F401,F403
from .vectorized import *  # noqa: F401,F403
from .worstcase import *  # noqa: F401,F403

__version__ = "0.1.0"
