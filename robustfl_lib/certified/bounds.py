r"""Bounds on a network's logits over the linf ball: interval bound propagation and CROWN-IBP.

For an input ``x`` in :math:`[0, 1]^d` and a budget :math:`\epsilon` the input set is the box

.. math::  B(x, \epsilon) = \{x' : \max(x - \epsilon, 0) \le x' \le \min(x + \epsilon, 1)\},

the linf ball intersected with the valid inputs. A *bound* is a pair :math:`(\underline z,
\overline z)` with :math:`\underline z \le f(x') \le \overline z` for every :math:`x' \in B`.

* **IBP** (Gowal et al. 2018, "On the effectiveness of interval bound propagation for training
  verifiably robust models"): push the box through the layers one at a time. An affine layer
  :math:`h \mapsto W h + b` maps a box with centre :math:`\mu` and radius :math:`r` to centre
  :math:`W \mu + b` and radius :math:`|W| r` (exact for one layer); a monotone layer (ReLU, max- and
  average-pooling) maps the ends.
* **CROWN-IBP** (Zhang et al. 2020 ICLR, "Towards stable and efficient training of verifiably
  robust neural networks"): IBP for every intermediate layer, then one backward linear (CROWN)
  pass for the final layer. Each unstable ReLU (:math:`l < 0 < u`) is relaxed between two lines,
  :math:`\alpha z \le \mathrm{ReLU}(z) \le \frac{u}{u - l}(z - l)` with the adaptive lower slope
  :math:`\alpha = 1` if :math:`u > -l` else :math:`0`; the backward pass turns a specification
  :math:`c^\top f(x')` into a linear function :math:`a^\top x' + b_0` below it, minimised over the box
  in closed form. A max-pooling window is bounded below by its input with the largest lower bound
  and above by the constant largest upper bound.

What is true of the two (and tested): both are sound up to floating-point rounding; IBP is exact
for one affine layer; CROWN is exact for a network that is affine on the box (every ReLU stable
under the intermediate bounds, or no ReLU), so there it is at least as tight as IBP, coordinate by
coordinate. Neither dominates in general: CROWN's lower line :math:`\alpha z` is below the interval's
:math:`0` for an unstable ReLU with :math:`\alpha = 1`, so CROWN-IBP can be looser than IBP (Zhang et
al. 2020 report IBP-trained networks whose IBP bounds beat CROWN-IBP's). Which is tighter on a
given model is measured, not assumed.

:func:`margin_bounds` bounds the specification the verification needs, the margins
:math:`z_y - z_j`, directly: CROWN-IBP starts its backward pass from :math:`C = e_y - e_j`, and IBP
folds :math:`C` into the last linear layer ("elision", Gowal et al. 2018), both tighter than
subtracting logit bounds. Supported layers: ``nn.Sequential`` stacks (nested too) of ``Linear``,
``Conv2d`` (zero padding), ``ReLU``, ``Flatten``, ``MaxPool2d``, ``AvgPool2d`` (no ceil mode, padding
counted), ``BatchNorm1d/2d`` and ``Dropout`` in eval mode, ``Identity``; any other layer raises a
``TypeError`` naming it, a BatchNorm or Dropout layer in train mode a ``ValueError`` (its output
depends on the batch or on chance, so no bound of the deterministic model applies). Everything is
vectorised over the batch and runs on the device of ``x``. Taught in chapter ``19_certified_linf_robustness``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = ["ibp_bounds", "crown_ibp_bounds", "margin_bounds", "input_box", "bound_layers", "BOUND_METHODS"]

BOUND_METHODS = ("ibp", "crown-ibp")

_SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity, nn.Dropout,
              nn.AvgPool2d, nn.MaxPool2d)

Layers = list[tuple[str, nn.Module]]
Params = Mapping[str, torch.Tensor] | None


def bound_layers(model: nn.Module) -> Layers:
    """The layers of ``model`` in forward order as ``(name, module)``, nested Sequentials flattened.

    Raises ``TypeError`` naming the first layer the bounds cannot handle and ``ValueError`` for a
    BatchNorm or Dropout layer in train mode."""
    layers: Layers = []

    def walk(m: nn.Module, name: str) -> None:
        label = name or type(m).__name__
        if isinstance(m, nn.Sequential):
            if type(m).forward is not nn.Sequential.forward:
                raise TypeError(f"cannot bound {label} ({type(m).__name__}): a Sequential with its own forward")
            for child_name, child in m.named_children():
                walk(child, f"{name}.{child_name}" if name else child_name)
            return
        if not isinstance(m, _SUPPORTED):
            raise TypeError(f"cannot bound layer {label} ({type(m).__name__}); supported layers: "
                            + ", ".join(t.__name__ for t in _SUPPORTED))
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.training:
                raise ValueError(f"layer {label} ({type(m).__name__}) is in train mode, where it normalises by "
                                 "batch statistics; call model.eval() before bounding")
            if m.running_mean is None:
                raise TypeError(f"cannot bound layer {label} ({type(m).__name__}) without running statistics")
        if isinstance(m, nn.Dropout) and m.training and m.p > 0:
            raise ValueError(f"layer {label} (Dropout) is in train mode, where it is random; call model.eval()")
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            raise TypeError(f"cannot bound layer {label} (Conv2d): only explicit zero padding is supported")
        if isinstance(m, nn.AvgPool2d) and (m.ceil_mode or m.divisor_override is not None
                                            or (not m.count_include_pad and _pair(m.padding) != (0, 0))):
            raise TypeError(f"cannot bound layer {label} (AvgPool2d): ceil_mode, divisor_override and "
                            "count_include_pad=False with padding are not supported")
        layers.append((name, m))

    walk(model, "")
    return layers


def _check_input(x: torch.Tensor, eps: float) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (N, ...), got shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise ValueError("x must lie in [0, 1] (inputs scaled to [0, 1], finite)")


def _two_sum_error(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``a + b - s`` exactly for ``s = fl(a + b)`` (Knuth's TwoSum): its sign says which way the sum rounded."""
    b_virtual = s - a
    return (a - (s - b_virtual)) + (b - b_virtual)


