"""Fused batch-norm kernels for CPU tensors, compiled with numba (the default CPU back-end).

Same API as :mod:`batchnorm._kernels.torch_ops`:

- ``train_forward(x, weight, bias, eps) -> (y, mean, var_biased)``
- ``eval_forward(x, mean, var, weight, bias, eps) -> y``
- ``backward(grad_y, x, mean, invstd, weight) -> (dx, sum(g * x_hat), sum(g))``
- ``supports(x) -> bool``: whether these kernels handle ``x`` (else dispatch uses torch_ops).

Math (per channel c over its m = N * prod(spatial) values; DESIGN.md):

    mu = (1/m) sum x,  var = (1/m) sum (x - mu)^2,  invstd = 1 / sqrt(var + eps)
    y  = ((x - mu) * invstd) * weight + bias
    dx = weight * invstd * (g - mean(g) - x_hat * mean(g * x_hat))

Memory layouts. A supported input is seen, without copying, as one of two flat layouts:

- ``"ncs"``: contiguous (N, C, S) with S = prod(spatial) > 1 (NCHW, NCL, NCDHW);
- ``"mc"``: (M, C) rows with C innermost, M = N * prod(spatial): 2D input, channels_last,
  channels_last_3d, or any input whose ``movedim(1, -1)`` is contiguous.

Outputs are preallocated with torch in the input's dtype and memory format, and the kernels
write into their numpy views (``Tensor.numpy()`` shares memory).

Parallelism (``numba.prange``, ``numba.get_num_threads()`` threads):

- ncs with enough channels: one task per channel. The channel's statistics and its normalization
  (or, in backward, its two sums and dx) run back to back, so the second pass reads the
  channel from cache (a (64, 64, 56, 56) float32 channel is 0.8 MB, well inside L2);
- ncs with few channels (C not a multiple of the thread count and < 4 threads): tasks are
  pieces of rows, statistics are merged per channel afterwards (within-channel parallelism);
- mc: tasks are blocks of rows, each accumulating per-channel vectors; blocks are merged.

Numerical policy:

- statistics are accumulated in float64 for every input dtype. Each contiguous run (at most
  ``_SEG`` values, so it stays in L1) gets an exact two-pass mean and M2; runs and blocks are
  merged with Chan's formula (count, mean, M2). M2 is a sum of squares, so var >= 0, and
  nothing cancels for mean 1e4, std 1e-2 in float32;
- normalization subtracts the float64 mean as a hi + lo pair in the input dtype,
  ``((x - mu_hi) - mu_lo) * scale + shift``: for x near mu_hi the first difference is exact, so
  y keeps its precision where ``x * scale + shift`` would lose it (1e4 * 100 in float32);
- ``backward`` refines ``mean`` (which arrives rounded to float32 for float32 input) to the
  float64 batch mean of ``x`` from the sums it reads anyway, so x_hat matches the forward. It
  therefore requires ``mean`` to be the batch mean of ``x``, which the BN backward formula
  assumes in any case;
- float16/bfloat16 inputs (numba has no half types) are cast to float32 with torch around the
  float32 kernels; statistics are returned in float32 (``acc_dtype``), float64 for float64.

Compilation happens on the first call of each kernel (never at import) and is cached on disk
(``cache=True``: numba's ``__pycache__`` next to this file, or ``NUMBA_CACHE_DIR``, or the
user-wide cache). If no cache location is writable, the kernels are compiled without a cache
instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from .torch_ops import acc_dtype

__all__ = ["supports", "train_forward", "eval_forward", "backward", "layout_of"]

_SEG = 4096
"""Longest contiguous run handled with one two-pass (mean, M2): 16 KB of float32, L1-resident."""

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_NATIVE = (torch.float32, torch.float64)
_FASTMATH = {"reassoc", "contract"}
"""Reassociation lets LLVM vectorize the sums; no 'nnan'/'ninf', so NaN and inf propagate."""


# --------------------------------------------------------------------------------------------
# JIT machinery: kernels are plain functions here, compiled on first use.


def _jit(func: Callable[..., Any], **options: Any) -> Any:
    """``numba.njit(func, cache=True, **options)``, or without cache if no cache dir is writable."""
    try:
        return numba.njit(cache=True, **options)(func)
    except (RuntimeError, OSError):
        # numba raises RuntimeError("cannot cache function ...: no locator available") when
        # neither NUMBA_CACHE_DIR, __pycache__ next to the source, nor the user cache is writable
        return numba.njit(cache=False, **options)(func)


_compiled: dict[str, Any] = {}


def _kernel(name: str) -> Any:
    """The compiled dispatcher of kernel ``name`` (created on first request; compiled on first call)."""
    kern = _compiled.get(name)
    if kern is None:
        if not _compiled:
            _build_helpers()
        kern = _jit(globals()["_py" + name], parallel=True)
        _compiled[name] = kern
    return kern


def _build_helpers() -> None:
    """Replace the scalar helpers by their jitted versions (the kernels call them as globals)."""
    g = globals()
    for name in ("_seg_mean_m2", "_seg_bsums"):
        g[name] = _jit(g["_py" + name], fastmath=_FASTMATH)
    g["_chan_merge"] = _jit(_py_chan_merge)
    g["_bwd_params"] = _jit(_py_bwd_params)
    g["_affine_seg"] = _jit(_py_affine_seg)
    g["_dx_seg"] = _jit(_py_dx_seg)
    _compiled["_helpers"] = True


# --------------------------------------------------------------------------------------------
# Scalar helpers (jitted by _build_helpers).


def _py_seg_mean_m2(x, off, n):  # pragma: no cover - runs compiled
    """Two-pass mean and M2 = sum (x - mean)^2 of x[off:off+n], accumulated in float64."""
    seg = x[off : off + n]
    s = 0.0
    for i in range(n):
        s += seg[i]
    mean = s / n
    q = 0.0
    for i in range(n):
        d = seg[i] - mean
        q += d * d
    return mean, q


def _py_seg_bsums(g, x, off, n, shift):  # pragma: no cover - runs compiled
    """sum g, sum g * (x - shift), sum (x - shift) over [off, off+n), in float64."""
    gs = g[off : off + n]
    xs = x[off : off + n]
    sg = 0.0
    sgd = 0.0
    sd = 0.0
    for i in range(n):
        gi = np.float64(gs[i])
        d = xs[i] - shift
        sg += gi
        sgd += gi * d
        sd += d
    return sg, sgd, sd


def _py_chan_merge(cnt_a, mean_a, m2_a, cnt_b, mean_b, m2_b):  # pragma: no cover - runs compiled
    """Chan et al.: (count, mean, M2) of the union of two disjoint sets."""
    tot = cnt_a + cnt_b
    if tot == 0.0:
        return 0.0, 0.0, 0.0
    delta = mean_b - mean_a
    mean = mean_a + delta * (cnt_b / tot)
    m2 = m2_a + m2_b + delta * delta * (cnt_a * cnt_b / tot)
    return tot, mean, m2


def _py_affine_seg(xs, ys, hi, lo, sc, sh):  # pragma: no cover - runs compiled
    """ys = ((xs - hi) - lo) * sc + sh elementwise (1D views of equal length)."""
    for i in range(xs.size):
        ys[i] = ((xs[i] - hi) - lo) * sc + sh


def _py_dx_seg(gs, xs, dxs, hi, lo, k1, k2, k3):  # pragma: no cover - runs compiled
    """dxs = k1 * gs + k2 * ((xs - hi) - lo) + k3 elementwise (1D views of equal length)."""
    for i in range(xs.size):
        dxs[i] = k1 * gs[i] + k2 * ((xs[i] - hi) - lo) + k3


_seg_mean_m2: Any = _py_seg_mean_m2
_affine_seg: Any = _py_affine_seg
_dx_seg: Any = _py_dx_seg
_seg_bsums: Any = _py_seg_bsums
_chan_merge: Any = _py_chan_merge


# --------------------------------------------------------------------------------------------
# Kernels, layout "ncs": x flat of (N, C, S), element (n, c, s) at (n * C + c) * S + s.


def _py_fwd_ncs_fused(x, n_b, n_c, n_s, w, b, eps, y, stats, p):  # pragma: no cover
    """Per channel (one task each): statistics, then y = ((x - hi) - lo) * scale + shift.

    w, b: (C,) float64; stats: (2, C) float64 out (mean, biased var); p: (4, C) scratch in x's
    dtype (hi, lo, scale, shift), used to round the float64 parameters to x's dtype.
    """
    nseg = (n_s + _SEG - 1) // _SEG
    for c in numba.prange(n_c):
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for n in range(n_b):
            base = (n * n_c + c) * n_s
            for j in range(nseg):
                i0 = j * _SEG
                ln = min(n_s - i0, _SEG)
                sm, sq = _seg_mean_m2(x, base + i0, ln)
                cnt, mean, m2 = _chan_merge(cnt, mean, m2, float(ln), sm, sq)
        var = m2 / cnt
        scale = w[c] / math.sqrt(var + eps)
        stats[0, c] = mean
        stats[1, c] = var
        p[0, c] = mean
        p[1, c] = mean - p[0, c]
        p[2, c] = scale
        p[3, c] = b[c]
        hi = p[0, c]
        lo = p[1, c]
        sc = p[2, c]
        sh = p[3, c]
        for n in range(n_b):
            base = (n * n_c + c) * n_s
            _affine_seg(x[base : base + n_s], y[base : base + n_s], hi, lo, sc, sh)


def _py_stats_ncs_units(x, n_b, n_c, n_s, nseg, stats):  # pragma: no cover
    """Statistics with within-channel parallelism: one task per (row, segment) unit, merged.

    A row (n, c) is cut into ``nseg`` segments; stats: (2, C) float64 out (mean, biased var).
    """
    n_units = n_b * n_c * nseg
    seg = (n_s + nseg - 1) // nseg
    u_mean = np.empty(n_units)
    u_m2 = np.empty(n_units)
    u_cnt = np.empty(n_units)
    for u in numba.prange(n_units):
        row = u // nseg
        i0 = (u % nseg) * seg
        ln = max(0, min(n_s - i0, seg))
        if ln > 0:
            sm, sq = _seg_mean_m2(x, row * n_s + i0, ln)
        else:
            sm, sq = 0.0, 0.0
        u_mean[u] = sm
        u_m2[u] = sq
        u_cnt[u] = ln
    for c in range(n_c):
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for n in range(n_b):
            for j in range(nseg):
                u = (n * n_c + c) * nseg + j
                cnt, mean, m2 = _chan_merge(cnt, mean, m2, u_cnt[u], u_mean[u], u_m2[u])
        stats[0, c] = mean
        stats[1, c] = m2 / cnt


def _py_affine_ncs_units(x, n_b, n_c, n_s, nseg, p, y):  # pragma: no cover
    """y = ((x - p[0]) - p[1]) * p[2] + p[3] per channel, one task per (row, segment) unit."""
    n_units = n_b * n_c * nseg
    seg = (n_s + nseg - 1) // nseg
    for u in numba.prange(n_units):
        row = u // nseg
        c = row % n_c
        i0 = row * n_s + (u % nseg) * seg
        i1 = min(row * n_s + n_s, i0 + seg)
        _affine_seg(x[i0:i1], y[i0:i1], p[0, c], p[1, c], p[2, c], p[3, c])


def _py_bwd_ncs_fused(g, x, n_b, n_c, n_s, mean_in, invstd, w, dx, sums, p):  # pragma: no cover
    """Per channel (one task each): both sums, then dx = k1 * g + k2 * ((x - hi) - lo) + k3.

    mean_in, invstd, w: (C,) float64; sums: (2, C) float64 out (sum g * x_hat, sum g);
    p: (5, C) scratch in x's dtype (hi, lo, k1, k2, k3).
    """
    m = float(n_b * n_s)
    for c in numba.prange(n_c):
        shift = mean_in[c]
        sg = 0.0
        sgd = 0.0
        sd = 0.0
        for n in range(n_b):
            base = (n * n_c + c) * n_s
            a, bb, cc = _seg_bsums(g, x, base, n_s, shift)
            sg += a
            sgd += bb
            sd += cc
        _bwd_params(c, shift, sg, sgd, sd, m, invstd[c], w[c], sums, p)
        hi = p[0, c]
        lo = p[1, c]
        k1 = p[2, c]
        k2 = p[3, c]
        k3 = p[4, c]
        for n in range(n_b):
            base = (n * n_c + c) * n_s
            _dx_seg(g[base : base + n_s], x[base : base + n_s], dx[base : base + n_s], hi, lo, k1, k2, k3)


def _py_bwd_params(c, shift, sg, sgd, sd, m, inv, wc, sums, p):  # pragma: no cover
    """Turn channel c's sums into dgamma, dbeta and the dx coefficients (see module docstring).

    The refined mean mu = shift + sd / m; sum g * (x - mu) = sgd - (sd / m) * sg.
    """
    delta = sd / m
    mu = shift + delta
    sgx = sgd - delta * sg
    sums[0, c] = sgx * inv
    sums[1, c] = sg
    p[0, c] = mu
    p[1, c] = mu - p[0, c]
    p[2, c] = wc * inv
    p[3, c] = -wc * inv * inv * inv * sgx / m
    p[4, c] = -wc * inv * sg / m


_bwd_params: Any = _py_bwd_params


def _py_bsums_ncs_units(g, x, n_b, n_c, n_s, nseg, mean_in, part):  # pragma: no cover
    """Backward sums per (row, segment) unit; part: (3, n_units) float64 out (sg, sgd, sd)."""
    n_units = n_b * n_c * nseg
    seg = (n_s + nseg - 1) // nseg
    for u in numba.prange(n_units):
        row = u // nseg
        c = row % n_c
        i0 = (u % nseg) * seg
        ln = max(0, min(n_s - i0, seg))
        a, bb, cc = _seg_bsums(g, x, row * n_s + i0, ln, mean_in[c])
        part[0, u] = a
        part[1, u] = bb
        part[2, u] = cc


def _py_dx_ncs_units(g, x, n_b, n_c, n_s, nseg, p, dx):  # pragma: no cover
    """dx = k1 * g + k2 * ((x - hi) - lo) + k3 per channel, one task per (row, segment) unit."""
    n_units = n_b * n_c * nseg
    seg = (n_s + nseg - 1) // nseg
    for u in numba.prange(n_units):
        row = u // nseg
        c = row % n_c
        i0 = row * n_s + (u % nseg) * seg
        i1 = min(row * n_s + n_s, i0 + seg)
        _dx_seg(g[i0:i1], x[i0:i1], dx[i0:i1], p[0, c], p[1, c], p[2, c], p[3, c], p[4, c])


# --------------------------------------------------------------------------------------------
# Kernels, layout "mc": x flat of (M, C), element (r, c) at r * C + c.


def _py_stats_mc(x, n_m, n_c, n_blk, stats):  # pragma: no cover
    """Statistics over row blocks (one task each), per-channel vectors, merged over blocks.

    Inside a block, sub-blocks of ``rs`` rows (~_SEG values, cache-resident) get an exact
    two-pass mean/M2 per channel and are merged into the block's running (count, mean, M2).
    """
    rows = (n_m + n_blk - 1) // n_blk
    rs = max(1, _SEG // n_c)
    b_mean = np.zeros((n_blk, n_c))
    b_m2 = np.zeros((n_blk, n_c))
    b_cnt = np.zeros(n_blk)
    for blk in numba.prange(n_blk):
        r0 = blk * rows
        r1 = min(n_m, r0 + rows)
        sm = np.empty(n_c)
        sq = np.empty(n_c)
        bm = b_mean[blk]
        bq = b_m2[blk]
        cnt = 0.0
        for s0 in range(r0, r1, rs):
            s1 = min(r1, s0 + rs)
            k = float(s1 - s0)
            sm[:] = 0.0
            for r in range(s0, s1):
                xr = x[r * n_c : (r + 1) * n_c]
                for c in range(n_c):
                    sm[c] += xr[c]
            for c in range(n_c):
                sm[c] /= k
            sq[:] = 0.0
            for r in range(s0, s1):
                xr = x[r * n_c : (r + 1) * n_c]
                for c in range(n_c):
                    d = xr[c] - sm[c]
                    sq[c] += d * d
            tot = cnt + k
            f = k / tot
            h = cnt * k / tot
            for c in range(n_c):
                delta = sm[c] - bm[c]
                bm[c] += delta * f
                bq[c] += sq[c] + delta * delta * h
            cnt = tot
        b_cnt[blk] = cnt
    for c in range(n_c):
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for blk in range(n_blk):
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, b_cnt[blk], b_mean[blk, c], b_m2[blk, c])
        stats[0, c] = mean
        stats[1, c] = m2 / cnt


def _py_affine_mc(x, n_m, n_c, n_blk, p, y):  # pragma: no cover
    """y = ((x - p[0]) - p[1]) * p[2] + p[3], vectorized over channels, one task per row block."""
    rows = (n_m + n_blk - 1) // n_blk
    hi = p[0]
    lo = p[1]
    sc = p[2]
    sh = p[3]
    for blk in numba.prange(n_blk):
        r0 = blk * rows
        r1 = min(n_m, r0 + rows)
        for r in range(r0, r1):
            xr = x[r * n_c : (r + 1) * n_c]
            yr = y[r * n_c : (r + 1) * n_c]
            for c in range(n_c):
                yr[c] = ((xr[c] - hi[c]) - lo[c]) * sc[c] + sh[c]


def _py_bsums_mc(g, x, n_m, n_c, n_blk, mean_in, out):  # pragma: no cover
    """Backward sums (sg, sgd, sd) per channel over row blocks; out: (3, C) float64."""
    rows = (n_m + n_blk - 1) // n_blk
    part = np.zeros((n_blk, 3, n_c))
    for blk in numba.prange(n_blk):
        r0 = blk * rows
        r1 = min(n_m, r0 + rows)
        a = part[blk, 0]
        bb = part[blk, 1]
        cc = part[blk, 2]
        for r in range(r0, r1):
            xr = x[r * n_c : (r + 1) * n_c]
            gr = g[r * n_c : (r + 1) * n_c]
            for c in range(n_c):
                gi = np.float64(gr[c])
                d = xr[c] - mean_in[c]
                a[c] += gi
                bb[c] += gi * d
                cc[c] += d
    for k in range(3):
        for c in range(n_c):
            s = 0.0
            for blk in range(n_blk):
                s += part[blk, k, c]
            out[k, c] = s


def _py_dx_mc(g, x, n_m, n_c, n_blk, p, dx):  # pragma: no cover
    """dx = k1 * g + k2 * ((x - hi) - lo) + k3, vectorized over channels, per row block."""
    rows = (n_m + n_blk - 1) // n_blk
    hi = p[0]
    lo = p[1]
    k1 = p[2]
    k2 = p[3]
    k3 = p[4]
    for blk in numba.prange(n_blk):
        r0 = blk * rows
        r1 = min(n_m, r0 + rows)
        for r in range(r0, r1):
            xr = x[r * n_c : (r + 1) * n_c]
            gr = g[r * n_c : (r + 1) * n_c]
            dr = dx[r * n_c : (r + 1) * n_c]
            for c in range(n_c):
                dr[c] = k1[c] * gr[c] + k2[c] * ((xr[c] - hi[c]) - lo[c]) + k3[c]


# --------------------------------------------------------------------------------------------
# Python side: layouts, buffers, parameters.


def layout_of(x: Tensor) -> str | None:
    """``"ncs"``, ``"mc"`` or None (unsupported strides) for a dense 2D-5D tensor."""
    if x.dim() < 2 or x.dim() > 5:
        return None
    if x.is_contiguous() and x.numel() // max(1, x.shape[0] * x.shape[1]) > 1:
        return "ncs"
    if x.movedim(1, -1).is_contiguous():
        return "mc"
    return None


def supports(x: Tensor) -> bool:
    """True for non-empty CPU float64/float32/float16/bfloat16 tensors of 2 to 5 dims laid out
    contiguously (NCHW, ...) or channels-last (C innermost); False sends dispatch to torch_ops."""
    return (
        isinstance(x, Tensor)
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.layout == torch.strided
        and not x.is_neg()
        and x.numel() > 0
        and layout_of(x) is not None
    )


def _threads() -> int:
    return int(numba.get_num_threads())


def _flat(t: Tensor, layout: str) -> np.ndarray:
    """A 1D numpy view (shared memory) of t in the ncs or mc element order."""
    if layout == "mc":
        t = t.movedim(1, -1)  # (N, *spatial, C), contiguous
    return t.detach().view(-1).numpy()


def _dims(x: Tensor, layout: str) -> tuple[int, int, int]:
    """(N, C, S) for ncs, (M, C, 1) for mc."""
    c = x.shape[1]
    if layout == "ncs":
        return x.shape[0], c, x.numel() // (x.shape[0] * c)
    return x.numel() // c, c, 1


def _channel_vec(v: Tensor | None, c: int, fill: float) -> np.ndarray:
    """A float64 numpy copy of a per-channel vector (C,), or ``fill`` everywhere when None."""
    if v is None:
        return np.full(c, fill)
    return v.detach().to(torch.float64).reshape(c).numpy().copy()


def _fused_ok(c: int) -> bool:
    """One task per channel balances the threads well enough."""
    t = _threads()
    return c % t == 0 or c >= 4 * t


def _nseg(rows: int, n_s: int) -> int:
    """Segments per row: enough units for 4 per thread, and each at most _SEG long."""
    want = max(1, -(-4 * _threads() // rows))
    return min(n_s, max(want, -(-n_s // _SEG)))


def _nblk(n_m: int, n_c: int) -> int:
    """Row blocks for mc: 4 per thread, but none smaller than ~_SEG values."""
    by_size = max(1, (n_m * n_c) // _SEG)
    return max(1, min(n_m, 4 * _threads(), by_size))


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


def _as_native(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (same memory format); float32/float64 unchanged."""
    return x if x.dtype in _NATIVE else x.to(torch.float32)


