"""Folding an eval-mode batch norm into a neighbouring Linear / Conv: tensor and module level.

In eval mode a batch norm is a fixed per-channel affine map

    BN(x) = x * s + t,   s = gamma / sqrt(running_var + eps),   t = beta - running_mean * s

(gamma = 1 and beta = 0 when the layer has no affine parameters), so it merges into the layer
next to it:

- BN after a layer  y = W x + b:      W' = s[o] * W[o, ...],   b' = s * b + t
- BN before a layer y = W (x s + t) + b:   W'[o, i, ...] = W[o, i, ...] * s[i],
  b'[o] = b[o] + sum_{i, k} W[o, i, k] * t[i]

The second form needs every output to see the whole kernel window of BN outputs: true for a
Linear, and for a Conv whose padding is 0, or whose padding mode is reflect/replicate/circular
(padding copies BN outputs, and a per-channel affine map commutes with copying). Zero padding
pads the BN *output* with 0, which is not ``t`` after folding, so it is refused. A transposed
conv is refused for the same reason (borders and strides receive a varying number of terms).

Weight layouts (groups g): Conv ``(out, in/g, *k)``; ConvTranspose ``(in, out/g, *k)``; for
the latter output channel ``o = group * (out/g) + j`` lives in weight column j of the rows of its
group. All folding is computed in float64 and cast back to the layer's dtype; dtype, device and
``requires_grad`` of the parameters are kept.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "bn_scale_shift",
    "fold_bn_weights",
    "fold_bn_into_next_weights",
    "fold_linear_bn",
    "fold_conv_bn",
    "fold_bn_linear",
    "fold_bn_conv",
]

_F64 = torch.float64


def bn_scale_shift(
    mean: Tensor, var: Tensor, eps: float, gamma: Tensor | None = None, beta: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(s, t) with ``BN_eval(x) = x * s + t`` per channel, in float64.

    ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``; gamma/beta None mean 1/0.
    Shape: all inputs (C,) -> two (C,) float64 tensors.
    """
    s = torch.rsqrt(var.detach().to(_F64) + float(eps))
    if gamma is not None:
        s = s * gamma.detach().to(_F64)
    t = -mean.detach().to(_F64) * s
    if beta is not None:
        t = t + beta.detach().to(_F64)
    return s, t


def _per_out_channel(s: Tensor, w: Tensor, transposed: bool, groups: int) -> Tensor:
    """``s`` (out,) reshaped to broadcast over weight ``w`` along its output-channel axis."""
    extra = (1,) * (w.dim() - 2)
    if not transposed:
        # Conv/Linear weight (out, in/g, *k): out is dim 0 -> (out, 1, 1, ...)
        return s.reshape(-1, *((1,) * (w.dim() - 1)))
    # ConvTranspose weight (in, out/g, *k): row r of group r // (in/g) holds outputs
    # group * (out/g) + j in column j -> (g, out/g) -> (in, out/g, 1, ...)
    in_per_group = w.shape[0] // groups
    s_g = s.reshape(groups, -1)  # (g, out/g)
    return s_g.repeat_interleave(in_per_group, dim=0).reshape(w.shape[0], w.shape[1], *extra)


