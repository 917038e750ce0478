"""A model's state as one flat vector, and back.

Aggregators work on a 2-D tensor of flattened client updates (n, d). Floating
parameters and buffers (BatchNorm's running statistics included) go into the
vector, in ``state_dict`` order; integer buffers such as BatchNorm's
``num_batches_tracked`` cannot be averaged as floats and are kept aside,
copied from a template. The round trip is bitwise for float32 models.
Used from chapter ``00_introduction`` on.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["float_keys", "flatten_state", "unflatten_state", "model_to_vector", "load_vector_"]

State = Mapping[str, torch.Tensor]


def float_keys(state: State) -> list[str]:
    """Keys of the floating-point entries of ``state``, in order."""
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def flatten_state(state: State) -> torch.Tensor:
    """Concatenate the floating entries of ``state`` into one 1-D tensor.

    The dtype is the widest floating dtype present, so no value is rounded.
    """
    keys = float_keys(state)
    if not keys:
        raise ValueError("state has no floating-point entries to flatten")
    dtype = state[keys[0]].dtype
    for k in keys[1:]:
        dtype = torch.promote_types(dtype, state[k].dtype)
    return torch.cat([state[k].detach().reshape(-1).to(dtype) for k in keys])


def unflatten_state(vector: torch.Tensor, like: State) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_state`: a new state dict shaped and typed like ``like``.

    Floating entries are read from ``vector``; every other entry (integer
    buffers) is cloned from ``like``.
    """
    if vector.ndim != 1:
        raise ValueError(f"vector must be 1-D, got shape {tuple(vector.shape)}")
    need = sum(v.numel() for k, v in like.items() if torch.is_floating_point(v))
    if vector.numel() != need:
        raise ValueError(f"vector has {vector.numel()} entries but the state needs {need}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for k, v in like.items():
        if torch.is_floating_point(v):
            n = v.numel()
            out[k] = vector[offset : offset + n].reshape(v.shape).to(device=v.device, dtype=v.dtype).clone()
            offset += n
        else:
            out[k] = v.detach().clone()
    return out


def model_to_vector(model: nn.Module) -> torch.Tensor:
    """``flatten_state(model.state_dict())``."""
    return flatten_state(model.state_dict())


def load_vector_(model: nn.Module, vector: torch.Tensor) -> nn.Module:
    """Write a flat vector into ``model``'s floating parameters and buffers, in place."""
    model.load_state_dict(unflatten_state(vector, model.state_dict()))
    return model