def input_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clip(x - eps, 0, 1), clip(x + eps, 0, 1))``, each end rounded *outward* in ``x``'s dtype
    (eps to the nearest number of the dtype at least as large, then ``x +- eps`` corrected by one
    ulp where rounding to nearest moved it inward), so the box contains every real point of the
    ball intersected with [0, 1]."""
    e = torch.tensor(float(eps), dtype=torch.float64).to(x.dtype)
    if float(e) < eps:
        e = torch.nextafter(e, torch.full_like(e, math.inf))
    e = e.to(x.device)
    hi = x + e
    hi = torch.where(_two_sum_error(x, e, hi) > 0, torch.nextafter(hi, torch.full_like(hi, math.inf)), hi)
    lo = x - e
    lo = torch.where(_two_sum_error(x, -e, lo) < 0, torch.nextafter(lo, torch.full_like(lo, -math.inf)), lo)
    return lo.clamp(0.0, 1.0), hi.clamp(0.0, 1.0)


def _get(params: Params, name: str, module: nn.Module, attr: str) -> torch.Tensor | None:
    key = f"{name}.{attr}" if name else attr
    if params is not None and key in params:
        return params[key]
    return getattr(module, attr)


def _bn_affine(m: nn.Module, name: str, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``scale * h + shift`` per channel."""
    weight, bias = _get(params, name, m, "weight"), _get(params, name, m, "bias")
    scale = torch.rsqrt(m.running_var + m.eps)
    if weight is not None:
        scale = scale * weight
    shift = -m.running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against a (..., C, *spatial) tensor of ``ndim`` dims
    counted from the channel axis."""
    return v.view(-1, *[1] * (ndim - 1))


def _avg_weight(m: nn.AvgPool2d, channels: int, like: torch.Tensor) -> torch.Tensor:
    kh, kw = _pair(m.kernel_size)
    return torch.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=like.dtype, device=like.device)


def _ibp(layers: Layers, lo: torch.Tensor, hi: torch.Tensor, params: Params, stop: int | None = None):
    """Propagate the box through ``layers[:stop]``; return the final box and each layer's input box."""
    seen = []
    for name, m in layers[:stop]:
        seen.append((lo, hi))
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)):
            mu, r = (hi + lo) / 2, (hi - lo) / 2
            if isinstance(m, nn.Linear):
                w, b = _get(params, name, m, "weight"), _get(params, name, m, "bias")
                mu, r = F.linear(mu, w, b), F.linear(r, w.abs())
            elif isinstance(m, nn.Conv2d):
                w, b = _get(params, name, m, "weight"), _get(params, name, m, "bias")
                mu = F.conv2d(mu, w, b, m.stride, m.padding, m.dilation, m.groups)
                r = F.conv2d(r, w.abs(), None, m.stride, m.padding, m.dilation, m.groups)
            else:
                scale, shift = _bn_affine(m, name, params)
                scale, shift = _channel_view(scale, mu.ndim - 1), _channel_view(shift, mu.ndim - 1)
                mu, r = mu * scale + shift, r * scale.abs()
            lo, hi = mu - r, mu + r
        elif isinstance(m, (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)):
            lo, hi = m(lo), m(hi)  # monotone (or a reshape): the ends map to the ends
        # Identity and eval-mode Dropout leave the box as it is.
    return lo, hi, seen


