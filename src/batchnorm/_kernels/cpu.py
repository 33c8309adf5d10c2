"""Fused batch-norm kernels for CPU tensors, compiled with numba (the default CPU back-end).

This module is the back-end's contract: its entry points plan each call and launch the
kernels. The rest is split by job: `batchnorm._kernels.cpu_kernels` holds the numba kernel
sources, `batchnorm._kernels.cpu_plan` the planning shared with `batchnorm._kernels.cpu_act`
(support, layouts, work split, parameters), `batchnorm._kernels.cpu_runtime` the numba runtime
(compiling, threading, launching, output buffers).

Same API as `batchnorm._kernels.torch_ops`:

- ``train_forward(x, weight, bias, eps) -> (y, mean, var_biased)``
- ``eval_forward(x, mean, var, weight, bias, eps) -> y``
- ``backward(grad_y, x, mean, invstd, weight) -> (dx, sum(g * x_hat), sum(g))``
- ``batch_stats(x) -> (mean, var_biased)``: the statistics alone (no output written);
- ``backward_sums(grad_y, x, mean) -> (sum g, sum g * (x - mean))`` (float64) and
  ``backward_apply(grad_y, x, mean, invstd, weight, mean_g, mean_gxhat) -> dx``: the backward
  split at its reductions, for callers that reduce the sums further (SyncBatchNorm);
- ``supports(x) -> bool``: whether these kernels handle ``x`` (else dispatch uses torch_ops).

Math (per channel c over its m = N * prod(spatial) values):

    mu = (1/m) sum x,  var = (1/m) sum (x - mu)^2,  invstd = 1 / sqrt(var + eps)
    y  = ((x - mu) * invstd) * weight + bias
    dx = weight * invstd * (g - mean(g) - x_hat * mean(g * x_hat))

Memory layouts. A supported input is seen, without copying, as one of two flat layouts:

- ``"ncs"``: contiguous (N, C, S) with S = prod(spatial) > 1 (NCHW, NCL, NCDHW);
- ``"mc"``: (M, C) rows with C innermost, M = N * prod(spatial): 2D input, channels_last,
  channels_last_3d, or any input whose ``movedim(1, -1)`` is contiguous.

Outputs are preallocated with torch in the input's dtype and memory format (large ones on
transparent huge pages, see `cpu_runtime.empty_like`), and the kernels write into their numpy views
(``Tensor.numpy()`` shares memory).

Passes: training forward = one statistics pass + one normalize pass; backward = one pass for
both sums (sum g, sum g * (x - mean)) + one pass for dx; eval = one pass. For NCHW-like inputs
whose channels fit in a core's L2 cache, the training forward (x of a channel <= 1 MiB) and
the backward (g + x of a channel <= 2 MiB, rows >= 4 KiB) run fused per channel: the second pass over a
channel reads it from L2, so each moves the memory-traffic minimum (fwd: read x, write y;
bwd: read g and x, write dx).

Parallelism (``numba.prange`` over work units, ``numba.get_num_threads()`` threads):

- "ncs" with S >= 64: reductions run over units of ~``cpu_plan.SEG`` values of one channel (a group
  of rows, or a piece of one long row), merged per channel afterwards, so channels are split
  across threads when C is small (within-channel parallelism); elementwise passes run over
  (row, piece) units;
- "rows" (mc, and ncs with short rows S < 64 viewed as (N, C*S), see `cpu_plan.plan`): one
  task per block of rows, inner loops over contiguous columns (vectorized) into per-block partial vectors,
  reduced over blocks and, for ncs, over the S columns of each channel.

Threading layer: numba's OpenMP layer by default on Linux (see `cpu_runtime.configure_threading`);
in a process forked from one whose OpenMP pool is running, the kernels run compiled without
``parallel`` (numba would terminate the child at a parallel launch).

Numerical policy:

- statistics end in float64 for every input dtype. ncs units get an exact two-pass mean and
  M2 (the unit is L1-resident), merged with Chan's formula (count, mean, M2): M2 is a sum of
  squares, var >= 0. Row kernels use *shifted* sums d = x - x[first row] per column: the
  shift is a sample of the column, so d is of the order of the spread and mean 1e4, std 1e-2
  loses nothing (x - shift is exact in float32 there); up to 16 rows are summed in the input
  dtype before each float64 flush; var is clamped at >= 0;
- backward sums (sum g, sum g * (x - mean), sum (x - mean)) are accumulated per run
  (<= ``cpu_plan.SEG`` values, or 16 rows) in the input dtype around the mean rounded to that dtype (so x - mean
  is exact near the mean), then added up and moved to the float64 mean in float64;
- normalization subtracts the float64 mean as a hi + lo pair in the input dtype,
  ``((x - mu_hi) - mu_lo) * scale + shift``: for x near mu_hi the first difference is exact, so
  y keeps its precision where ``x * scale + shift`` would lose it (1e4 * 100 in float32);
- ``backward`` refines ``mean`` to the float64 batch mean of ``x`` from the sums it reads
  anyway (a no-op up to rounding for the float64 mean of `train_forward`; it rescues a
  mean that was rounded to float32). It therefore requires ``mean`` to be the batch mean of
  ``x``, which the BN backward formula assumes in any case;
- float16/bfloat16 inputs (numba has no half types) reach the kernels as their raw 16-bit
  storage (uint16/int16 numpy views, no copy); every load is widened to float32 in registers
  and every store rounded once to the 16-bit dtype (nearest, ties to even; see
  `batchnorm._kernels.half`), so they run in float32 like float32 inputs, moving half the
  bytes. The mean is returned in float64, the variance and the sums of backward in
  ``acc_dtype`` (float32, float64 for float64 input), as torch_ops does.

Compilation happens on the first call of each kernel (never at import) and is cached on disk
(see `batchnorm._kernels.cpu_runtime`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import cpu_kernels, cpu_plan, cpu_runtime
from .cpu_plan import layout_of
from .dispatch import AUTO_MIN_NUMEL, BACKEND_API
from .half import compute_dtype
from .torch_ops import acc_dtype

__all__ = ["AUTO_MIN_NUMEL", *BACKEND_API, "layout_of"]


# --------------------------------------------------------------------------------------------
# Support, parameters and the kernels' choice.


def supports(x: Tensor) -> bool:
    """True for non-empty CPU float64/float32/float16/bfloat16 tensors of 2 to 5 dims laid out
    contiguously (NCHW, ...) or channels-last (C innermost); False sends dispatch to torch_ops.

    Any size: the "auto" back-end itself sends tensors of fewer than ``AUTO_MIN_NUMEL`` elements
    elsewhere (`batchnorm._kernels.dispatch`), because there the planning and thread-pool
    launch of these kernels cost more than the work (measured: (128, 256) float32 training
    step 0.68 ms here, 0.43 ms with torch ops, 0.14 ms torch native).
    """
    return (
        isinstance(x, Tensor)
        and x.device.type == "cpu"
        and x.dtype in cpu_plan.DTYPES
        and (x.dtype != torch.float16 or cpu_plan.float16_native())
        and x.layout == torch.strided
        and not x.is_neg()
        and x.numel() > 0
        and layout_of(x) is not None
    )


def _affine_params(
    mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype
) -> np.ndarray:
    """(4, C) in ``dtype``: mean hi, mean lo, scale = weight * invstd, shift = bias (from float64)."""
    mean = mean.to(torch.float64)
    scale = invstd.to(torch.float64)
    if weight is not None:
        scale = scale * weight.detach().to(torch.float64)
    shift = torch.zeros_like(mean) if bias is None else bias.detach().to(torch.float64)
    hi = mean.to(dtype)
    lo = (mean - hi.to(torch.float64)).to(dtype)
    return torch.stack([hi, lo, scale.to(dtype), shift.to(dtype)]).numpy()


def _compute_torch(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in for input ``dtype``: float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_FUSE_BYTES = 1 << 20
"""Largest channel (N * S * itemsize bytes) the fused training forward handles: half of a 2 MiB
L2 cache, so the normalize pass finds the channel's x there."""


