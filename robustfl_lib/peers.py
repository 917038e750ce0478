"""Optional peer libraries that the tests and benchmarks compare against (never needed by the book).

:func:`import_byzfl` returns ByzFL's rules and attacks (Gonzalez, Guerraoui, Pinot et al.,
``pip install byzfl``), or ``None`` when ByzFL is absent. ByzFL's package imports its benchmark
suite, which needs torchvision; its aggregators and attacks need only NumPy, SciPy and torch. Where
torchvision is missing or broken (e.g. a CUDA build of torchvision beside a CPU build of torch), the
rules are loaded without the benchmark suite, so the comparison still runs on a CPU-only install.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def import_byzfl() -> types.ModuleType | None:
    """ByzFL (its ``aggregators`` and ``attacks`` names at top level, as ``byzfl.MDA`` etc.) or ``None``."""
    try:
        import byzfl

        return byzfl
    except (ImportError, RuntimeError, OSError):
        # The package's __init__ also imports byzfl.benchmark (torchvision); fall back to the rules.
        pass
    spec = importlib.util.find_spec("byzfl")
    if spec is None or spec.submodule_search_locations is None:
        return None
    package = types.ModuleType("byzfl")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    sys.modules["byzfl"] = package
    try:
        parts = [importlib.import_module(f"byzfl.{name}") for name in ("aggregators", "attacks")]
    except (ImportError, RuntimeError, OSError):
        del sys.modules["byzfl"]
        return None
    for part in parts:
        for name in dir(part):
            if not name.startswith("_"):
                setattr(package, name, getattr(part, name))
    return package
