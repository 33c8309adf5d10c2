"""The numba sources of the parallel CPU kernels of `batchnorm._kernels.cpu`.

Each kernel is a plain function ``_py_<name>``; `KERNELS` (a `cpu_runtime.LazyKernels`)
compiles it on its first request, after the scalar helpers it calls, and `run` launches it:
``run("stats_ncs", x, n_b, n_c, n_s, k, nseg, stats, small=small)``. Nothing is compiled at
import. Arrays are flat numpy views of the tensors (16-bit inputs as their raw storage, see
`batchnorm._kernels.half`); per-channel parameters and results are float64 unless stated.

Kernels: ``stats_ncs``, ``train_ncs``, ``affine_ncs``, ``bsums_ncs``, ``bwd_ncs``, ``dx_ncs``
(layout "ncs", flat (N, C, S)); ``stats_mc``, ``affine_mc``, ``bsums_mc``, ``dx_mc`` (the row
kernels, flat (M, C)). The work split (units, row blocks) is chosen by the caller
(`batchnorm._kernels.cpu_plan`); the numerical policy is in `batchnorm._kernels.cpu`.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from . import cpu_runtime
from .half import compute_cast, compute_empty, compute_zero, load, store

__all__ = ["KERNELS", "run"]

_TILE = 512
"""Channels per tile in the mc reductions: 2-3 float64 accumulator vectors stay in L1."""

_ROWS = 16
"""Rows summed in the input dtype before the float64 flush in the mc statistics."""


# --------------------------------------------------------------------------------------------
# Scalar helpers (jitted by `KERNELS` before the first kernel). Loops run over 1D slices so that
# LLVM vectorizes them; the reductions are compiled with reassociation (fastmath 'reassoc') for the same reason.


def _py_sum_dev(seg, shift):  # pragma: no cover - runs compiled
    """sum(seg - shift) in the compute dtype (``shift`` has it): exact differences near the shift."""
    s = compute_zero(seg)
    for i in range(seg.size):
        s += load(seg[i]) - shift
    return s


def _py_sq_dev(seg, mean):  # pragma: no cover - runs compiled
    """(sum(seg - mean), sum((seg - mean)^2)) in the compute dtype (``mean`` has it)."""
    s = compute_zero(seg)
    q = compute_zero(seg)
    for i in range(seg.size):
        d = load(seg[i]) - mean
        s += d
        q += d * d
    return s, q


def _py_seg_bsums(gs, xs, shift):  # pragma: no cover - runs compiled
    """sum g, sum g * (x - shift), sum (x - shift) over two equal 1D slices (<= `cpu_plan.SEG`).

    Accumulated in the inputs' dtype (vectorized: 64 partial sums of <= 64 terms each for
    float32); ``shift`` has that dtype too, so x - shift is exact for x near it. Callers add
    the results up in float64.
    """
    sg = compute_zero(xs)
    sgd = compute_zero(xs)
    sd = compute_zero(xs)
    for i in range(xs.size):
        gi = load(gs[i])
        d = load(xs[i]) - shift
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


def _py_unit_mean_m2(x, c, n0, n1, i0, ln, n_c, n_s):  # pragma: no cover - runs compiled
    """Corrected two-pass (mean, M2) of channel c over rows [n0, n1), positions [i0, i0 + ln).

    The unit holds at most ~`cpu_plan.SEG` values, so the second pass reads them from L1. Both passes
    compute in the compute dtype (float32 for float32/16-bit input: twice the SIMD width of
    float64), one row at a time, each row's sums then added in float64:

    1. m1 = x0 + mean(x - x0) with x0 the unit's first value (a sample: x - x0 is exact near it);
    2. around m1 rounded to the compute dtype (m1c): s = sum(x - m1c), q = sum((x - m1c)^2);
       mean = m1c + s / n, M2 = q - s^2 / n (the correction term is tiny: m1c is within
       rounding of the mean, so nothing cancels).
    """
    cnt = (n1 - n0) * ln
    shift = load(x[(n0 * n_c + c) * n_s + i0])
    s = 0.0
    for n in range(n0, n1):
        off = (n * n_c + c) * n_s + i0
        s += np.float64(_sum_dev(x[off : off + ln], shift))
    m1 = np.float64(shift) + s / cnt
    m1c = compute_cast(x, m1)  # m1 rounded to the compute dtype
    sd = 0.0
    q = 0.0
    for n in range(n0, n1):
        off = (n * n_c + c) * n_s + i0
        a, b = _sq_dev(x[off : off + ln], m1c)
        sd += np.float64(a)
        q += np.float64(b)
    mean = np.float64(m1c) + sd / cnt
    return mean, max(0.0, q - sd * sd / cnt)


def _py_unit_bsums(g, x, c, n0, n1, i0, ln, n_c, n_s, shift):  # pragma: no cover - runs compiled
    """Backward sums (sg, sgd, sd) of channel c over rows [n0, n1), positions [i0, i0 + ln),
    around ``shift`` (x's dtype), in float64."""
    sg = 0.0
    sgd = 0.0
    sd = 0.0
    for n in range(n0, n1):
        off = (n * n_c + c) * n_s + i0
        a, b, d = _seg_bsums(g[off : off + ln], x[off : off + ln], shift)
        sg += np.float64(a)
        sgd += np.float64(b)
        sd += np.float64(d)
    return sg, sgd, sd


def _py_affine_seg(xs, ys, hi, lo, sc, sh):  # pragma: no cover - runs compiled
    """ys = ((xs - hi) - lo) * sc + sh elementwise (1D views of equal length)."""
    for i in range(xs.size):
        ys[i] = store(ys, ((load(xs[i]) - hi) - lo) * sc + sh)


def _py_dx_seg(gs, xs, dxs, hi, lo, k1, k2, k3):  # pragma: no cover - runs compiled
    """dxs = k1 * gs + k2 * ((xs - hi) - lo) + k3 elementwise (1D views of equal length)."""
    for i in range(xs.size):
        dxs[i] = store(dxs, k1 * load(gs[i]) + k2 * ((load(xs[i]) - hi) - lo) + k3)


_sum_dev: Any = _py_sum_dev
_sq_dev: Any = _py_sq_dev
_seg_bsums: Any = _py_seg_bsums
_chan_merge: Any = _py_chan_merge
_unit_mean_m2: Any = _py_unit_mean_m2
_unit_bsums: Any = _py_unit_bsums
_affine_seg: Any = _py_affine_seg
_dx_seg: Any = _py_dx_seg


# --------------------------------------------------------------------------------------------
# Kernels, layout "ncs": x flat of (N, C, S), element (n, c, s) at (n * C + c) * S + s.
#
# Reductions run over "units": channel c, a group of k rows, one of nseg pieces of the row
# (units of one channel are consecutive: u = (c * groups + group) * nseg + piece).
# Elementwise passes run over (row, piece) units.


def _py_stats_ncs(x, n_b, n_c, n_s, k, nseg, stats):  # pragma: no cover
    """Per-channel mean and biased variance; stats: (2, C) float64 out.

    Each unit gets an exact two-pass (mean, M2); units are merged per channel with Chan's
    formula, so var >= 0 and a large common offset never cancels.
    """
    groups = (n_b + k - 1) // k
    per_c = groups * nseg
    seg = (n_s + nseg - 1) // nseg
    n_units = n_c * per_c
    u_mean = np.zeros(n_units)
    u_m2 = np.zeros(n_units)
    u_cnt = np.zeros(n_units)
    for u in numba.prange(n_units):
        c = u // per_c
        r = u % per_c
        n0 = (r // nseg) * k
        n1 = min(n_b, n0 + k)
        i0 = (r % nseg) * seg
        ln = min(n_s - i0, seg)
        if ln > 0:
            mean, m2 = _unit_mean_m2(x, c, n0, n1, i0, ln, n_c, n_s)
            u_mean[u] = mean
            u_m2[u] = m2
            u_cnt[u] = (n1 - n0) * ln
    for c in range(n_c):
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for u in range(c * per_c, (c + 1) * per_c):
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, u_cnt[u], u_mean[u], u_m2[u])
        stats[0, c] = mean
        stats[1, c] = m2 / cnt


def _py_bsums_ncs(g, x, n_b, n_c, n_s, k, nseg, shift, out):  # pragma: no cover
    """Backward sums per channel; out: (3, C) float64 (sum g, sum g * (x - shift), sum (x - shift))."""
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
            a, b, d = _unit_bsums(g, x, c, n0, n1, i0, ln, n_c, n_s, shift[c])
            part[0, u] = a
            part[1, u] = b
            part[2, u] = d
    for c in range(n_c):
        for j in range(3):
            s = 0.0
            for u in range(c * per_c, (c + 1) * per_c):
                s += part[j, u]
            out[j, c] = s


def _py_train_ncs(x, n_b, n_c, n_s, k, nseg, eps, w, b, stats, y):  # pragma: no cover
    """Fused training forward, one task per channel: statistics, then y for that channel.

    Used when a channel's values fit in a core's L2 cache (as `batchnorm._kernels.cpu` decides):
    the normalize pass then reads x from L2 instead of memory, one full read of x saved. Units
    and merges as in `_py_stats_ncs` (per channel c: k rows at a time, nseg pieces per row);
    w, b: (C,) float64; stats: (2, C) float64 out (mean, biased var); y as in _py_affine_ncs.
    """
    groups = (n_b + k - 1) // k
    seg = (n_s + nseg - 1) // nseg
    for c in numba.prange(n_c):
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for grp in range(groups):
            n0 = grp * k
            n1 = min(n_b, n0 + k)
            for piece in range(nseg):
                i0 = piece * seg
                ln = min(n_s - i0, seg)
                if ln > 0:
                    um, uq = _unit_mean_m2(x, c, n0, n1, i0, ln, n_c, n_s)
                    cnt, mean, m2 = _chan_merge(cnt, mean, m2, np.float64((n1 - n0) * ln), um, uq)
        var = m2 / cnt
        stats[0, c] = mean
        stats[1, c] = var
        inv = 1.0 / np.sqrt(var + eps)
        hi = compute_cast(x, mean)
        lo = compute_cast(x, mean - np.float64(hi))
        sc = compute_cast(x, inv * w[c])
        sh = compute_cast(x, b[c])
        for n in range(n_b):
            off = (n * n_c + c) * n_s
            _affine_seg(x[off : off + n_s], y[off : off + n_s], hi, lo, sc, sh)


def _py_bwd_ncs(g, x, n_b, n_c, n_s, k, nseg, mu, inv, w, sums, dx):  # pragma: no cover
    """Fused training backward, one task per channel: the sums, then dx for that channel.

    Used when a channel's g and x fit in a core's L2 cache together (as
    `batchnorm._kernels.cpu` decides): the dx pass reads them from L2, two full reads saved.
    The same units, float64 totals and coefficients as `_py_bsums_ncs` +
    `cpu_plan.bwd_params` + `_py_dx_ncs` (same order of operations: identical results). mu, inv, w: (C,) float64;
    sums: (2, C) float64 out (sum g * x_hat, sum g); dx as in _py_dx_ncs.
    """
    groups = (n_b + k - 1) // k
    seg = (n_s + nseg - 1) // nseg
    m = np.float64(n_b * n_s)
    for c in numba.prange(n_c):
        mu_x = compute_cast(x, mu[c])  # sums around the mean rounded to the compute dtype
        sg = 0.0
        sgd = 0.0
        sd = 0.0
        for grp in range(groups):
            n0 = grp * k
            n1 = min(n_b, n0 + k)
            for piece in range(nseg):
                i0 = piece * seg
                ln = min(n_s - i0, seg)
                if ln > 0:
                    a, b, d = _unit_bsums(g, x, c, n0, n1, i0, ln, n_c, n_s, mu_x)
                    sg += a
                    sgd += b
                    sd += d
        resid = mu[c] - np.float64(mu_x)  # moved to the float64 mean
        sgd -= resid * sg
        sd -= resid * m
        delta = sd / m
        mean = mu[c] + delta
        sgx = sgd - delta * sg
        sums[0, c] = sgx * inv[c]
        sums[1, c] = sg
        hi = compute_cast(x, mean)
        lo = compute_cast(x, mean - np.float64(hi))
        k1 = compute_cast(x, w[c] * inv[c])
        k2 = compute_cast(x, -w[c] * inv[c] * inv[c] * inv[c] * sgx / m)
        k3 = compute_cast(x, -w[c] * inv[c] * sg / m)
        for n in range(n_b):
            off = (n * n_c + c) * n_s
            _dx_seg(g[off : off + n_s], x[off : off + n_s], dx[off : off + n_s], hi, lo, k1, k2, k3)


def _py_affine_ncs(x, n_b, n_c, n_s, nseg, p, y):  # pragma: no cover
    """y = ((x - p[0]) - p[1]) * p[2] + p[3] per channel, one task per (row, piece) unit."""
    n_units = n_b * n_c * nseg
    seg = (n_s + nseg - 1) // nseg
    for u in numba.prange(n_units):
        row = u // nseg
        c = row % n_c
        i0 = row * n_s + (u % nseg) * seg
        i1 = min(row * n_s + n_s, i0 + seg)
        _affine_seg(x[i0:i1], y[i0:i1], p[0, c], p[1, c], p[2, c], p[3, c])


def _py_dx_ncs(g, x, n_b, n_c, n_s, nseg, p, dx):  # pragma: no cover
    """dx = k1 * g + k2 * ((x - hi) - lo) + k3 per channel, one task per (row, piece) unit."""
    n_units = n_b * n_c * nseg
    seg = (n_s + nseg - 1) // nseg
    for u in numba.prange(n_units):
        row = u // nseg
        c = row % n_c
        i0 = row * n_s + (u % nseg) * seg
        i1 = min(row * n_s + n_s, i0 + seg)
        _dx_seg(g[i0:i1], x[i0:i1], dx[i0:i1], p[0, c], p[1, c], p[2, c], p[3, c], p[4, c])


# --------------------------------------------------------------------------------------------
# Kernels, layout "mc": x flat of (M, C), element (r, c) at r * C + c. One task per block of
# rows; the inner loops run over channels (contiguous), vectorized, into per-block vectors.


def _py_stats_mc(x, n_m, n_c, n_blk, stats):  # pragma: no cover
    """Per-channel mean and biased variance from *shifted* float64 sums; stats: (2, C) out.

    With d = x - x[0, c] (the first row), mean = x[0, c] + sum d / M and
    var = (sum d^2 - (sum d)^2 / M) / M. The shift is a sample of the channel, so |mean d| is of
    the order of the spread and the subtraction loses only ~(|x[0] - mean| / std)^2 ulps of
    float64; var is clamped at 0.
    """
    rows = (n_m + n_blk - 1) // n_blk
    shift = compute_empty(x, n_c)  # the first row, in the compute dtype
    for c in range(n_c):
        shift[c] = load(x[c])
    part_s = np.zeros((n_blk, n_c))
    part_q = np.zeros((n_blk, n_c))
    for blk in numba.prange(n_blk):
        la = compute_empty(x, _TILE)
        lq = compute_empty(x, _TILE)
        # channel tiles keep the accumulators in L1; _ROWS rows at a time are summed in x's
        # dtype (d = x - shift is exact for x near the shift), then flushed into float64
        for c0 in range(0, n_c, _TILE):
            c1 = min(n_c, c0 + _TILE)
            nt = c1 - c0
            a = part_s[blk, c0:c1]
            q = part_q[blk, c0:c1]
            sh = shift[c0:c1]
            r_end = min(n_m, (blk + 1) * rows)
            for r0 in range(blk * rows, r_end, _ROWS):
                la[:nt] = 0.0
                lq[:nt] = 0.0
                r_stop = min(r_end, r0 + _ROWS)
                r = r0
                while r + 4 <= r_stop:  # 4 rows per sweep: a quarter of the accumulator traffic
                    x0 = x[r * n_c + c0 : r * n_c + c1]
                    x1 = x[(r + 1) * n_c + c0 : (r + 1) * n_c + c1]
                    x2 = x[(r + 2) * n_c + c0 : (r + 2) * n_c + c1]
                    x3 = x[(r + 3) * n_c + c0 : (r + 3) * n_c + c1]
                    for c in range(nt):
                        d0 = load(x0[c]) - sh[c]
                        d1 = load(x1[c]) - sh[c]
                        d2 = load(x2[c]) - sh[c]
                        d3 = load(x3[c]) - sh[c]
                        la[c] += (d0 + d1) + (d2 + d3)
                        lq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                    r += 4
                for rr in range(r, r_stop):
                    xr = x[rr * n_c + c0 : rr * n_c + c1]
                    for c in range(nt):
                        d = load(xr[c]) - sh[c]
                        la[c] += d
                        lq[c] += d * d
                for c in range(nt):
                    a[c] += la[c]
                    q[c] += lq[c]
    for c in range(n_c):
        s = 0.0
        q2 = 0.0
        for blk in range(n_blk):
            s += part_s[blk, c]
            q2 += part_q[blk, c]
        mean_d = s / n_m
        stats[0, c] = np.float64(shift[c]) + mean_d
        stats[1, c] = max(0.0, q2 / n_m - mean_d * mean_d)


def _py_affine_mc(x, n_m, n_c, n_blk, p, y):  # pragma: no cover
    """y = ((x - p[0]) - p[1]) * p[2] + p[3], vectorized over channels, one task per row block."""
    rows = (n_m + n_blk - 1) // n_blk
    hi = p[0]
    lo = p[1]
    sc = p[2]
    sh = p[3]
    for blk in numba.prange(n_blk):
        for r in range(blk * rows, min(n_m, (blk + 1) * rows)):
            xr = x[r * n_c : (r + 1) * n_c]
            yr = y[r * n_c : (r + 1) * n_c]
            for c in range(n_c):
                yr[c] = store(yr, ((load(xr[c]) - hi[c]) - lo[c]) * sc[c] + sh[c])


def _py_bsums_mc(g, x, n_m, n_c, n_blk, shift, out):  # pragma: no cover
    """Backward sums (sg, sgd, sd) per channel over row blocks; out: (3, C) float64."""
    rows = (n_m + n_blk - 1) // n_blk
    part = np.zeros((n_blk, 3, n_c))
    shift_x = compute_empty(x, n_c)  # the shift rounded to the compute dtype: x - shift_x is
    for c in range(n_c):  # exact near the mean; the rounding is added back in float64 below
        shift_x[c] = shift[c]
    for blk in numba.prange(n_blk):
        la = compute_empty(x, _TILE)
        lb = compute_empty(x, _TILE)
        le = compute_empty(x, _TILE)
        r_end = min(n_m, (blk + 1) * rows)
        for c0 in range(0, n_c, _TILE):
            c1 = min(n_c, c0 + _TILE)
            nt = c1 - c0
            a = part[blk, 0, c0:c1]
            b = part[blk, 1, c0:c1]
            e = part[blk, 2, c0:c1]
            sh = shift_x[c0:c1]
            # _ROWS rows at a time are summed in x's dtype, then flushed into float64
            for r0 in range(blk * rows, r_end, _ROWS):
                la[:nt] = 0.0
                lb[:nt] = 0.0
                le[:nt] = 0.0
                r_stop = min(r_end, r0 + _ROWS)
                r = r0
                while r + 2 <= r_stop:  # 2 rows per sweep: half the accumulator traffic
                    x0 = x[r * n_c + c0 : r * n_c + c1]
                    x1 = x[(r + 1) * n_c + c0 : (r + 1) * n_c + c1]
                    g0 = g[r * n_c + c0 : r * n_c + c1]
                    g1 = g[(r + 1) * n_c + c0 : (r + 1) * n_c + c1]
                    for c in range(nt):
                        d0 = load(x0[c]) - sh[c]
                        d1 = load(x1[c]) - sh[c]
                        e0 = load(g0[c])
                        e1 = load(g1[c])
                        la[c] += e0 + e1
                        lb[c] += e0 * d0 + e1 * d1
                        le[c] += d0 + d1
                    r += 2
                for rr in range(r, r_stop):
                    xr = x[rr * n_c + c0 : rr * n_c + c1]
                    gr = g[rr * n_c + c0 : rr * n_c + c1]
                    for c in range(nt):
                        gi = load(gr[c])
                        d = load(xr[c]) - sh[c]
                        la[c] += gi
                        lb[c] += gi * d
                        le[c] += d
                for c in range(nt):
                    a[c] += la[c]
                    b[c] += lb[c]
                    e[c] += le[c]
    for j in range(3):
        for c in range(n_c):
            s = 0.0
            for blk in range(n_blk):
                s += part[blk, j, c]
            out[j, c] = s
    # sums were taken around shift_x; move them to the float64 shift: d = d_x - (shift - shift_x)
    for c in range(n_c):
        r = shift[c] - np.float64(shift_x[c])
        out[1, c] -= r * out[0, c]
        out[2, c] -= r * n_m


def _py_dx_mc(g, x, n_m, n_c, n_blk, p, dx):  # pragma: no cover
    """dx = k1 * g + k2 * ((x - hi) - lo) + k3, vectorized over channels, per row block."""
    rows = (n_m + n_blk - 1) // n_blk
    hi = p[0]
    lo = p[1]
    k1 = p[2]
    k2 = p[3]
    k3 = p[4]
    for blk in numba.prange(n_blk):
        for r in range(blk * rows, min(n_m, (blk + 1) * rows)):
            xr = x[r * n_c : (r + 1) * n_c]
            gr = g[r * n_c : (r + 1) * n_c]
            dr = dx[r * n_c : (r + 1) * n_c]
            for c in range(n_c):
                dr[c] = store(dr, k1[c] * load(gr[c]) + k2[c] * ((load(xr[c]) - hi[c]) - lo[c]) + k3[c])


KERNELS = cpu_runtime.LazyKernels(
    globals(),
    {
        "sum_dev": {"fastmath": cpu_runtime.FASTMATH},
        "sq_dev": {"fastmath": cpu_runtime.FASTMATH},
        "seg_bsums": {"fastmath": cpu_runtime.FASTMATH},
        "chan_merge": {},
        "unit_mean_m2": {},
        "unit_bsums": {},
        "affine_seg": {},
        "dx_seg": {},
    },
)
"""The kernels above, compiled on first request (the helpers first; reductions with `cpu_runtime.FASTMATH`)."""

run = KERNELS.run
"""``run(name, *args, small=False)``: launch kernel ``name`` (see `cpu_runtime.launch`)."""