def _sum_rest(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


def _transpose_conv(a: torch.Tensor, weight: torch.Tensor, in_shape: torch.Size, stride, padding, dilation,
                    groups: int) -> torch.Tensor:
    """The adjoint of a (bias-free) 2-D convolution applied to ``a`` (B, S, C_out, H_out, W_out)."""
    b, s = a.shape[:2]
    kh, kw = weight.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho, wo = a.shape[-2:]
    out_pad = (in_shape[-2] - ((ho - 1) * sh - 2 * ph + dh * (kh - 1) + 1),
               in_shape[-1] - ((wo - 1) * sw - 2 * pw + dw * (kw - 1) + 1))
    out = F.conv_transpose2d(a.reshape(b * s, *a.shape[2:]), weight, None, (sh, sw), (ph, pw), out_pad, groups,
                             (dh, dw))
    return out.reshape(b, s, *out.shape[1:])


def _crown_lower(layers: Layers, seen, spec: torch.Tensor, x_lo: torch.Tensor, x_hi: torch.Tensor,
                 params: Params) -> torch.Tensor:
    """Lower bounds of ``spec @ f(x')`` over the box, (B, S), by one backward linear pass.

    ``seen[i]`` is the (IBP) box at the input of ``layers[i]``; ``spec`` is (B, S, outputs).
    The running linear function is ``a . h + bias`` of the current layer's input ``h``."""
    a, bias = spec, spec.new_zeros(spec.shape[:2])
    for (name, m), (lo, hi) in zip(reversed(layers), reversed(seen)):
        if isinstance(m, nn.Linear):
            w, b = _get(params, name, m, "weight"), _get(params, name, m, "bias")
            if b is not None:
                bias = bias + _sum_rest(a * b)
            a = a @ w
        elif isinstance(m, nn.Conv2d):
            w, b = _get(params, name, m, "weight"), _get(params, name, m, "bias")
            if b is not None:
                bias = bias + _sum_rest(a * b.view(-1, 1, 1))
            a = _transpose_conv(a, w, lo.shape, m.stride, m.padding, m.dilation, m.groups)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale, shift = _bn_affine(m, name, params)
            bias = bias + _sum_rest(a * _channel_view(shift, lo.ndim - 1))
            a = a * _channel_view(scale, lo.ndim - 1)
        elif isinstance(m, nn.AvgPool2d):
            a = _transpose_conv(a, _avg_weight(m, lo.shape[1], a), lo.shape, m.stride, m.padding, 1, lo.shape[1])
        elif isinstance(m, nn.Flatten):
            a = a.reshape(*a.shape[:2], *lo.shape[1:])
        elif isinstance(m, nn.ReLU):
            lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
            active, inactive = lo >= 0, hi <= 0
            unstable = ~(active | inactive)
            # where() on a safe denominator: a 0/0 in the branch not taken would still poison gradients.
            width = torch.where(unstable, hi - lo, torch.ones_like(hi))
            up_slope = torch.where(unstable, hi / width, active.to(hi.dtype))
            up_icpt = torch.where(unstable, -lo * up_slope, torch.zeros_like(hi))
            low_slope = torch.where(unstable, (hi > -lo).to(hi.dtype), active.to(hi.dtype))
            pos, neg = a.clamp(min=0), a.clamp(max=0)
            bias = bias + _sum_rest(neg * up_icpt)
            a = pos * low_slope + neg * up_slope
        elif isinstance(m, nn.MaxPool2d):
            k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
            _, idx = F.max_pool2d(lo, k, s, p, d, m.ceil_mode, return_indices=True)
            top = F.max_pool2d(hi, k, s, p, d, m.ceil_mode)
            pos, neg = a.clamp(min=0), a.clamp(max=0)
            bias = bias + _sum_rest(neg * top.unsqueeze(1))
            # Below: the window's input with the largest lower bound; scatter its coefficient there.
            target = idx.unsqueeze(1).expand(*pos.shape).flatten(-2)
            a = pos.new_zeros(*pos.shape[:3], lo.shape[-2] * lo.shape[-1]).scatter_add(-1, target, pos.flatten(-2))
            a = a.reshape(*pos.shape[:3], *lo.shape[-2:])
    pos, neg = a.clamp(min=0), a.clamp(max=0)
    return bias + _sum_rest(pos * x_lo.unsqueeze(1) + neg * x_hi.unsqueeze(1))


def _margin_spec(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, K, K): row j is e_y - e_j (row y is zero)."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def _ibp_margins(layers: Layers, lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor, params: Params,
                 num_classes: int) -> torch.Tensor:
    last_name, last = layers[-1]
    if isinstance(last, nn.Linear):
        # Elision of the last layer: bound C (W h + b) from the box of h.
        h_lo, h_hi, _ = _ibp(layers, lo, hi, params, stop=len(layers) - 1)
        w, b = _get(params, last_name, last, "weight"), _get(params, last_name, last, "bias")
        spec = _margin_spec(y, num_classes, w.dtype)
        cw = spec @ w
        mu, r = ((h_hi + h_lo) / 2).unsqueeze(-1), ((h_hi - h_lo) / 2).unsqueeze(-1)
        out = (cw @ mu).squeeze(-1) - (cw.abs() @ r).squeeze(-1)
        return out + spec @ b if b is not None else out
    z_lo, z_hi, _ = _ibp(layers, lo, hi, params)
    own = torch.eye(num_classes, dtype=z_lo.dtype, device=y.device)[y]  # row y of l_y - u gets back u_y - l_y
    return z_lo.gather(1, y[:, None]) - z_hi + own * (z_hi - z_lo)


