"""Serial numba kernels for small CPU tensors: one compiled call per forward or backward.

For a tensor of a few thousand values, a batch-norm step in eager torch is some twenty small
ops of 2-3 microseconds each, and :mod:`batchnorm._kernels.cpu`'s parallel kernels pay a
thread-pool launch and their planning. Here every pass over the data is one call of a serial
kernel that keeps everything in float64:

    mean  = (1/m) sum x                      (float64 sum of the input values)
    var   = (1/m) sum (x - mean)^2           (second pass around the float64 mean: no cancellation)
    y     = (x - mean) * (weight / sqrt(var + eps)) + bias
    dbeta = sum g,   dgamma = sum g x_hat,   x_hat = (x - mean) * invstd
    dx    = weight * invstd * (g - dbeta / m - x_hat * dgamma / m)

x - mean is formed in float64, so mean 1e4 / std 1e-2 in float32 keeps the spread's digits.

Layouts: contiguous ``(N, C, S)`` ("ncs": S > 1 contiguous values per channel and sample) and
channels-last / 2D ``(M, C)`` ("mc": C innermost), as :func:`batchnorm._kernels.cpu.layout_of`
names them; float32 and float64 only. Same contracts as :mod:`batchnorm._kernels.torch_ops`
(mean returned in float64, var/dgamma/dbeta in ``acc_dtype``); ``batch_stats``,
``backward_sums`` and ``backward_apply`` are torch_ops' own. Compiled on first call, never at
import; never differentiable (the functional layers use torch_ops for create_graph).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import cpu
from .dispatch import AUTO_MIN_NUMEL, BACKEND_API
from .torch_ops import backward_apply, backward_sums, batch_stats  # re-exported: same contracts

__all__ = list(BACKEND_API)

_compiled: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------
# Kernels (compiled on first use). x, g, y, dx: (N, C, S) for ncs or (M, C) for mc, C-contiguous;
# w, b, mean, var/inv: (C,) float64.


def _py_train_ncs(x, w, b, eps, y, mean, var):  # pragma: no cover - runs compiled
    n, c, s = x.shape
    m = n * s
    for k in range(c):
        acc = 0.0
        for i in range(n):
            for j in range(s):
                acc += x[i, k, j]
        mu = acc / m
        acc = 0.0
        for i in range(n):
            for j in range(s):
                d = x[i, k, j] - mu
                acc += d * d
        v = acc / m
        mean[k] = mu
        var[k] = v
        sc = w[k] / np.sqrt(v + eps)
        for i in range(n):
            for j in range(s):
                y[i, k, j] = (x[i, k, j] - mu) * sc + b[k]


def _py_train_mc(x, w, b, eps, y, mean, var):  # pragma: no cover - runs compiled
    m, c = x.shape
    acc = np.zeros(c)
    for i in range(m):
        for k in range(c):
            acc[k] += x[i, k]
    for k in range(c):
        mean[k] = acc[k] / m
        acc[k] = 0.0
    for i in range(m):
        for k in range(c):
            d = x[i, k] - mean[k]
            acc[k] += d * d
    sc = np.empty(c)
    for k in range(c):
        v = acc[k] / m
        var[k] = v
        sc[k] = w[k] / np.sqrt(v + eps)
    for i in range(m):
        for k in range(c):
            y[i, k] = (x[i, k] - mean[k]) * sc[k] + b[k]


def _py_affine_ncs(x, mean, sc, b, y):  # pragma: no cover - runs compiled
    n, c, s = x.shape
    for i in range(n):
        for k in range(c):
            for j in range(s):
                y[i, k, j] = (x[i, k, j] - mean[k]) * sc[k] + b[k]


def _py_affine_mc(x, mean, sc, b, y):  # pragma: no cover - runs compiled
    m, c = x.shape
    for i in range(m):
        for k in range(c):
            y[i, k] = (x[i, k] - mean[k]) * sc[k] + b[k]


def _py_bwd_ncs(g, x, mean, inv, w, dx, sums):  # pragma: no cover - runs compiled
    n, c, s = x.shape
    m = n * s
    for k in range(c):
        sg = 0.0
        sgx = 0.0
        mu = mean[k]
        for i in range(n):
            for j in range(s):
                gv = np.float64(g[i, k, j])
                sg += gv
                sgx += gv * (x[i, k, j] - mu)
        dgamma = sgx * inv[k]
        sums[0, k] = dgamma
        sums[1, k] = sg
        k1 = w[k] * inv[k]
        k2 = k1 * inv[k] * dgamma / m  # dx = k1 g - k2 (x - mu) - k1 sg/m
        k3 = k1 * sg / m
        for i in range(n):
            for j in range(s):
                dx[i, k, j] = k1 * g[i, k, j] - k2 * (x[i, k, j] - mu) - k3


def _py_bwd_mc(g, x, mean, inv, w, dx, sums):  # pragma: no cover - runs compiled
    m, c = x.shape
    sg = np.zeros(c)
    sgx = np.zeros(c)
    for i in range(m):
        for k in range(c):
            gv = np.float64(g[i, k])
            sg[k] += gv
            sgx[k] += gv * (x[i, k] - mean[k])
    k1 = np.empty(c)
    k2 = np.empty(c)
    k3 = np.empty(c)
    for k in range(c):
        dgamma = sgx[k] * inv[k]
        sums[0, k] = dgamma
        sums[1, k] = sg[k]
        k1[k] = w[k] * inv[k]
        k2[k] = k1[k] * inv[k] * dgamma / m
        k3[k] = k1[k] * sg[k] / m
    for i in range(m):
        for k in range(c):
            dx[i, k] = k1[k] * g[i, k] - k2[k] * (x[i, k] - mean[k]) - k3[k]


def _kernel(name: str) -> Any:
    """The compiled (serial, cached) dispatcher of kernel ``name``, created on first request."""
    kern = _compiled.get(name)
    if kern is None:
        kern = _compiled[name] = cpu._jit(globals()["_py" + name], fastmath=cpu._FASTMATH)
    return kern


# --------------------------------------------------------------------------------------------
# Python side.


def supports(x: Tensor, *, check_layout: bool = True) -> bool:
    """True for non-empty CPU float32/float64 tensors with fewer than ``dispatch.AUTO_MIN_NUMEL``
    elements, of 2 to 5 dims laid out contiguously or channels-last (``check_layout``)."""
    return (
        isinstance(x, Tensor)
        and 0 < x.numel() < AUTO_MIN_NUMEL
        and (x.dtype == torch.float32 or x.dtype == torch.float64)
        and x.device.type == "cpu"
        and x.layout == torch.strided
        and not x.is_neg()
        and (not check_layout or cpu.layout_of(x) is not None)
    )


def _view(t: Tensor, layout: str) -> np.ndarray:
    """A numpy view of t as (N, C, S) for ncs or (M, C) for mc (numba compiles strided
    arrays too); a copy only for a tensor whose strides do not allow that shape (a gradient)."""
    t = t.detach()
    if t.dim() == 2:
        return t.numpy()
    if layout == "ncs":
        return t.reshape(t.shape[0], t.shape[1], -1).numpy()
    return t.movedim(1, -1).reshape(-1, t.shape[1]).numpy()


def _out(x: Tensor, layout: str) -> tuple[Tensor, np.ndarray]:
    """An empty tensor like x (same memory format) and its writable numpy view (never a copy:
    ``view`` raises rather than return one)."""
    y = torch.empty_like(x)
    if x.dim() == 2:
        return y, y.numpy()
    if layout == "ncs":
        return y, y.view(x.shape[0], x.shape[1], -1).numpy()
    return y, y.movedim(1, -1).view(-1, x.shape[1]).numpy()


def _vec(v: Tensor | None, c: int, fill: float) -> np.ndarray:
    """The values of a per-channel vector v (C,) as a numpy array (float32 or float64: the
    kernels widen to float64), or ``fill`` everywhere in float64 when v is None."""
    if v is None:
        return np.full(c, fill)
    v = v.detach()
    if v.dtype != torch.float32 and v.dtype != torch.float64:
        v = v.to(torch.float64)
    return v.reshape(c).numpy()


def _layout(x: Tensor) -> str:
    """``"ncs"`` or ``"mc"`` for a tensor :func:`supports`; ValueError otherwise."""
    layout = cpu.layout_of(x) if supports(x, check_layout=False) else None  # layout_of once
    if layout is None:
        raise ValueError(
            "batchnorm._kernels.cpu_small: expected a small contiguous or channels-last CPU "
            f"float32/float64 tensor, got shape {tuple(x.shape)}, dtype {x.dtype}, strides {x.stride()}"
        )
    return layout


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: (y, mean float64, biased var in ``acc_dtype``), as torch_ops.

    Shape: x (N, C, *) -> y (N, C, *) in x's dtype and memory format, mean (C,), var (C,).
    """
    layout = _layout(x)
    c = x.shape[1]
    y, yv = _out(x, layout)
    mean = np.empty(c)
    var = np.empty(c, dtype=np.float32 if x.dtype == torch.float32 else np.float64)  # acc_dtype
    _kernel("_train_" + layout)(_view(x, layout), _vec(weight, c, 1.0), _vec(bias, c, 0.0), float(eps), yv, mean, var)
    return y, torch.from_numpy(mean), torch.from_numpy(var)