def _fuse_ncs(n_b: int, n_c: int, n_s: int, itemsize: int) -> bool:
    """Whether the ncs training forward runs fused per channel (kernel ``train_ncs``): each
    channel fits in `_FUSE_BYTES`, and there are at least 4 channels per thread (the
    channels are the only parallel units there)."""
    return n_b * n_s * itemsize <= _FUSE_BYTES and n_c >= 4 * cpu_runtime.threads()


_FUSE_BWD_BYTES = 2 << 20
"""Largest g + x of one channel (2 * N * S * itemsize bytes) the fused backward handles: a
2 MiB L2 cache."""

_FUSE_BWD_ROW = 4096
"""Shortest row (S * itemsize bytes) for the fused backward. A channel's rows lie C * S apart;
short rows make the per-channel walk a strided one (prefetch, cache sets) and cost more than the
L2 reuse saves on a quiet machine. Measured on the 2-core VM (2 MiB L2 per core), float32,
fused / two-kernel backward: (64, 64, 56, 56) (12.5 KB rows) 0.58-0.64 with the memory system
loaded by other processes, ~0.94 quiet (bn_speed bwd 7.8 vs 8.3 ms); (256, 256, 14, 14) (784 B
rows) 0.69-0.88 loaded but 1.15 quiet (11.6 vs 10.1 ms): not fused."""