def fold_bn_weights(
    w: Tensor,
    b: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weights of ``BN(layer(x))`` as one layer: ``W' = s[o] W[o]``, ``b' = s b + t`` (float64).

    Args:
        w: Linear (out, in), Conv (out, in/groups, *k) or, with ``transposed``, ConvTranspose
            (in, out/groups, *k) weight.
        b: the layer's bias (out,) or None (zero).
        mean, var, eps, gamma, beta: the batch norm's running statistics (var unbiased, as
            stored), eps and affine parameters (None: identity), each (out,).

    Returns: (W', b') in float64, shapes (w.shape, (out,)).
    """
    s, t = bn_scale_shift(mean, var, eps, gamma, beta)
    w64 = w.detach().to(_F64)
    w_new = w64 * _per_out_channel(s, w64, transposed, groups)
    b_new = t if b is None else s * b.detach().to(_F64) + t
    return w_new, b_new


def fold_bn_into_next_weights(
    w: Tensor,
    b: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weights of ``layer(BN(x))`` for a Linear (out, in) or Conv (out, in/groups, *k) ``w``.

    ``W'[o, i, k] = W[o, i, k] * s[c(o, i)]``, ``b'[o] = b[o] + sum_{i,k} W[o, i, k] t[c(o, i)]``
    where ``c(o, i) = (o // (out/groups)) * (in/groups) + i`` is the input channel. float64.
    Valid only where every output sees a full window of BN outputs (see module docstring).
    """
    s, t = bn_scale_shift(mean, var, eps, gamma, beta)
    w64 = w.detach().to(_F64)
    out, in_per_group = w64.shape[0], w64.shape[1]
    out_per_group = out // groups
    # input channel of weight entry (o, i): (out, in/g) -> broadcast over the kernel dims
    chan = (torch.arange(out) // out_per_group)[:, None] * in_per_group + torch.arange(in_per_group)[None, :]
    extra = (1,) * (w64.dim() - 2)
    s_oi = s[chan].reshape(out, in_per_group, *extra)
    t_oi = t[chan].reshape(out, in_per_group, *extra)
    w_new = w64 * s_oi
    shift = (w64 * t_oi).flatten(1).sum(dim=1)  # (out,)
    b_new = shift if b is None else b.detach().to(_F64) + shift
    return w_new, b_new


def _check_bn_eval(bn: nn.Module, where: str) -> None:
    if bn.training and not getattr(bn, "frozen", False):
        raise ValueError(f"{where}: batch norm is in training mode; folding needs eval mode (call .eval())")
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise ValueError(
            f"{where}: the batch norm has no running statistics (track_running_stats=False): it normalizes with batch statistics in eval mode and cannot be folded"
        )


def _bn_tensors(bn: nn.Module) -> tuple[Tensor, Tensor, float, Tensor | None, Tensor | None]:
    return bn.running_mean, bn.running_var, float(bn.eps), getattr(bn, "weight", None), getattr(bn, "bias", None)


def _assign(layer: nn.Module, w: Tensor, b: Tensor) -> nn.Module:
    """Write float64 (w, b) into ``layer`` in its weight's dtype/device, keeping requires_grad."""
    ref = layer.weight
    with torch.no_grad():
        layer.weight.copy_(w.to(ref.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(b.to(device=ref.device, dtype=ref.dtype), requires_grad=ref.requires_grad)
        else:
            layer.bias.copy_(b.to(layer.bias.dtype))
    return layer


def fold_linear_bn(linear: nn.Linear, bn: nn.Module, *, inplace: bool = False) -> nn.Linear:
    """A Linear computing ``bn(linear(x))`` for eval-mode ``bn`` over (N, out) outputs."""
    where = "fold_linear_bn"
    _check_bn_eval(bn, where)
    if bn.num_features != linear.out_features:
        raise ValueError(f"{where}: expected a batch norm over {linear.out_features} features, got {bn.num_features}")
    w, b = fold_bn_weights(linear.weight, linear.bias, *_bn_tensors(bn))
    return _assign(linear if inplace else copy.deepcopy(linear), w, b)


def fold_conv_bn(conv: _ConvNd, bn: nn.Module, *, inplace: bool = False) -> _ConvNd:
    """A Conv/ConvTranspose (1d/2d/3d, any groups/dilation/stride) computing ``bn(conv(x))``."""
    where = "fold_conv_bn"
    _check_bn_eval(bn, where)
    if bn.num_features != conv.out_channels:
        raise ValueError(f"{where}: expected a batch norm over {conv.out_channels} channels, got {bn.num_features}")
    w, b = fold_bn_weights(conv.weight, conv.bias, *_bn_tensors(bn), transposed=conv.transposed, groups=conv.groups)
    return _assign(conv if inplace else copy.deepcopy(conv), w, b)


def fold_bn_linear(bn: nn.Module, linear: nn.Linear, *, inplace: bool = False) -> nn.Linear:
    """A Linear computing ``linear(bn(x))`` for eval-mode ``bn`` over (N, in) inputs."""
    where = "fold_bn_linear"
    _check_bn_eval(bn, where)
    if bn.num_features != linear.in_features:
        raise ValueError(f"{where}: expected a batch norm over {linear.in_features} features, got {bn.num_features}")
    w, b = fold_bn_into_next_weights(linear.weight, linear.bias, *_bn_tensors(bn))
    return _assign(linear if inplace else copy.deepcopy(linear), w, b)


def conv_after_bn_problem(conv: _ConvNd) -> str | None:
    """Why ``conv(bn(x))`` cannot be folded into ``conv`` (None if it can)."""
    if conv.transposed:
        return "a transposed conv after a batch norm: border outputs see fewer inputs, so the BN shift does not fold"
    padded = conv.padding == "same" or (not isinstance(conv.padding, str) and any(p != 0 for p in conv.padding))
    if padded and conv.padding_mode == "zeros":
        return "the conv after it zero-pads the BN output (padding != 0), which does not commute with the BN shift"
    return None


def fold_bn_conv(bn: nn.Module, conv: _ConvNd, *, inplace: bool = False) -> _ConvNd:
    """A Conv computing ``conv(bn(x))``: needs padding 0 or a reflect/replicate/circular padding mode."""
    where = "fold_bn_conv"
    _check_bn_eval(bn, where)
    problem = conv_after_bn_problem(conv)
    if problem is not None:
        raise ValueError(f"{where}: cannot fold: {problem}")
    if bn.num_features != conv.in_channels:
        raise ValueError(f"{where}: expected a batch norm over {conv.in_channels} channels, got {bn.num_features}")
    w, b = fold_bn_into_next_weights(conv.weight, conv.bias, *_bn_tensors(bn), groups=conv.groups)
    return _assign(conv if inplace else copy.deepcopy(conv), w, b)
