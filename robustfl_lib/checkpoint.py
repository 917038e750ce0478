"""Checkpoints that load with ``torch.load(..., weights_only=True)``, and the random state they must hold.

A checkpoint holds only tensors and plain Python values (dicts, lists, str,
int, float, bool, None), never pickled objects, so loading one cannot run
code. Written atomically: a crash mid-save leaves the previous checkpoint
intact. Used by :func:`robustfl_lib.federated.run_federated` to resume a run
(chapter ``09_robust_federated_learning``).

A resumed run is exact only if *every* random stream it draws from continues
where it stopped. Besides the global RNGs (:func:`global_rng_state`: torch's CPU
generator, every CUDA device's, NumPy's and Python's legacy ones), that means
the state of the objects a run holds (aggregators, attacks, detectors), found
generically by walking their attributes (lists, tuples, dicts and nested
objects such as a ``Pipeline``'s steps or a ``Detect``'s detector):

* an object with ``get_state() -> dict`` (tensors and plain values) and
  ``set_state(dict)`` has that state saved and restored; ``reset()``, where
  defined, is called when a run starts (:func:`reset_objects`);
* every ``torch.Generator`` attribute has ``generator.get_state()`` saved and
  restored, and every ``numpy.random.Generator`` its ``bit_generator.state``,
  so a new rule holding a generator needs no code of its own
  (:func:`object_state`, :func:`load_object_state`).

:func:`isolated_copy` gives a run its own deep copy of such an object, generators
with their state included, so that runs never share (or change the caller's) state;
:func:`describe` gives an object's settings *by value* (class name and public
attributes, a generator by device and initial seed), which is how a checkpoint
recognises the configuration that made it, in any process.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import re
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "describe",
    "object_state",
    "load_object_state",
    "reset_objects",
    "isolated_copy",
    "global_rng_state",
    "set_global_rng_state",
]

_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(value: Any, where: str = "checkpoint") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where} is a {type(value).__name__}; checkpoints hold only tensors and plain values")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file, then rename)."""
    _check_plain(payload)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


# --------------------------------------------------------------------------- random state of objects

# Attributes that record the last call (``last_info``, ``last_boost``) are outputs, not state or settings.
_SKIP_PREFIX = "last_"
_OPAQUE = (nn.Module, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType)


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        return ((str(k), v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return ((str(i), v) for i, v in enumerate(obj))
    if isinstance(obj, _OPAQUE) or not hasattr(obj, "__dict__"):
        return iter(())
    return ((k, v) for k, v in vars(obj).items() if not k.startswith(_SKIP_PREFIX))


def _walk(obj: Any, path: str, seen: set[int]) -> Iterator[tuple[str, Any]]:
    """``(path, item)`` for ``obj`` and everything reachable through its attributes, depth first
    in attribute order (the same order for two objects built alike); each object once."""
    if obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.Tensor, np.ndarray)):
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield path, obj
    for name, child in _children(obj):
        yield from _walk(child, f"{path}.{name}", seen)


def _stateful(item: Any) -> bool:
    return (not isinstance(item, (torch.Generator, np.random.Generator, dict, list, tuple))
            and callable(getattr(item, "get_state", None)) and callable(getattr(item, "set_state", None)))


def object_state(obj: Any, name: str = "object") -> dict[str, dict[str, Any]]:
    """Every random or carried-over state inside ``obj``, by attribute path (``"aggregator.steps.1"``).

    ``{"state": {path: get_state()}, "torch_generators": {path: generator.get_state()},
    "numpy_generators": {path: bit_generator.state}}``: tensors and plain values only,
    so it goes into a checkpoint; :func:`load_object_state` puts it back."""
    out: dict[str, dict[str, Any]] = {"state": {}, "torch_generators": {}, "numpy_generators": {}}
    for path, item in _walk(obj, name, set()):
        if isinstance(item, torch.Generator):
            out["torch_generators"][path] = item.get_state()
        elif isinstance(item, np.random.Generator):
            out["numpy_generators"][path] = item.bit_generator.state
        elif _stateful(item):
            out["state"][path] = item.get_state()
    return out


