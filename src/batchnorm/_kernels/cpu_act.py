"""Fused CPU backward of batch norm + invertible activation from the saved output z (numba).

Used by `batchnorm.functional_act` for CPU tensors that `cpu.supports`. Per element,
with g = dL/dz (mode 1: leaky_relu(slope), mode 2: elu(alpha)):

    y  = act^-1(z)   = z > 0 ? z : (leaky: z / slope;  elu: log1p(max(z / alpha, -1 + tiny)))
    dy = g * act'(y) = z > 0 ? g : (leaky: g * slope;  elu: g * (z + alpha))

and then the BN backward in the variables of y (x_hat = (y - beta) / gamma): one pass for the
sums (sum dy, sum dy * (y - beta), sum (y - beta)), one pass for
dx = k1 * dy + k2 * (y - mean_y) + k3. Neither y nor dy is ever stored: the backward reads z and
g twice and writes dx once, like the plain BN backward, and the activation's own backward pass
disappears. Work split and layouts as in `batchnorm._kernels.cpu` (`batchnorm._kernels.cpu_plan`);
compiled on first call (`batchnorm._kernels.cpu_runtime`).
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from . import cpu_plan, cpu_runtime
from .torch_ops import acc_dtype

__all__ = ["MODES", "backward_act"]

MODES = {"leaky_relu": 1, "elu": 2}


def _py_point(z, g, mode, slope, alpha, tiny):  # pragma: no cover - runs compiled
    """(y, dy) in float64 from z = act(y) and g = dL/dz."""
    zf = np.float64(z)
    gf = np.float64(g)
    if zf > 0.0:
        return zf, gf
    if mode == 1:
        return zf / slope, gf * slope
    return math.log1p(max(zf / alpha, -1.0 + tiny)), gf * (zf + alpha)


def _py_seg_bsums_act(gs, zs, shift, mode, slope, alpha, tiny):  # pragma: no cover
    """sum dy, sum dy * (y - shift), sum (y - shift) over two equal 1D slices."""
    sg = 0.0
    sgd = 0.0
    sd = 0.0
    for i in range(zs.size):
        y, dy = _point(zs[i], gs[i], mode, slope, alpha, tiny)
        d = y - shift
        sg += dy
        sgd += dy * d
        sd += d
    return sg, sgd, sd


def _py_seg_dx_act(gs, zs, dxs, mu, k1, k2, k3, mode, slope, alpha, tiny):  # pragma: no cover
    """dxs = k1 * dy + k2 * (y - mu) + k3 elementwise (float64 arithmetic)."""
    for i in range(zs.size):
        y, dy = _point(zs[i], gs[i], mode, slope, alpha, tiny)
        dxs[i] = k1 * dy + k2 * (y - mu) + k3


_point: Any = _py_point
_seg_bsums_act: Any = _py_seg_bsums_act
_seg_dx_act: Any = _py_seg_dx_act

# the kernels below, compiled on first request (the three helpers above first)
_KERNELS = cpu_runtime.LazyKernels(
    globals(), {"point": {}, "seg_bsums_act": {"fastmath": cpu_runtime.FASTMATH}, "seg_dx_act": {}}
)
_run = _KERNELS.run


def _py_bsums_act_ncs(g, z, n_b, n_c, n_s, k, nseg, shift, mode, slope, alpha, tiny, out):  # pragma: no cover
    """Per-channel sums over (channel, row group, piece) units; out: (3, C) float64."""
    groups = (n_b + k - 1) // k
    per_c = groups * nseg
    seg = (n_s + nseg - 1) // nseg
    n_units = n_c * per_c
    part = np.zeros((3, n_units))
    for u in numba.prange(n_units):
        c = u // per_c
        r = u % per_c
        n0 = (r // nseg) * k
        n1 = min(n_b, n0 + k)
        i0 = (r % nseg) * seg
        ln = min(n_s - i0, seg)
        if ln > 0:
            for n in range(n0, n1):
                off = (n * n_c + c) * n_s + i0
                a, b, d = _seg_bsums_act(g[off : off + ln], z[off : off + ln], shift[c], mode, slope, alpha, tiny)
                part[0, u] += a
                part[1, u] += b
                part[2, u] += d
    for c in range(n_c):
        for j in range(3):
            s = 0.0
            for u in range(c * per_c, (c + 1) * per_c):
                s += part[j, u]
            out[j, c] = s


def _py_dx_act_ncs(g, z, n_b, n_c, n_s, nseg, q, mode, slope, alpha, tiny, dx):  # pragma: no cover
    """dx per (row, piece) unit; q: (4, C) float64 (mean of y, k1, k2, k3)."""
    n_units = n_b * n_c * nseg
    seg = (n_s + nseg - 1) // nseg
    for u in numba.prange(n_units):
        row = u // nseg
        c = row % n_c
        i0 = row * n_s + (u % nseg) * seg
        i1 = min(row * n_s + n_s, i0 + seg)
        _seg_dx_act(g[i0:i1], z[i0:i1], dx[i0:i1], q[0, c], q[1, c], q[2, c], q[3, c], mode, slope, alpha, tiny)


def _py_bsums_act_rows(g, z, n_m, n_c, n_blk, shift, mode, slope, alpha, tiny, out):  # pragma: no cover
    """Per-column sums over row blocks (columns contiguous); out: (3, n_c) float64."""
    rows = (n_m + n_blk - 1) // n_blk
    part = np.zeros((n_blk, 3, n_c))
    for blk in numba.prange(n_blk):
        a = part[blk, 0]
        b = part[blk, 1]
        e = part[blk, 2]
        for r in range(blk * rows, min(n_m, (blk + 1) * rows)):
            zr = z[r * n_c : (r + 1) * n_c]
            gr = g[r * n_c : (r + 1) * n_c]
            for c in range(n_c):
                y, dy = _point(zr[c], gr[c], mode, slope, alpha, tiny)
                d = y - shift[c]
                a[c] += dy
                b[c] += dy * d
                e[c] += d
    for j in range(3):
        for c in range(n_c):
            s = 0.0
            for blk in range(n_blk):
                s += part[blk, j, c]
            out[j, c] = s


def _py_dx_act_rows(g, z, n_m, n_c, n_blk, q, mode, slope, alpha, tiny, dx):  # pragma: no cover
    """dx over row blocks; q: (4, n_c) float64 per column (mean of y, k1, k2, k3)."""
    rows = (n_m + n_blk - 1) // n_blk
    mu = q[0]
    k1 = q[1]
    k2 = q[2]
    k3 = q[3]
    for blk in numba.prange(n_blk):
        for r in range(blk * rows, min(n_m, (blk + 1) * rows)):
            zr = z[r * n_c : (r + 1) * n_c]
            gr = g[r * n_c : (r + 1) * n_c]
            dr = dx[r * n_c : (r + 1) * n_c]
            for c in range(n_c):
                y, dy = _point(zr[c], gr[c], mode, slope, alpha, tiny)
                dr[c] = k1[c] * dy + k2[c] * (y - mu[c]) + k3[c]


def backward_act(
    grad_z: Tensor,
    z: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    invstd: Tensor,
    activation: str,
    negative_slope: float,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """BN + activation backward from the output z: (dx, dgamma, dbeta).

    ``weight`` (gamma) must be invertible (see `batchnorm.functional_act`). dx has z's
    dtype and memory format; dgamma, dbeta are in ``acc_dtype(z.dtype)``.

    Shape: grad_z, z (N, C, *) -> dx (N, C, *), dgamma (C,), dbeta (C,).
    """
    layout = cpu_plan.check_supported(z, "backward_act")
    if activation not in MODES:
        raise ValueError(f"backward_act: expected activation in {tuple(MODES)}, got {activation!r}")
    zn = cpu_plan.as_native(z.detach())
    g = grad_z.detach()
    if g.dtype != zn.dtype or g.stride() != zn.stride():
        g = cpu_runtime.empty_like(zn).copy_(g)
    dx = cpu_runtime.empty_like(zn)
    kind, n, c, s = cpu_plan.plan(zn, layout)
    small = zn.numel() < cpu_runtime.SMALL_WORK
    n_c = z.shape[1]
    zf = cpu_plan.flat(zn, layout)
    gf = cpu_plan.flat(g, layout)
    dxf = cpu_plan.flat(dx, layout)
    gamma = cpu_plan.channel_vec(weight, n_c, 1.0)
    beta = cpu_plan.channel_vec(bias, n_c, 0.0)
    inv = cpu_plan.channel_vec(invstd, n_c, 1.0)
    mode = MODES[activation]
    args = (mode, float(negative_slope), float(alpha), float(torch.finfo(zn.dtype).eps))
    sums = np.empty((2, n_c))
    if kind == "ncs":
        tot = np.empty((3, c))
        k, nseg = cpu_plan.units(n, c, s)
        _run("bsums_act_ncs", gf, zf, n, c, s, k, nseg, beta, *args, tot, small=small)
    else:
        nblk = cpu_plan.rows_blocks(n, c)
        col = np.empty((3, c))
        _run("bsums_act_rows", gf, zf, n, c, nblk, np.repeat(beta, s), *args, col, small=small)
        tot = col.reshape(3, n_c, s).sum(axis=2)  # (3, C*s) -> (3, C, s) -> (3, C)
    # BN backward in the variables of y: x_hat = (y - beta) * (1 / gamma), and the dx scale
    # weight' * invstd' must be gamma * invstd, so weight' = gamma^2 * invstd
    p = cpu_plan.bwd_params(tot, beta, 1.0 / gamma, gamma * gamma * inv, float(n * s), sums, np.float64)
    q = np.stack([p[0] + p[1], p[2], p[3], p[4]])  # (4, C) float64: mean of y, k1, k2, k3
    if kind == "ncs":
        _run("dx_act_ncs", gf, zf, n, c, s, cpu_plan.nseg(n * c, s), q, *args, dxf, small=small)
    else:
        _run("dx_act_rows", gf, zf, n, c, nblk, np.repeat(q, s, axis=1), *args, dxf, small=small)
    out = torch.from_numpy(sums).to(acc_dtype(z.dtype))
    return cpu_plan.as_dtype(dx, z.dtype), out[0].clone(), out[1].clone()