def _fuse_bwd_ncs(n_b: int, n_c: int, n_s: int, itemsize: int) -> bool:
    """Whether the ncs backward runs fused per channel (kernel ``bwd_ncs``): a channel's g and
    x fit in `_FUSE_BWD_BYTES` together, its rows are at least `_FUSE_BWD_ROW`
    bytes long, and there are at least 4 channels per thread."""
    return (
        2 * n_b * n_s * itemsize <= _FUSE_BWD_BYTES
        and n_s * itemsize >= _FUSE_BWD_ROW
        and n_c >= 4 * cpu_runtime.threads()
    )


def _merge_columns(col: np.ndarray, n_c: int, rep: int) -> np.ndarray:
    """(2, C*rep) per-column (mean, biased var) over equal counts -> (2, C) per channel:
    mean = mean of column means; var = mean of column variances + variance of column means."""
    if rep == 1:
        return col
    cm = col[0].reshape(n_c, rep)  # (C, rep)
    cv = col[1].reshape(n_c, rep)
    mean = cm.mean(axis=1)
    var = cv.mean(axis=1) + np.square(cm - mean[:, None]).mean(axis=1)
    return np.stack([mean, var])


# --------------------------------------------------------------------------------------------
# Public kernels.


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: (y, mean, var_biased). y has x's dtype and memory format; mean and the
    biased variance (C,) are computed in float64; the mean is returned in float64 and the
    variance in ``acc_dtype(x.dtype)`` (as `torch_ops.train_forward`).

    Shape: x (N, C, *) -> y (N, C, *), mean (C,), var (C,).
    """
    layout = cpu_plan.check_supported(x, "train_forward")
    xn = x.detach()
    y = cpu_runtime.empty_like(xn)
    kind, n, c, s = cpu_plan.plan(xn, layout)
    small = xn.numel() < cpu_runtime.SMALL_WORK
    xf = cpu_plan.flat(xn, layout)
    yf = cpu_plan.flat(y, layout)
    n_c = x.shape[1]
    if kind == "ncs" and _fuse_ncs(n, c, s, xn.element_size()):
        stats = np.empty((2, c))
        k, nseg = cpu_plan.units(n, c, s)
        w = cpu_plan.channel_vec(weight, c, 1.0)
        b = cpu_plan.channel_vec(bias, c, 0.0)
        cpu_kernels.run("train_ncs", xf, n, c, s, k, nseg, float(eps), w, b, stats, yf, small=small)
        st = torch.from_numpy(stats)
        return y, st[0].clone(), st[1].to(acc_dtype(x.dtype))
    st = torch.from_numpy(_stats(xf, kind, n, c, s, n_c, small))
    p = _affine_params(st[0], torch.rsqrt(st[1] + eps), weight, bias, _compute_torch(xn.dtype))
    if kind == "ncs":
        cpu_kernels.run("affine_ncs", xf, n, c, s, cpu_plan.nseg(n * c, s), p, yf, small=small)
    else:
        cpu_kernels.run("affine_mc", xf, n, c, cpu_plan.rows_blocks(n, c), np.repeat(p, s, axis=1), yf, small=small)
    # as torch_ops: the mean in float64 (a float32 mean of 1e4 is off by 5% of a 1e-2 spread),
    # the variance in the accumulation dtype
    return y, st[0].clone(), st[1].to(acc_dtype(x.dtype))


def _stats(xf: np.ndarray, kind: str, n: int, c: int, s: int, n_c: int, small: bool) -> np.ndarray:
    """(2, C) float64 per-channel (mean, biased var) of the flat input (one read of x)."""
    if kind == "ncs":
        stats = np.empty((2, c))
        k, nseg = cpu_plan.units(n, c, s)
        cpu_kernels.run("stats_ncs", xf, n, c, s, k, nseg, stats, small=small)
        return stats
    col = np.empty((2, c))
    cpu_kernels.run("stats_mc", xf, n, c, cpu_plan.rows_blocks(n, c), col, small=small)
    return _merge_columns(col, n_c, s)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch statistics without a normalized output: (mean, var_biased).

    One read of x, no write (the statistics pass of `train_forward`). The mean is
    returned in float64, the biased variance in ``acc_dtype(x.dtype)``, as
    `torch_ops.batch_stats`.

    Shape: x (N, C, *) -> mean (C,), var (C,).
    """
    layout = cpu_plan.check_supported(x, "batch_stats")
    xn = x.detach()
    kind, n, c, s = cpu_plan.plan(xn, layout)
    st = torch.from_numpy(
        _stats(cpu_plan.flat(xn, layout), kind, n, c, s, x.shape[1], xn.numel() < cpu_runtime.SMALL_WORK)
    )
    return st[0].clone(), st[1].to(acc_dtype(x.dtype))