def load_object_state(obj: Any, saved: dict[str, dict[str, Any]], name: str = "object", where: str = "checkpoint") -> None:
    """Restore what :func:`object_state` returned into ``obj`` (an object built like the saved one).

    Raises ``ValueError`` naming the paths that one side holds and the other lacks."""
    found = object_state(obj, name)
    for kind in ("state", "torch_generators", "numpy_generators"):
        have, want = set(found[kind]), set(saved.get(kind, {}))
        if have != want:
            raise ValueError(f"{where}: {name} holds {kind} at {sorted(have)} but the checkpoint at {sorted(want)}; "
                             "it was made with a differently built object")
    for path, item in _walk(obj, name, set()):
        if isinstance(item, torch.Generator):
            # A generator's state is a CPU byte tensor whatever its device (the checkpoint may be mapped to CUDA).
            item.set_state(saved["torch_generators"][path].cpu())
        elif isinstance(item, np.random.Generator):
            item.bit_generator.state = saved["numpy_generators"][path]
        elif _stateful(item):
            item.set_state(saved["state"][path])


def reset_objects(obj: Any) -> None:
    """Call ``reset()`` on ``obj`` and on every object inside it that has one (a run's start)."""
    for _, item in _walk(obj, "", set()):
        reset = getattr(item, "reset", None)
        if callable(reset) and not isinstance(item, (torch.Generator, np.random.Generator, dict, list, tuple)):
            reset()


def isolated_copy(obj: Any) -> Any:
    """A deep copy of ``obj`` sharing no state with it: its ``torch.Generator``\\s are new
    generators set to the originals' states (objects shared inside ``obj`` stay shared in the copy)."""
    memo: dict[int, Any] = {}
    for _, item in _walk(obj, "", set()):
        if isinstance(item, torch.Generator):
            clone = torch.Generator(device=item.device)
            clone.set_state(item.get_state())
            memo[id(item)] = clone
    return copy.deepcopy(obj, memo)


# --------------------------------------------------------------------------- global RNGs


def global_rng_state() -> dict[str, Any]:
    """The global random streams as tensors and plain values: torch's CPU generator, every CUDA
    device's (when CUDA is available), NumPy's legacy ``np.random`` and Python's ``random``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`global_rng_state`'s result. CUDA states are restored for the devices both
    the checkpoint and this machine have."""
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]][: torch.cuda.device_count()]
        for device, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, device)


# --------------------------------------------------------------------------- settings by value

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SMALL_TENSOR = 64  # up to this many elements a tensor is described by its values, beyond by a digest


def _describe_tensor(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu()
    out: dict[str, Any] = {"class": "Tensor", "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if t.numel() <= _SMALL_TENSOR:
        out["values"] = t.reshape(-1).tolist()
    else:
        out["sha256"] = hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def describe(value: Any, _active: frozenset[int] = frozenset()) -> Any:
    """A canonical, JSON-friendly description of a setting, equal for equal settings in any process.

    Plain values stay as they are (non-finite floats become ``"nan"``, ``"inf"``); tuples
    become lists, dicts get sorted string keys; an object becomes ``{"class": name,
    attribute: description, ...}`` over its public attributes (not ``_private`` ones nor
    ``last_*`` outputs); a ``torch.Generator`` is its device and ``initial_seed()``; a tensor
    its dtype, shape and values (a SHA-256 of its bytes beyond 64 elements); an
    ``nn.Module`` its state dict; a function its qualified name. Unlike ``repr``, no
    memory address enters it."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return describe(value.item())
    if isinstance(value, torch.Generator):
        return {"class": "torch.Generator", "device": str(value.device), "initial_seed": value.initial_seed()}
    if isinstance(value, np.random.Generator):
        seq = getattr(value.bit_generator, "seed_seq", None)
        return {"class": "numpy.random.Generator", "bit_generator": type(value.bit_generator).__name__,
                "entropy": describe(getattr(seq, "entropy", None)), "spawn_key": describe(list(getattr(seq, "spawn_key", ())))}
    if isinstance(value, torch.Tensor):
        return _describe_tensor(value)
    if isinstance(value, np.ndarray):
        return _describe_tensor(torch.from_numpy(np.ascontiguousarray(value))) if value.dtype != object else \
            [describe(v, _active) for v in value.tolist()]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if id(value) in _active:
        return {"class": type(value).__qualname__, "cycle": True}
    active = _active | {id(value)}
    if isinstance(value, dict):
        return {str(k): describe(v, active) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [describe(v, active) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((describe(v, active) for v in value), key=repr)
    if isinstance(value, nn.Module):
        return {"class": type(value).__qualname__, "state": describe(dict(value.state_dict()), active)}
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        return {"callable": f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"}
    if hasattr(value, "__dict__"):
        attrs = {k: v for k, v in vars(value).items() if not k.startswith(("_", _SKIP_PREFIX))}
        return {"class": type(value).__qualname__, **{k: describe(attrs[k], active) for k in sorted(attrs)}}
    return {"class": type(value).__qualname__, "repr": _ADDRESS.sub("", repr(value))}
