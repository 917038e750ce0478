"""Which optional keywords a pluggable object accepts: the engine's hooks.

The FL loop knows more than the old protocols pass on (the clients' ids, the global
weights, the previous aggregate, the server's own update). It passes a keyword only to a
callable whose signature takes it, by name or through ``**kwargs``; every other object is
called exactly as before. :func:`accepts_keyword` answers that question once per function
(the answer is cached), so the per-round cost is a dictionary look-up.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["accepts_keyword"]


@functools.lru_cache(maxsize=512)
def _signature_accepts(target: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature: the old protocol
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
               for p in params)


def accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether calling ``fn`` with the keyword ``name`` is allowed by its signature (a parameter of that
    name, or ``**kwargs``). For a bound method or a callable object the answer is its class's function's,
    cached per function, so instances of one class share it."""
    if inspect.ismethod(fn):
        target = fn.__func__
    elif inspect.isfunction(fn) or inspect.isbuiltin(fn) or isinstance(fn, (type, functools.partial)):
        target = fn
    else:
        target = type(fn).__call__
    try:
        return _signature_accepts(target, name)
    except TypeError:  # an unhashable callable: not cached
        return _signature_accepts.__wrapped__(target, name)