def _num_classes(layers: Layers, x: torch.Tensor, params: Params) -> int:
    z, _, _ = _ibp(layers, x[:1], x[:1], params)
    return z.shape[1]


def _margins(layers: Layers, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, params: Params,
             num_classes: int) -> torch.Tensor:
    """Lower bounds (B, K) of z_y - z_j over the box (0 at j = y); no validation (vmap-safe)."""
    lo, hi = input_box(x, eps)
    if method == "ibp":
        return _ibp_margins(layers, lo, hi, y, params, num_classes)
    _, _, seen = _ibp(layers, lo, hi, params)
    return _crown_lower(layers, seen, _margin_spec(y, num_classes, x.dtype), lo, hi, params)


def _check_method(method: str) -> None:
    if method not in BOUND_METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {BOUND_METHODS}")


def ibp_bounds(model: nn.Module, x: torch.Tensor, eps: float, params: Params = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval bounds ``(lower, upper)``, each (N, classes), on ``model``'s logits over the box
    :math:`[\\max(x - \\epsilon, 0), \\min(x + \\epsilon, 1)]` (Gowal et al. 2018; chapter
    ``19_certified_linf_robustness``). Differentiable in the model's parameters (IBP training).
    ``params`` overrides parameters by their ``named_parameters`` name (as
    ``torch.func.functional_call`` does)."""
    _check_input(x, eps)
    lo, hi = input_box(x, eps)
    z_lo, z_hi, _ = _ibp(bound_layers(model), lo, hi, params)
    return z_lo, z_hi


def crown_ibp_bounds(model: nn.Module, x: torch.Tensor, eps: float, params: Params = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN-IBP bounds ``(lower, upper)``, each (N, classes), on ``model``'s logits over the box
    (Zhang et al. 2020): IBP bounds for the intermediate layers, one backward CROWN pass for the
    logits, with the specification ``[I; -I]`` (an upper bound is minus the lower bound of
    :math:`-z`). Not always tighter than :func:`ibp_bounds` (see the module's docstring).
    Chapter ``19_certified_linf_robustness``."""
    _check_input(x, eps)
    layers = bound_layers(model)
    lo, hi = input_box(x, eps)
    _, _, seen = _ibp(layers, lo, hi, params)
    k = _num_classes(layers, x, params)
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    spec = torch.cat([eye, -eye]).unsqueeze(0).expand(x.shape[0], 2 * k, k)
    both = _crown_lower(layers, seen, spec, lo, hi, params)
    return both[:, :k], -both[:, k:]


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "ibp",
                  params: Params = None) -> torch.Tensor:
    """Lower bounds :math:`\\underline m_j \\le \\min_{x' \\in B} z_y(x') - z_j(x')`, shape (N, classes),
    with :math:`\\underline m_y = 0`: IBP with the last layer elided (``method="ibp"``) or CROWN-IBP
    started from the margin specification (``"crown-ibp"``). ``x`` is certified when every
    :math:`\\underline m_j > 0`, :math:`j \\ne y` (:func:`~robustfl_lib.certified.verified_accuracy`); the
    certified losses use :math:`-\\underline m` as worst-case logits. Chapter ``19_certified_linf_robustness``."""
    _check_input(x, eps)
    _check_method(method)
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.shape != x.shape[:1]:
        raise ValueError(f"y must be integer labels of shape ({x.shape[0]},)")
    layers = bound_layers(model)
    k = _num_classes(layers, x, params)
    y = y.to(x.device).long()
    if y.numel() and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must be in [0, {k}), got values in [{int(y.min())}, {int(y.max())}]")
    return _margins(layers, x, y, eps, method, params, k)