def eval_forward(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Inference forward y = weight * (x - mean) / sqrt(var + eps) + bias, all in float64.

    Shape: x (N, C, *) -> y of the same shape, dtype and memory format; mean, var (C,).
    """
    layout = _layout(x)
    c = x.shape[1]
    y, yv = _out(x, layout)
    sc = 1.0 / np.sqrt(_vec(var, c, 1.0) + eps)
    if weight is not None:
        sc = sc * _vec(weight, c, 1.0)
    _kernel("_affine_" + layout)(_view(x, layout), _vec(mean, c, 0.0), sc, _vec(bias, c, 0.0), yv)
    return y


def backward(
    grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Training backward with x_hat = (x - mean) * invstd for the given mean and invstd (C,):

        dbeta = sum g,  dgamma = sum g x_hat,  dx = weight invstd (g - dbeta/m - x_hat dgamma/m)

    Returns (dx in x's dtype and memory format, dgamma, dbeta in ``acc_dtype``).

    Shape: grad_y, x (N, C, *) -> dx (N, C, *), dgamma (C,), dbeta (C,).
    """
    layout = _layout(x)
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype:
        raise ValueError(
            f"batchnorm._kernels.cpu_small.backward: expected grad_y of shape {tuple(x.shape)} and "
            f"dtype {x.dtype}, got {tuple(grad_y.shape)} {grad_y.dtype}"
        )
    c = x.shape[1]
    dx, dxv = _out(x, layout)
    sums = np.empty((2, c), dtype=np.float32 if x.dtype == torch.float32 else np.float64)  # acc_dtype
    _kernel("_bwd_" + layout)(
        _view(grad_y, layout), _view(x, layout), _vec(mean, c, 0.0), _vec(invstd, c, 1.0), _vec(weight, c, 1.0), dxv, sums
    )
    out = torch.from_numpy(sums)
    return dx, out[0], out[1]

