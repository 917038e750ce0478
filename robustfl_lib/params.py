r"""A model's state as one flat vector, and back.

Aggregators work on a 2-D tensor of flattened client updates (n, d). Floating
parameters and buffers (BatchNorm's running statistics included) go into the
vector, in ``state_dict`` order; integer buffers such as BatchNorm's
``num_batches_tracked`` cannot be averaged as floats and are kept aside,
copied from a template. The round trip is bitwise for float32 models.
Used from chapter ``00_introduction`` on.

**BatchNorm in federated learning.** A BatchNorm layer (Ioffe & Szegedy 2015) holds, besides
its affine ``weight`` and ``bias``, two float buffers, ``running_mean`` and ``running_var`` (moving averages of the batch
statistics, which the layer uses in eval mode, i.e. whenever the global model is evaluated
or attacked), and one integer buffer, ``num_batches_tracked`` (the number of training
batches seen, read only when ``momentum=None`` to make that average cumulative). The
federated loop (:func:`robustfl_lib.federated.run_federated`) treats them so:

* **Running statistics are aggregated like parameters, by the same rule.** They are
  coordinates of the flat vector; a client's update holds their change
  :math:`s_i - s` and the server sets :math:`s \leftarrow s + A(s_1 - s, \dots, s_n - s)`.
  For a rule that commutes with a shift of all its inputs (mean, coordinate-wise median,
  trimmed mean, Krum and the other selection rules, the geometric median:
  :math:`A(u + c) = A(u) + c`) that is :math:`A(s_1, \dots, s_n)`, the rule applied to the
  clients' statistics: FedAvg averages them (as McMahan et al. 2017 average the whole model),
  the median takes their median, Krum takes those of the client it selects. Rules centred
  elsewhere (centred clipping around its last aggregate, norm clipping around 0) treat the
  changes as they treat any update. Sending the statistics through the rule matters: they are
  as forgeable as weights, and a Byzantine client that shifts ``running_var`` far below
  zero drives the mean's variance negative, after which BatchNorm divides by the square root
  of a negative number in eval mode (NaN outputs); a rule whose output stays within the honest
  clients' coordinate-wise range (the median, the trimmed mean while ``f`` covers the
  attackers) keeps it positive. They are also coordinates of the distances and norms that
  distance-based rules and clipping compute.
* **Integer buffers are kept aside, never sent.** An integer count cannot be averaged as a
  float, and a count the server would take from clients is one more number a Byzantine client
  could forge. The global model keeps its own ``num_batches_tracked`` (0 for a fresh model;
  :func:`unflatten_state` copies it from the template); every client starts each round from
  the global model, so it counts the round's batches only. With the default ``momentum=0.1``
  the count changes nothing; with ``momentum=None`` a client's running statistics are then the
  average over its batches of this round (each batch's statistics at the weights of its step),
  whatever statistics the round started from (:mod:`robustfl_lib.models`, ``bn_momentum``).

FedBN (Li et al. 2021) keeps BatchNorm layers local instead, a personalisation this library
does not implement; GroupNorm (``norm="group"`` in :mod:`robustfl_lib.models`, Wu & He 2018)
has no buffers at all. Models with buffers train client by client: the vectorized path
(:mod:`robustfl_lib.vectorized`) refuses them and :func:`~robustfl_lib.federated.run_federated`
falls back to the loop. Tested in ``tests/test_models.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["float_keys", "state_slices", "flatten_state", "unflatten_state", "model_to_vector", "load_vector_"]

State = Mapping[str, torch.Tensor]


def float_keys(state: State) -> list[str]:
    """Keys of the floating-point entries of ``state``, in order."""
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def state_slices(state: State) -> dict[str, slice]:
    """Where each floating entry of ``state`` lies in :func:`flatten_state`'s vector,
    e.g. ``vector[state_slices(state)["1.running_var"]]`` is that BatchNorm buffer, flattened."""
    out, offset = {}, 0
    for k in float_keys(state):
        n = state[k].numel()
        out[k] = slice(offset, offset + n)
        offset += n
    return out


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