def eval_forward(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Inference forward with fixed statistics: y = weight * (x - mean) / sqrt(var + eps) + bias.

    Shape: x (N, C, *) -> y of the same shape, dtype and memory format; mean, var (C,).
    """
    layout = cpu_plan.check_supported(x, "eval_forward")
    xn = x.detach()
    y = cpu_runtime.empty_like(xn)
    kind, n, c, s = cpu_plan.plan(xn, layout)
    small = xn.numel() < cpu_runtime.SMALL_WORK
    invstd = torch.rsqrt(var.detach().to(torch.float64) + eps)
    p = _affine_params(mean.detach(), invstd, weight, bias, _compute_torch(xn.dtype))
    xf = cpu_plan.flat(xn, layout)
    yf = cpu_plan.flat(y, layout)
    if kind == "ncs":
        cpu_kernels.run("affine_ncs", xf, n, c, s, cpu_plan.nseg(n * c, s), p, yf, small=small)
    else:
        cpu_kernels.run("affine_mc", xf, n, c, cpu_plan.rows_blocks(n, c), np.repeat(p, s, axis=1), yf, small=small)
    return y


def backward(
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training backward, per channel with g = dL/dy:

        dbeta  = sum g
        dgamma = sum g * x_hat
        dx     = weight * invstd * (g - mean(g) - x_hat * mean(g * x_hat))

    ``mean`` must be the batch mean of ``x`` (as returned by `train_forward`); it is
    refined to float64 from x itself (see module docstring). Returns (dx in x's dtype and
    memory format, dgamma, dbeta in ``acc_dtype(x.dtype)``). Not differentiable (the functional
    layer uses torch_ops when a graph of the backward is needed).

    Shape: grad_y, x (N, C, *) -> dx (N, C, *), dgamma (C,), dbeta (C,).
    """
    layout = cpu_plan.check_supported(x, "backward")
    xn = x.detach()
    g = _grad_like(grad_y, xn, "backward")
    dx = cpu_runtime.empty_like(xn)
    kind, n, c, s = cpu_plan.plan(xn, layout)
    small = xn.numel() < cpu_runtime.SMALL_WORK
    n_c = x.shape[1]
    xf = cpu_plan.flat(xn, layout)
    gf = cpu_plan.flat(g, layout)
    mu = cpu_plan.channel_vec(mean, n_c, 0.0)
    inv = cpu_plan.channel_vec(invstd, n_c, 1.0)
    w = cpu_plan.channel_vec(weight, n_c, 1.0)
    sums = np.empty((2, n_c))
    if kind == "ncs" and _fuse_bwd_ncs(n, c, s, xn.element_size()):
        k, nseg = cpu_plan.units(n, c, s)
        cpu_kernels.run("bwd_ncs", gf, xf, n, c, s, k, nseg, mu, inv, w, sums, cpu_plan.flat(dx, layout), small=small)
        out = torch.from_numpy(sums).to(acc_dtype(x.dtype))
        return dx, out[0].clone(), out[1].clone()
    tot = _bsums(gf, xf, kind, n, c, s, mu, compute_dtype(xn.dtype), small)
    p = cpu_plan.bwd_params(tot, mu, inv, w, float(n * s), sums, compute_dtype(xn.dtype))
    _dx(gf, xf, kind, n, c, s, p, cpu_plan.flat(dx, layout), small)
    acc = acc_dtype(x.dtype)
    out = torch.from_numpy(sums).to(acc)
    return dx, out[0].clone(), out[1].clone()


def _grad_like(grad_y: Tensor, xn: Tensor, where: str) -> Tensor:
    """grad_y detached, with x's shape, dtype and strides (a copy only when they differ)."""
    g = grad_y.detach()
    if g.shape != xn.shape:
        raise ValueError(
            f"batchnorm._kernels.cpu.{where}: expected grad_y of shape {tuple(xn.shape)}, got {tuple(g.shape)}"
        )
    if g.dtype != xn.dtype or g.stride() != xn.stride() or g.device != xn.device:
        g = cpu_runtime.empty_like(xn).copy_(g)
    return g


def _bsums(
    gf: np.ndarray, xf: np.ndarray, kind: str, n: int, c: int, s: int, mu: np.ndarray, cdt: Any, small: bool
) -> np.ndarray:
    """(3, C) float64 sums (sum g, sum g * (x - mu), sum (x - mu)) around the float64 ``mu`` (C,).

    One read of g and x. The kernels sum around mu rounded to the compute dtype (x - mu is
    exact near it); the rounding residual is moved into the float64 totals.
    """
    if kind == "ncs":
        tot = np.empty((3, c))
        k, nseg = cpu_plan.units(n, c, s)
        mu_x = mu.astype(cdt)  # sums are taken around the mean rounded to the compute dtype ...
        cpu_kernels.run("bsums_ncs", gf, xf, n, c, s, k, nseg, mu_x, tot, small=small)
        resid = mu - mu_x.astype(np.float64)  # ... and moved to the float64 mean here
        tot[1] -= resid * tot[0]
        tot[2] -= resid * (n * s)
        return tot
    col = np.empty((3, c))
    cpu_kernels.run("bsums_mc", gf, xf, n, c, cpu_plan.rows_blocks(n, c), np.repeat(mu, s), col, small=small)
    return col.reshape(3, -1, s).sum(axis=2)  # (3, C*s) -> (3, C, s) -> (3, C)


def _dx(
    gf: np.ndarray, xf: np.ndarray, kind: str, n: int, c: int, s: int, p: np.ndarray, dxf: np.ndarray, small: bool
) -> None:
    """dx = k1 * g + k2 * ((x - hi) - lo) + k3 with p = (hi, lo, k1, k2, k3) (5, C): one pass."""
    if kind == "ncs":
        cpu_kernels.run("dx_ncs", gf, xf, n, c, s, cpu_plan.nseg(n * c, s), p, dxf, small=small)
    else:
        cpu_kernels.run("dx_mc", gf, xf, n, c, cpu_plan.rows_blocks(n, c), np.repeat(p, s, axis=1), dxf, small=small)


def backward_sums(grad_y: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """The two reductions of the backward, around a given per-channel ``mean``:

        sum_g = sum g,   sum_g_xc = sum g * (x - mean)

    in float64, with no output written (one read of g and x). ``mean`` (C,) may be any value
    (e.g. the global mean of a synchronized batch); it is used as given, in float64: the
    kernels sum in x's compute dtype around mean rounded to it and the residual is applied in
    float64, so mean 1e4 / std 1e-2 in float32 loses nothing. Dividing ``sum_g_xc`` by the
    std gives dgamma = sum g * x_hat.

    Shape: grad_y, x (N, C, *) -> sum_g (C,), sum_g_xc (C,), both float64.
    """
    layout = cpu_plan.check_supported(x, "backward_sums")
    xn = x.detach()
    g = _grad_like(grad_y, xn, "backward_sums")
    kind, n, c, s = cpu_plan.plan(xn, layout)
    mu = cpu_plan.channel_vec(mean, x.shape[1], 0.0)
    small = xn.numel() < cpu_runtime.SMALL_WORK
    tot = _bsums(cpu_plan.flat(g, layout), cpu_plan.flat(xn, layout), kind, n, c, s, mu, compute_dtype(xn.dtype), small)
    return torch.from_numpy(tot[0].copy()), torch.from_numpy(tot[1].copy())


def backward_apply(
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_g: Tensor,
    mean_gxhat: Tensor,
) -> Tensor:
    """dx from already-reduced means (the training backward with its two means given), one pass over g and x:

        x_hat = (x - mean) * invstd
        dx    = weight * invstd * (g - mean_g - x_hat * mean_gxhat)

    ``mean_g`` = (1/M) sum g and ``mean_gxhat`` = (1/M) sum g * x_hat over the normalization
    batch (for SyncBatchNorm: all ranks). Computed as k1 g + k2 ((x - mean_hi) - mean_lo) + k3
    with per-channel coefficients formed in float64 (mean as a hi + lo pair in x's dtype).
    Returns dx in x's dtype and memory format.

    Shape: grad_y, x (N, C, *); mean, invstd, weight, mean_g, mean_gxhat (C,) -> dx (N, C, *).
    """
    layout = cpu_plan.check_supported(x, "backward_apply")
    xn = x.detach()
    g = _grad_like(grad_y, xn, "backward_apply")
    dx = cpu_runtime.empty_like(xn)
    kind, n, c, s = cpu_plan.plan(xn, layout)
    n_c = x.shape[1]
    mu = cpu_plan.channel_vec(mean, n_c, 0.0)
    inv = cpu_plan.channel_vec(invstd, n_c, 1.0)
    scale = inv * cpu_plan.channel_vec(weight, n_c, 1.0)
    p = np.empty((5, n_c), dtype=compute_dtype(xn.dtype))
    p[0] = mu
    p[1] = mu - p[0].astype(np.float64)
    p[2] = scale
    p[3] = -scale * inv * cpu_plan.channel_vec(mean_gxhat, n_c, 0.0)
    p[4] = -scale * cpu_plan.channel_vec(mean_g, n_c, 0.0)
    _dx(
        cpu_plan.flat(g, layout),
        cpu_plan.flat(xn, layout),
        kind,
        n,
        c,
        s,
        p,
        cpu_plan.flat(dx, layout),
        xn.numel() < cpu_runtime.SMALL_WORK,
    )
    return dx