def _check_supported(x: Tensor, where: str) -> str:
    layout = layout_of(x) if supports(x) else None
    if layout is None:
        raise ValueError(
            f"batchnorm._kernels.cpu.{where}: expected a non-empty CPU float tensor, contiguous or "
            f"channels-last, got dtype {x.dtype} on {x.device} with shape {tuple(x.shape)} and "
            f"strides {x.stride()}"
        )
    return layout


# --------------------------------------------------------------------------------------------
# Public kernels.


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: (y, mean, var_biased). y has x's dtype and memory format; mean and the
    biased variance (C,) are computed in float64 and returned in ``acc_dtype(x.dtype)``.

    Shape: x (N, C, *) -> y (N, C, *), mean (C,), var (C,).
    """
    layout = _check_supported(x, "train_forward")
    xn = _as_native(x.detach())
    y = torch.empty_like(xn)
    n_a, n_c, n_s = _dims(xn, layout)
    xf = _flat(xn, layout)
    yf = _flat(y, layout)
    stats = np.empty((2, n_c))
    if layout == "ncs" and _fused_ok(n_c):
        p = np.empty((4, n_c), dtype=xf.dtype)
        w = _channel_vec(weight, n_c, 1.0)
        b = _channel_vec(bias, n_c, 0.0)
        _kernel("_fwd_ncs_fused")(xf, n_a, n_c, n_s, w, b, float(eps), yf, stats, p)
    else:
        if layout == "ncs":
            nseg = _nseg(n_a * n_c, n_s)
            _kernel("_stats_ncs_units")(xf, n_a, n_c, n_s, nseg, stats)
        else:
            nblk = _nblk(n_a, n_c)
            _kernel("_stats_mc")(xf, n_a, n_c, nblk, stats)
        st = torch.from_numpy(stats)
        p = _affine_params(st[0], torch.rsqrt(st[1] + eps), weight, bias, xn.dtype)
        if layout == "ncs":
            _kernel("_affine_ncs_units")(xf, n_a, n_c, n_s, nseg, p, yf)
        else:
            _kernel("_affine_mc")(xf, n_a, n_c, nblk, p, yf)
    acc = acc_dtype(x.dtype)
    st = torch.from_numpy(stats).to(acc)
    return y.to(x.dtype), st[0].clone(), st[1].clone()


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
    layout = _check_supported(x, "eval_forward")
    xn = _as_native(x.detach())
    y = torch.empty_like(xn)
    n_a, n_c, n_s = _dims(xn, layout)
    invstd = torch.rsqrt(var.detach().to(torch.float64) + eps)
    p = _affine_params(mean.detach(), invstd, weight, bias, xn.dtype)
    xf = _flat(xn, layout)
    yf = _flat(y, layout)
    if layout == "ncs":
        nseg = _nseg(n_a * n_c, n_s)
        _kernel("_affine_ncs_units")(xf, n_a, n_c, n_s, nseg, p, yf)
    else:
        _kernel("_affine_mc")(xf, n_a, n_c, _nblk(n_a, n_c), p, yf)
    return y.to(x.dtype)


def backward(
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training backward, per channel with g = dL/dy (DESIGN.md):

        dbeta  = sum g
        dgamma = sum g * x_hat
        dx     = weight * invstd * (g - mean(g) - x_hat * mean(g * x_hat))

    ``mean`` must be the batch mean of ``x`` (as returned by :func:`train_forward`); it is
    refined to float64 from x itself (see module docstring). Returns (dx in x's dtype and
    memory format, dgamma, dbeta in ``acc_dtype(x.dtype)``). Not differentiable (the functional
    layer uses torch_ops when a graph of the backward is needed).

    Shape: grad_y, x (N, C, *) -> dx (N, C, *), dgamma (C,), dbeta (C,).
    """
    layout = _check_supported(x, "backward")
    xn = _as_native(x.detach())
    g = grad_y.detach()
    if g.shape != x.shape:
        raise ValueError(
            f"batchnorm._kernels.cpu.backward: expected grad_y of shape {tuple(x.shape)}, "
            f"got {tuple(g.shape)}"
        )
    if g.dtype != xn.dtype or g.stride() != xn.stride() or g.device != xn.device:
        g = torch.empty_like(xn).copy_(g)
    dx = torch.empty_like(xn)
    n_a, n_c, n_s = _dims(xn, layout)
    xf = _flat(xn, layout)
    gf = _flat(g, layout)
    dxf = _flat(dx, layout)
    mu = _channel_vec(mean, n_c, 0.0)
    inv = _channel_vec(invstd, n_c, 1.0)
    w = _channel_vec(weight, n_c, 1.0)
    sums = np.empty((2, n_c))
    if layout == "ncs" and _fused_ok(n_c):
        p = np.empty((5, n_c), dtype=xf.dtype)
        _kernel("_bwd_ncs_fused")(gf, xf, n_a, n_c, n_s, mu, inv, w, dxf, sums, p)
    else:
        if layout == "ncs":
            nseg = _nseg(n_a * n_c, n_s)
            part = np.empty((3, n_a * n_c * nseg))
            _kernel("_bsums_ncs_units")(gf, xf, n_a, n_c, n_s, nseg, mu, part)
            # (3, N * C * nseg) -> (3, N, C, nseg) -> (3, C)
            tot = part.reshape(3, n_a, n_c, nseg).sum(axis=(1, 3))
            m = float(n_a * n_s)
        else:
            nblk = _nblk(n_a, n_c)
            tot = np.empty((3, n_c))
            _kernel("_bsums_mc")(gf, xf, n_a, n_c, nblk, mu, tot)
            m = float(n_a)
        p = _bwd_params_np(tot, mu, inv, w, m, sums, xf.dtype)
        if layout == "ncs":
            _kernel("_dx_ncs_units")(gf, xf, n_a, n_c, n_s, nseg, p, dxf)
        else:
            _kernel("_dx_mc")(gf, xf, n_a, n_c, nblk, p, dxf)
    acc = acc_dtype(x.dtype)
    out = torch.from_numpy(sums).to(acc)
    return dx.to(x.dtype), out[0].clone(), out[1].clone()


def _bwd_params_np(
    tot: np.ndarray, shift: np.ndarray, inv: np.ndarray, w: np.ndarray, m: float, sums: np.ndarray, dtype: Any
) -> np.ndarray:
    """NumPy twin of ``_bwd_params`` for all channels; fills ``sums`` (2, C), returns (5, C)."""
    sg, sgd, sd = tot
    delta = sd / m
    mu = shift + delta
    sgx = sgd - delta * sg
    sums[0] = sgx * inv
    sums[1] = sg
    p = np.empty((5, tot.shape[1]), dtype=dtype)
    p[0] = mu
    p[1] = mu - p[0].astype(np.float64)
    p[2] = w * inv
    p[3] = -w * inv * inv * inv * sgx / m
    p[4] = -w * inv * sg / m
    return p
