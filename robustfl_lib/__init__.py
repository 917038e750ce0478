"""robustfl_lib: the library behind the robustfl book.

Every module defines ``__all__``; its public names are re-exported here, so
``from robustfl_lib import load_dataset, Krum, PGD`` works.

The modules that need matplotlib or scipy.stats (figures, evidence intervals,
smoothing's bounds, the worst-case benchmark) are imported on first use of one
of their names: ``rfl.summarize`` or ``from robustfl_lib import plot_history``
loads them then. A Flower ClientApp process, which never plots or computes an
interval, so starts without paying their ~1.5 s import (chapter 14).
"""

import ast as _ast
import importlib as _importlib
from pathlib import Path as _Path

from .aggregators import *  # noqa: F401,F403
from .attacks import *  # noqa: F401,F403
from .backdoor import *  # noqa: F401,F403
from .byzantine import *  # noqa: F401,F403
from .certified import *  # noqa: F401,F403
from .checkpoint import *  # noqa: F401,F403
from .data import *  # noqa: F401,F403
from .experiments import *  # noqa: F401,F403
from .federated import *  # noqa: F401,F403
from .models import *  # noqa: F401,F403
from .params import *  # noqa: F401,F403
from .personalization import *  # noqa: F401,F403
from .runtime import *  # noqa: F401,F403
from .training import *  # noqa: F401,F403
from .vectorized import *  # noqa: F401,F403

__version__ = "0.1.0"

# Modules loaded on first use (matplotlib: comparison, diagrams, plotting; scipy.stats:
# evidence, smoothing, and worstcase through evidence).
_LAZY_MODULES = ("comparison", "diagrams", "evidence", "plotting", "smoothing", "worstcase")


def _static_all(module: str) -> list[str]:
    """The module's ``__all__`` read from its source without importing it.

    Only literal lists or tuples assigned to ``__all__`` (``=`` or ``+=``) count, which
    is how every module here writes it; anything else is an error, so a module whose
    names cannot be known without importing it is caught by the first import.
    """
    here = _Path(__file__).parent
    path = here / f"{module}.py"
    if not path.exists():
        path = here / module / "__init__.py"
    names: list[str] = []
    for node in _ast.parse(path.read_text(encoding="utf-8")).body:
        target = node.targets[0] if isinstance(node, _ast.Assign) and len(node.targets) == 1 else (
            node.target if isinstance(node, _ast.AugAssign) else None)
        if isinstance(target, _ast.Name) and target.id == "__all__":
            value = _ast.literal_eval(node.value)
            if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
                raise ImportError(f"robustfl_lib.{module}: __all__ must be a literal list of names")
            names.extend(value)
    if not names:
        raise ImportError(f"robustfl_lib.{module}: no literal __all__ to re-export lazily")
    return names


_LAZY_NAMES = {name: module for module in _LAZY_MODULES for name in _static_all(module)}


def __getattr__(name: str):
    if name in _LAZY_MODULES:  # ``rfl.evidence`` as before: the submodule itself
        return _importlib.import_module(f".{name}", __name__)
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'robustfl_lib' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_NAMES) | set(_LAZY_MODULES))


# ``from robustfl_lib import *`` gives every public name, the lazy ones included (star
# import looks each up, which loads their modules).
__all__ = sorted({n for n in globals() if not n.startswith("_")} | set(_LAZY_NAMES) | set(_LAZY_MODULES))
