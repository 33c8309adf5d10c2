"""Serial numba kernels for small CPU tensors: one compiled call per forward or backward.

For a tensor of a few thousand values, a batch-norm step in eager torch is some twenty small
ops of 2-3 microseconds each, and `batchnorm._kernels.cpu`'s parallel kernels pay a
thread-pool launch and their planning. Here every pass over the data is one call of a serial
kernel that keeps everything in float64:

    mean  = (1/m) sum x                      (float64 sum of the input values)
    var   = (1/m) sum (x - mean)^2           (second pass around the float64 mean: no cancellation)
    y     = (x - mean) * (weight / sqrt(var + eps)) + bias
    dbeta = sum g,   dgamma = sum g x_hat,   x_hat = (x - mean) * invstd
    dx    = weight * invstd * (g - dbeta / m - x_hat * dgamma / m)

x - mean is formed in float64, so mean 1e4 / std 1e-2 in float32 keeps the spread's digits.

Layouts: contiguous ``(N, C, S)`` ("ncs": S > 1 contiguous values per channel and sample) and
channels-last / 2D ``(M, C)`` ("mc": C innermost), as `batchnorm._kernels.cpu_plan.layout_of`
names them, both read as a table of rows whose contiguous columns are channels (mc) or runs of
S columns per channel (ncs), so the inner loops are long and vectorize; float32 and float64
only. Same contracts as `batchnorm._kernels.torch_ops`
(mean returned in float64, var/dgamma/dbeta in ``acc_dtype``); ``batch_stats``,
``backward_sums`` and ``backward_apply`` are torch_ops' own. Compiled on first call, never at
import; never differentiable (the functional layers use torch_ops for create_graph).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import cpu_plan, cpu_runtime
from .dispatch import AUTO_MIN_NUMEL, BACKEND_API
from .torch_ops import backward_apply, backward_sums, batch_stats  # noqa: F401 - re-exported: same contracts

__all__ = list(BACKEND_API)

_compiled: dict[str, Any] = {}
_create_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Kernels (compiled on first use). Every tensor is seen as a 2D table (R rows, L columns) whose
# columns k*s .. k*s + s - 1 hold channel k: R = N and L = C*S for ncs (s = S), R = N*S and
# L = C for mc (s = 1). The inner loops run along a row (contiguous, long: they vectorize),
# accumulating per column in float64; per-channel values are folded from and spread back to
# the columns. w, b, mean, var, inv: (C,).


def _fold(cols, s, out):  # pragma: no cover - runs compiled
    """out[k] = sum of cols[k*s : k*s + s]."""
    for k in range(out.shape[0]):
        acc = 0.0
        for j in range(s):
            acc += cols[k * s + j]
        out[k] = acc


def _spread(v, s, cols):  # pragma: no cover - runs compiled
    """cols[k*s + j] = v[k] for every j < s."""
    for k in range(v.shape[0]):
        for j in range(s):
            cols[k * s + j] = v[k]


def _py_train(x, s, w, b, eps, y, mean, var):  # pragma: no cover - runs compiled
    r, ln = x.shape
    c = ln // s
    m = r * s
    cols = np.zeros(ln)
    for i in range(r):
        for t in range(ln):
            cols[t] += x[i, t]
    per = np.empty(c)
    _fold(cols, s, per)
    for k in range(c):
        per[k] /= m
        mean[k] = per[k]
    mu = np.empty(ln)
    _spread(per, s, mu)
    cols[:] = 0.0
    for i in range(r):
        for t in range(ln):
            d = x[i, t] - mu[t]
            cols[t] += d * d
    _fold(cols, s, per)
    for k in range(c):
        v = per[k] / m
        var[k] = v
        per[k] = w[k] / np.sqrt(v + eps)
    _apply(x, s, mean, per, b, y)


def _apply(x, s, mean, sc, b, y):  # pragma: no cover - runs compiled
    """y = (x - mean) * sc + b with per-channel mean, sc, b (C,) spread over the columns."""
    r, ln = x.shape
    mu = np.empty(ln)
    _spread(mean, s, mu)
    scc = np.empty(ln)
    _spread(sc, s, scc)
    sh = np.empty(ln)
    _spread(b, s, sh)
    for i in range(r):
        for t in range(ln):
            y[i, t] = (x[i, t] - mu[t]) * scc[t] + sh[t]


def _py_affine(x, s, mean, sc, b, y):  # pragma: no cover - runs compiled
    _apply(x, s, mean, sc, b, y)


def _py_bwd(g, x, s, mean, inv, w, dx, sums):  # pragma: no cover - runs compiled
    r, ln = x.shape
    c = ln // s
    m = r * s
    mu = np.empty(ln)
    _spread(mean, s, mu)
    cg = np.zeros(ln)
    cgx = np.zeros(ln)
    for i in range(r):
        for t in range(ln):
            gv = np.float64(g[i, t])
            cg[t] += gv
            cgx[t] += gv * (x[i, t] - mu[t])
    sg = np.empty(c)
    sgx = np.empty(c)
    _fold(cg, s, sg)
    _fold(cgx, s, sgx)
    k1 = np.empty(c)
    k2 = np.empty(c)
    k3 = np.empty(c)
    for k in range(c):  # dx = k1 g - k2 (x - mean) - k3
        dgamma = sgx[k] * inv[k]
        sums[0, k] = dgamma
        sums[1, k] = sg[k]
        k1[k] = w[k] * inv[k]
        k2[k] = k1[k] * inv[k] * dgamma / m
        k3[k] = k1[k] * sg[k] / m
    c1 = np.empty(ln)
    c2 = np.empty(ln)
    c3 = np.empty(ln)
    _spread(k1, s, c1)
    _spread(k2, s, c2)
    _spread(k3, s, c3)
    for i in range(r):
        for t in range(ln):
            dx[i, t] = c1[t] * g[i, t] - c2[t] * (x[i, t] - mu[t]) - c3[t]


def _py_update(rm, rv, mean, var, f, unbias, kappa_max, save_mean, save_invstd):  # pragma: no cover - runs compiled
    # code 1: some |save_mean| * save_invstd > kappa_max (nothing written); 2: a statistic is not
    # finite (nothing written); 0: rm, rv updated in float64, rounded once
    c = rm.shape[0]
    for k in range(save_mean.shape[0]):
        if abs(np.float64(save_mean[k])) * abs(np.float64(save_invstd[k])) > kappa_max:
            return 1
    for k in range(c):
        if not (np.isfinite(mean[k]) and np.isfinite(var[k])):
            return 2
    for k in range(c):
        rm[k] = np.float64(rm[k]) * (1.0 - f) + f * np.float64(mean[k])
        rv[k] = np.float64(rv[k]) * (1.0 - f) + f * (np.float64(var[k]) * unbias)
    return 0


def _py_check(save_mean, save_invstd, kappa_max):  # pragma: no cover - runs compiled
    # code 2: a statistic is not finite; 1: some |mean| * invstd > kappa_max; 0: fine. The same
    # rule as step_ext.cpp's `check`, written like it without a branch in the loop (flags OR-ed),
    # which LLVM vectorizes: x * 0.0 is 0 for a finite x and NaN otherwise
    not_finite = ill = False
    for k in range(save_mean.shape[0]):
        m, inv = np.float64(save_mean[k]), np.float64(save_invstd[k])
        not_finite |= m * 0.0 + inv * 0.0 != 0.0
        ill |= abs(m) * abs(inv) > kappa_max
    return 2 if not_finite else (1 if ill else 0)


def _py_check_fixed(mean, var, eps, kappa_max):  # pragma: no cover - runs compiled
    # as _py_check, for given statistics (step_ext.cpp's `check_fixed`): invstd = 1 / sqrt(var +
    # eps), var + eps <= 0 counts as not finite, |m| > kappa_max * sqrt(v) tested as m^2 > k^2 v
    k2 = kappa_max * kappa_max
    not_finite = ill = False
    for k in range(mean.shape[0]):
        m, v = np.float64(mean[k]), np.float64(var[k]) + eps
        not_finite |= (m * 0.0 + v * 0.0 != 0.0) | (v <= 0.0)
        ill |= m * m > k2 * v
    return 2 if not_finite else (1 if ill else 0)


def _kernel(name: str) -> Any:
    """The compiled (serial, cached) dispatcher of kernel ``name``, created on first request.

    Creation is serialized by a lock: threads whose first calls race must not jit the helpers
    twice (numba refuses to jit a dispatcher) nor see a kernel before its helpers exist.
    """
    kern = _compiled.get(name)
    if kern is not None:
        return kern
    with _create_lock:
        if "helpers" not in _compiled:  # the helpers the kernels call, jitted once, first
            for helper in ("_fold", "_spread", "_apply"):  # _apply calls _spread: jitted after it
                globals()[helper] = cpu_runtime.jit(globals()[helper], fastmath=cpu_runtime.FASTMATH)
            _compiled["helpers"] = True
        if name not in _compiled:
            _compiled[name] = cpu_runtime.jit(globals()["_py" + name], fastmath=cpu_runtime.FASTMATH)
    return _compiled[name]


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
        and (not check_layout or cpu_plan.layout_of(x) is not None)
    )


def _table(t: Tensor, layout: str) -> tuple[np.ndarray, int]:
    """(a numpy view of t as the kernels' (R, L) table, s = columns per channel). A copy only for
    a tensor whose strides do not allow that shape (a gradient laid out unlike the input);
    stride-0 (expanded) tensors stay views, which numba reads as strided arrays."""
    t = t.detach()
    if t.dim() == 2:
        return t.numpy(), 1
    if layout == "ncs":
        return t.reshape(t.shape[0], -1).numpy(), t.numel() // (t.shape[0] * t.shape[1])
    return t.movedim(1, -1).reshape(-1, t.shape[1]).numpy(), 1


def _tables(x: Tensor, g: Tensor | None = None) -> tuple[Tensor, np.ndarray, np.ndarray, int, np.ndarray | None]:
    """Everything a kernel call needs about its (N, C, *) operands, in one call (this runs on
    every small step): (out, out's writable (R, L) view, x's table, columns per channel, g's
    table or None). ``out`` is an empty tensor like x (same memory format); its view is never a
    copy (``view`` raises rather than return one). ValueError for a tensor `supports`
    would refuse (dispatch has asked it already; direct callers get the check here)."""
    layout = cpu_plan.layout_of(x)
    if (
        layout is None
        or not (x.dtype == torch.float32 or x.dtype == torch.float64)
        or x.device.type != "cpu"
        or not 0 < x.numel() < AUTO_MIN_NUMEL
        or x.is_neg()
    ):
        raise ValueError(
            "batchnorm._kernels.cpu_small: expected a small contiguous or channels-last CPU "
            f"float32/float64 tensor, got shape {tuple(x.shape)}, dtype {x.dtype}, strides {x.stride()}"
        )
    y = torch.empty_like(x)
    x = x.detach()
    if x.dim() == 2:  # (N, C): the tables are the tensors themselves
        return y, y.numpy(), x.numpy(), 1, None if g is None else g.detach().numpy()
    if layout == "ncs":  # (N, C*S): S columns per channel
        n = x.shape[0]
        gt = None if g is None else g.detach().reshape(n, -1).numpy()
        return y, y.view(n, -1).numpy(), x.reshape(n, -1).numpy(), x.numel() // (n * x.shape[1]), gt
    gt = None if g is None else _table(g, layout)[0]  # channels-last: (N*S, C)
    return y, y.movedim(1, -1).view(-1, x.shape[1]).numpy(), x.movedim(1, -1).reshape(-1, x.shape[1]).numpy(), 1, gt


_WIDE = (torch.float32, torch.float64)


def _vecs(c: int, *pairs: tuple[Tensor | None, float]) -> list[np.ndarray]:
    """The values of per-channel vectors (C,) as numpy arrays, one ``(v, fill)`` pair each
    (float32 or float64: the kernels widen to float64), ``fill`` everywhere in float64 for a
    None; one call for all of a kernel's vectors."""
    out = []
    for v, fill in pairs:
        if v is None:
            out.append(np.full(c, fill))
            continue
        v = v.detach()
        if v.dtype not in _WIDE:
            v = v.to(torch.float64)
        out.append(v.reshape(c).numpy())
    return out


UPDATED, ILL_CONDITIONED, NOT_FINITE = 0, 1, 2
"""The results of `update_running`."""


def update_running(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    factor: float,
    unbias: float,
    kappa_max: float = np.inf,
    save_mean: np.ndarray | None = None,
    save_invstd: np.ndarray | None = None,
) -> int:
    """The running-statistics rule on CPU memory in one compiled call (a dozen NumPy calls cost
    more than a small layer's kernels):

        running_mean = (1 - f) * running_mean + f * mean
        running_var  = (1 - f) * running_var  + f * var * unbias       (in float64, rounded once)

    Returns ``NOT_FINITE`` without writing when a statistic is not finite, ``ILL_CONDITIONED``
    without writing when some ``|save_mean| * save_invstd > kappa_max`` (a precision check of
    the kernel that produced the statistics), else ``UPDATED``. Arrays (C,), float32/float64.
    """
    empty = mean[:0]
    return int(
        (_compiled.get("_update") or _kernel("_update"))(
            running_mean,
            running_var,
            mean,
            var,
            float(factor),
            float(unbias),
            float(kappa_max),
            empty if save_mean is None else save_mean,
            empty if save_invstd is None else save_invstd,
        )
    )


def check_statistics(save_mean: np.ndarray, save_invstd: np.ndarray, kappa_max: float) -> int:
    """A kernel's batch statistics (mean, invstd per channel), checked in one compiled call:
    ``NOT_FINITE`` when one is not finite, else ``ILL_CONDITIONED`` when some
    ``|mean| * invstd > kappa_max``, else ``UPDATED`` (nothing to object to)."""
    return int((_compiled.get("_check") or _kernel("_check"))(save_mean, save_invstd, float(kappa_max)))


def check_fixed_statistics(mean: np.ndarray, var: np.ndarray, eps: float, kappa_max: float) -> int:
    """`check_statistics` for given statistics (eval): the invstd is ``1 / sqrt(var + eps)``;
    a variance with ``var + eps <= 0`` counts as not finite."""
    return int((_compiled.get("_check_fixed") or _kernel("_check_fixed"))(mean, var, float(eps), float(kappa_max)))


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: (y, mean float64, biased var in ``acc_dtype``), as torch_ops.

    Shape: x (N, C, *) -> y (N, C, *) in x's dtype and memory format, mean (C,), var (C,).
    """
    c = x.shape[1]
    y, yv, xt, cols, _ = _tables(x)
    mean = np.empty(c)
    var = np.empty(c, dtype=np.float32 if x.dtype == torch.float32 else np.float64)  # acc_dtype
    w, b = _vecs(c, (weight, 1.0), (bias, 0.0))
    (_compiled.get("_train") or _kernel("_train"))(xt, cols, w, b, float(eps), yv, mean, var)
    return y, torch.from_numpy(mean), torch.from_numpy(var)


def eval_forward(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Inference forward y = weight * (x - mean) / sqrt(var + eps) + bias, all in float64.

    Shape: x (N, C, *) -> y of the same shape, dtype and memory format; mean, var (C,).
    """
    c = x.shape[1]
    y, yv, xt, cols, _ = _tables(x)
    # in float64; var + eps = 0 or < 0 gives inf/NaN, like torch (torch ops: no NumPy warnings)
    scale = (var.detach().reshape(c).to(torch.float64) + eps).rsqrt_()
    if weight is not None:
        scale.mul_(weight.detach().reshape(c))
    m, b = _vecs(c, (mean, 0.0), (bias, 0.0))
    (_compiled.get("_affine") or _kernel("_affine"))(xt, cols, m, scale.numpy(), b, yv)
    return y


def backward(
    grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Training backward with x_hat = (x - mean) * invstd for the given mean and invstd (C,):

        dbeta = sum g,  dgamma = sum g x_hat,  dx = weight invstd (g - dbeta/m - x_hat dgamma/m)

    Returns (dx in x's dtype and memory format, dgamma, dbeta in ``acc_dtype``).

    Shape: grad_y, x (N, C, *) -> dx (N, C, *), dgamma (C,), dbeta (C,).
    """
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype:
        raise ValueError(
            f"batchnorm._kernels.cpu_small.backward: expected grad_y of shape {tuple(x.shape)} and "
            f"dtype {x.dtype}, got {tuple(grad_y.shape)} {grad_y.dtype}"
        )
    c = x.shape[1]
    dx, dxv, xt, cols, gt = _tables(x, grad_y)
    sums = np.empty((2, c), dtype=np.float32 if x.dtype == torch.float32 else np.float64)  # acc_dtype
    m, inv, w = _vecs(c, (mean, 0.0), (invstd, 1.0), (weight, 1.0))
    (_compiled.get("_bwd") or _kernel("_bwd"))(gt, xt, cols, m, inv, w, dxv, sums)
    out = torch.from_numpy(sums)
    return dx, out[0], out[1]
