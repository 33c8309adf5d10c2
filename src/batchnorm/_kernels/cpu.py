"""Fused batch-norm kernels for CPU tensors, compiled with numba (the default CPU back-end).

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
transparent huge pages, see `_empty_like`), and the kernels write into their numpy views
(``Tensor.numpy()`` shares memory).

Passes: training forward = one statistics pass + one normalize pass; backward = one pass for
both sums (sum g, sum g * (x - mean)) + one pass for dx; eval = one pass. For NCHW-like inputs
whose channels fit in a core's L2 cache, the training forward (x of a channel <= 1 MiB) and
the backward (g + x of a channel <= 2 MiB, rows >= 4 KiB) run fused per channel: the second pass over a
channel reads it from L2, so each moves the memory-traffic minimum (fwd: read x, write y;
bwd: read g and x, write dx).

Parallelism (``numba.prange`` over work units, ``numba.get_num_threads()`` threads):

- "ncs" with S >= _SMALL_S: reductions run over units of ~_SEG values of one channel (a group
  of rows, or a piece of one long row), merged per channel afterwards, so channels are split
  across threads when C is small (within-channel parallelism); elementwise passes run over
  (row, piece) units;
- "rows" (mc, and ncs with short rows S < _SMALL_S viewed as (N, C*S)): one task per block of
  rows, inner loops over contiguous columns (vectorized) into per-block partial vectors,
  reduced over blocks and, for ncs, over the S columns of each channel.

Threading layer: numba's OpenMP layer by default on Linux (see `_configure_threading`);
in a process forked from one whose OpenMP pool is running, the kernels run compiled without
``parallel`` (numba would terminate the child at a parallel launch).

Numerical policy:

- statistics end in float64 for every input dtype. ncs units get an exact two-pass mean and
  M2 (the unit is L1-resident), merged with Chan's formula (count, mean, M2): M2 is a sum of
  squares, var >= 0. Row kernels use *shifted* sums d = x - x[first row] per column: the
  shift is a sample of the column, so d is of the order of the spread and mean 1e4, std 1e-2
  loses nothing (x - shift is exact in float32 there); up to _ROWS rows are summed in the input
  dtype before each float64 flush; var is clamped at >= 0;
- backward sums (sum g, sum g * (x - mean), sum (x - mean)) are accumulated per run (<= _SEG
  values, or _ROWS rows) in the input dtype around the mean rounded to that dtype (so x - mean
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
(``cache=True``: numba's ``__pycache__`` next to this file, or ``NUMBA_CACHE_DIR``, or the
user-wide cache). If no cache location is writable, the kernels are compiled without a cache
instead of failing.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import binding as llvm_binding
from torch import Tensor

from . import outpool
from .dispatch import AUTO_MIN_NUMEL, BACKEND_API
from .half import compute_cast, compute_dtype, compute_empty, compute_zero, load, storage_view, store
from .torch_ops import acc_dtype

__all__ = ["AUTO_MIN_NUMEL", *BACKEND_API, "layout_of"]

_SEG = 4096
"""Longest contiguous run handled with one two-pass (mean, M2): 16 KB of float32, L1-resident."""

_TILE = 512
"""Channels per tile in the mc reductions: 2-3 float64 accumulator vectors stay in L1."""

_SMALL_S = 64
"""ncs inputs with fewer spatial positions per row than this run on the row kernels."""

_SMALL_WORK = 1 << 17
"""Tensors with fewer elements run their kernels on the calling thread alone (see _run)."""

_ROWS = 16
"""Rows summed in the input dtype before the float64 flush in the mc statistics."""

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
_launch_lock = threading.Lock()
_pool_lock = threading.Lock()
_fork_state = {"serial": False}
"""``serial``: set in a forked child whose parent started numba's OpenMP pool (see below)."""


def _configure_threading() -> None:
    """Prefer numba's OpenMP threading layer on Linux, else "workqueue", unless the user chose one.

    With torch's pip wheels, numba's OpenMP calls bind to the libgomp torch loaded globally,
    so the kernels run on torch's own pool. Measured on a 2-core machine, interleaved with
    torch ops (docs/kernels.md): the training
    forward of a 12.8 MB tensor takes ~1.4 ms with 2 threads under OpenMP, whose idle workers
    spin for a while and so start at once, against 1.8-2.4 ms under workqueue or TBB, whose
    workers sleep between launches: about what 1 thread takes (the second one woke too late).
    The layer is picked at numba's first parallel launch, process-wide; set
    ``NUMBA_THREADING_LAYER`` (or ``numba.config.THREADING_LAYER``) to override.

    Fork: with GNU OpenMP, numba terminates a forked child at its first parallel launch (a
    DataLoader worker, say). A fork handler therefore marks such a child, and the kernels then
    run there compiled without ``parallel`` (`_serial`): same results, one thread, no
    launch. Launches are serialized by a lock (the workqueue layer refuses concurrent ones).
    """
    if _compiled.get("_threading"):
        return
    _compiled["_threading"] = True
    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "omp" if _omp_usable() else "workqueue"


def _omp_usable() -> bool:
    """Whether numba's OpenMP pool module loads (it needs libgomp); Linux only (measured there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        importlib.import_module("numba.np.ufunc.omppool")
    except ImportError:
        return False
    return True


def _after_fork_in_child() -> None:
    """Fork handler (child side): if the parent started numba's OpenMP pool, run our kernels
    serially and torch on one thread in this child."""
    try:
        layer = numba.threading_layer()
    except ValueError:
        # the parent never started numba's pool: the child may start its own
        return
    if layer == "omp":
        _fork_state["serial"] = True
        # GNU OpenMP's pool does not survive fork: a parallel torch op in this child would hang
        # (as after any parallel torch op in the parent; DataLoader workers do the same)
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    # registered when this module is first imported (dispatch imports it lazily, at the first
    # CPU tensor), so that it also covers a pool that someone else's numba code started
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _serial() -> bool:
    """Whether the kernels must run without a parallel launch (forked child of an OpenMP parent)."""
    return _fork_state["serial"]


def _serial_copy(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` under the qualified name ``<name>_serial``, for its serial compilation.

    numba's disk cache keys a function by its qualified name and signature, not by the
    ``parallel`` option: compiled under its own name, the serial version cannot load the
    cached parallel one (which would launch the OpenMP pool).
    """
    name = func.__name__ + "_serial"
    copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
    copy.__qualname__ = func.__qualname__ + "_serial"
    copy.__module__ = func.__module__
    copy.__doc__ = func.__doc__
    return copy


def _kernel(name: str) -> Any:
    """The compiled dispatcher of kernel ``name`` (created on first request; compiled on first call).

    In a serial process (`_serial`) the same function is compiled without ``parallel``
    (``prange`` runs as ``range``), under its own key.
    """
    serial = _serial()
    key = name + "@serial" if serial else name
    kern = _compiled.get(key)
    if kern is None:
        if "_helpers" not in _compiled:
            _configure_threading()
            _build_helpers()
        func = globals()["_py" + name]
        if serial:
            kern = _jit(_serial_copy(func), parallel=False)
        else:
            kern = _jit(func, parallel=True)
        _compiled[key] = kern
    return kern


def _run(name: str, *args: Any, small: bool = False) -> None:
    """Launch kernel ``name`` (see `launch`)."""
    launch(_kernel(name), args, small=small)


def launch(kern: Any, args: tuple[Any, ...], *, small: bool = False) -> None:
    """Run compiled kernel ``kern`` on `_threads` threads, one launch at a time.

    ``small``: run on one thread. For small tensors, waking numba's workers costs more than
    the work, and much more right after torch ops whose OpenMP threads still spin on the cores.
    """
    if not _serial():
        _start_pool()
    with _launch_lock:
        if _serial():
            kern(*args)
            return
        want = 1 if small else _threads()
        before = numba.get_num_threads()
        if want == before:
            kern(*args)
            return
        numba.set_num_threads(want)
        try:
            kern(*args)
        finally:
            numba.set_num_threads(before)


def _build_helpers() -> None:
    """Replace the scalar helpers by their jitted versions (the kernels call them as globals)."""
    g = globals()
    for name in ("_sum_dev", "_sq_dev", "_seg_bsums"):
        g[name] = _jit(g["_py" + name], fastmath=_FASTMATH)
    for name in ("_chan_merge", "_unit_mean_m2", "_unit_bsums", "_affine_seg", "_dx_seg"):
        g[name] = _jit(g["_py" + name])
    _compiled["_helpers"] = True


# --------------------------------------------------------------------------------------------
# Scalar helpers (jitted by _build_helpers). Loops run over 1D slices so that LLVM vectorizes
# them; the reductions are compiled with reassociation (fastmath 'reassoc') for the same reason.


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
    """sum g, sum g * (x - shift), sum (x - shift) over two equal 1D slices (<= _SEG values).

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

    The unit holds at most ~_SEG values, so the second pass reads them from L1. Both passes
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

    Used when a channel's values fit in a core's L2 cache (see `_FUSE_BYTES`): the
    normalize pass then reads x from L2 instead of memory, one full read of x saved. Units and
    merges as in `_py_stats_ncs` (per channel c: k rows at a time, nseg pieces per row);
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

    Used when a channel's g and x fit in a core's L2 cache together (see
    `_fuse_bwd_ncs`): the dx pass reads them from L2, two full reads saved. The same
    units, float64 totals and coefficients as `_py_bsums_ncs` + `_bwd_params` +
    `_py_dx_ncs` (same order of operations: identical results). mu, inv, w: (C,) float64;
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


# --------------------------------------------------------------------------------------------
# Python side: layouts, buffers, parameters.


def layout_of(x: Tensor) -> str | None:
    """``"ncs"``, ``"mc"`` or None (unsupported strides) for a dense 2D-5D tensor."""
    if x.dim() < 2 or x.dim() > 5:
        return None
    if x.dim() == 2:  # (N, C): "mc" exactly when contiguous (the movedim below is the identity)
        return "mc" if x.is_contiguous() else None
    if x.is_contiguous() and x.numel() // max(1, x.shape[0] * x.shape[1]) > 1:
        return "ncs"
    if x.movedim(1, -1).is_contiguous():
        return "mc"
    return None


def _float16_native() -> bool:
    """Whether numba's target CPU converts float16 in hardware (x86 F16C).

    Without it LLVM lowers the float16 conversions of `batchnorm._kernels.half` to
    compiler-rt calls that numba cannot link; float16 inputs then go to torch_ops. Follows
    ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` when set (e.g. ``generic`` for portable caches).
    """
    if "f16" not in _compiled:
        features = numba.config.CPU_FEATURES
        if features is None:
            host = numba.config.CPU_NAME in (None, "host")
            features = llvm_binding.get_host_cpu_features().flatten() if host else ""
        _compiled["f16"] = "+f16c" in features
    return bool(_compiled["f16"])


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
        and x.dtype in _DTYPES
        and (x.dtype != torch.float16 or _float16_native())
        and x.layout == torch.strided
        and not x.is_neg()
        and x.numel() > 0
        and layout_of(x) is not None
    )


_HUGE = 1 << 21
"""Transparent-huge-page size on x86-64 Linux (2 MiB)."""

_libc: dict[str, Any] = {}


def _madvise_huge(t: Tensor) -> None:
    """Ask Linux to back the 2 MiB-aligned interior of t's fresh memory with huge pages.

    A fresh output is faulted in page by page on first write; with 4 KiB pages that costs as
    much as the kernel itself for a 50 MB tensor (measured: ``empty_like(x).fill_()`` 3-4x a fill of
    a preallocated tensor). ``madvise(MADV_HUGEPAGE)`` on the region (only this memory: nothing
    process-wide) cuts the faults 512-fold. Best effort: any failure leaves 4 KiB pages.
    """
    if "madvise" not in _libc:
        _libc["madvise"] = None
        try:
            import ctypes
            import sys

            if sys.platform.startswith("linux"):
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _libc["madvise"] = fn
        except (OSError, AttributeError):
            pass
    fn = _libc["madvise"]
    if fn is None:
        return
    start = t.data_ptr()
    end = start + t.untyped_storage().nbytes()
    lo = (start + _HUGE - 1) & ~(_HUGE - 1)
    hi = end & ~(_HUGE - 1)
    if hi > lo:
        fn(lo, hi - lo, 14)  # 14 = MADV_HUGEPAGE; the result is deliberately ignored


def _empty_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.empty_like(x, dtype=dtype)`` (same memory format); outputs of at least
    ``outpool.MIN_BYTES`` come from `batchnorm._kernels.outpool` (memory no tensor uses
    any more, reused without page faults; new pool buffers on huge pages)."""
    out = outpool.empty_like(x, x.dtype if dtype is None else dtype)
    if out is not None:
        return out
    # below outpool.MIN_BYTES (1 MiB) glibc's heap reuses freed memory: no page faults, and no
    # huge pages (advising them on heap blocks made a 16 MB output 2.8x slower to fill)
    return torch.empty_like(x, dtype=dtype)


def _threads() -> int:
    """Threads per launch: numba's count, capped by ``torch.get_num_threads()``.

    The cap makes ``torch.set_num_threads`` (and torchrun's ``OMP_NUM_THREADS=1``) hold for
    our kernels too: 2 processes x 2 numba threads on 2 cores, spinning under OpenMP, made a
    DDP step 2-5x slower (benchmarks/bench_sync.py). Its first call starts numba's pool, so the
    threading layer is chosen before.
    """
    if _serial():
        return 1
    _start_pool()
    return max(1, min(int(numba.get_num_threads()), torch.get_num_threads()))


def _start_pool() -> None:
    """Start numba's thread pool (once), keeping torch's intra-op thread count as it was.

    numba's OpenMP layer sets the OpenMP thread count (``omp_set_num_threads``) to numba's own
    count when its pool starts, and with torch's pip wheels that is torch's libgomp: a
    ``torch.set_num_threads(1)`` made before (the lab's runner, torchrun's
    ``OMP_NUM_THREADS=1``, a DataLoader worker) was silently undone at our first parallel
    launch, and every torch op ran on all the cores from then on. On busy cores that is the
    collapse of spinning OpenMP workers waiting for each other: with one torch thread asked
    for, the lab's small-batch MLP step cost 3.0x the torch back-end's time on a loaded 2-core
    machine and 4.6x with two more busy processes, at 5x its CPU time
    (``python -m benchmarks.under_load``). The count is therefore read before the pool starts
    and put back after.
    """
    if _compiled.get("_pool"):
        return
    _configure_threading()
    with _pool_lock:
        if _compiled.get("_pool"):
            return
        before = torch.get_num_threads()
        numba.get_num_threads()  # starts the pool, choosing the threading layer
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
        _compiled["_pool"] = True


def _flat(t: Tensor, layout: str) -> np.ndarray:
    """A 1D numpy view (shared memory) of t in the ncs or mc element order."""
    if layout == "mc":
        t = t.movedim(1, -1)  # (N, *spatial, C), contiguous
    return storage_view(t.detach().view(-1))


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


def _units(n_b: int, n_c: int, n_s: int) -> tuple[int, int]:
    """(k rows per group, nseg pieces per row) for ncs reductions.

    Units hold about _SEG values (k rows of a short row, or a piece of a long one) and there
    are at least 4 per thread when the tensor allows it (within-channel parallelism for small C).
    """
    if n_s >= _SEG:
        k, nseg = 1, -(-n_s // _SEG)
    else:
        k, nseg = max(1, min(n_b, _SEG // n_s)), 1
    want = 4 * _threads()
    while n_c * -(-n_b // k) * nseg < want:
        if k > 1:
            k = max(1, k // 2)
        elif nseg < n_s:
            nseg = min(n_s, 2 * nseg)
        else:
            break
    return k, nseg


def _nseg(rows: int, n_s: int) -> int:
    """Segments per row: enough units for 4 per thread, and each at most _SEG long."""
    want = max(1, -(-4 * _threads() // rows))
    return min(n_s, max(want, -(-n_s // _SEG)))


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


def _as_native(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (same memory format); float32/float64 unchanged."""
    return x if x.dtype in _NATIVE else _empty_like(x, torch.float32).copy_(x)


def _as_dtype(y: Tensor, dtype: torch.dtype) -> Tensor:
    """y cast to dtype (same memory format); y itself when it already has it."""
    return y if y.dtype == dtype else _empty_like(y, dtype).copy_(y)


def _check_supported(x: Tensor, where: str) -> str:
    ok = x.device.type == "cpu" and x.dtype in _DTYPES and not x.is_neg() and x.numel() > 0
    if ok and x.dtype == torch.float16 and not _float16_native():
        raise ValueError(
            f"batchnorm._kernels.cpu.{where}: float16 needs a CPU with hardware float16 conversion "
            "(x86 F16C) for numba to target; use the torch back-end"
        )
    layout = layout_of(x) if ok else None
    if layout is None:
        raise ValueError(
            f"batchnorm._kernels.cpu.{where}: expected a non-empty CPU float tensor, contiguous or "
            f"channels-last, got dtype {x.dtype} on {x.device} with shape {tuple(x.shape)} and "
            f"strides {x.stride()}"
        )
    return layout


# --------------------------------------------------------------------------------------------
# Public kernels.


def _plan(x: Tensor, layout: str) -> tuple[str, int, int, int]:
    """(kind, n, c, s): kind "ncs" runs the (N, C, S) kernels on n=N, c=C, s=S; kind "rows"
    runs the row kernels on n rows of c columns, where each channel owns s consecutive columns.

    mc is "rows" with s = 1. An ncs input with short rows (S < _SMALL_S, e.g. 7x7) is also run
    as "rows": (N, C, S) -> (N, C*S), so the loops run over C*S contiguous values instead of
    over S; per-column results are merged per channel afterwards.
    """
    n_a, n_c, n_s = _dims(x, layout)
    if layout == "mc":
        return "rows", n_a, n_c, 1
    if n_s < _SMALL_S:
        return "rows", n_a, n_c * n_s, n_s
    return "ncs", n_a, n_c, n_s


_FUSE_BYTES = 1 << 20
"""Largest channel (N * S * itemsize bytes) the fused training forward handles: half of a 2 MiB
L2 cache, so the normalize pass finds the channel's x there."""


def _fuse_ncs(n_b: int, n_c: int, n_s: int, itemsize: int) -> bool:
    """Whether the ncs training forward runs fused per channel (`_py_train_ncs`): each
    channel fits in `_FUSE_BYTES`, and there are at least 4 channels per thread (the
    channels are the only parallel units there)."""
    return n_b * n_s * itemsize <= _FUSE_BYTES and n_c >= 4 * _threads()


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
    """Whether the ncs backward runs fused per channel (`_py_bwd_ncs`): a channel's g and
    x fit in `_FUSE_BWD_BYTES` together, its rows are at least `_FUSE_BWD_ROW`
    bytes long, and there are at least 4 channels per thread."""
    return 2 * n_b * n_s * itemsize <= _FUSE_BWD_BYTES and n_s * itemsize >= _FUSE_BWD_ROW and n_c >= 4 * _threads()


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


def _rows_blocks(n_rows: int, n_cols: int) -> int:
    """Row blocks for the row kernels: 4 per thread, none below ~_SEG values, and per-block
    float64 partial vectors (3 x n_cols each) kept under ~4 MB in all."""
    t = _threads()
    by_size = max(1, (n_rows * n_cols) // _SEG)
    by_memory = max(t, (4 << 20) // (24 * n_cols))
    return max(1, min(n_rows, 4 * t, by_size, by_memory))


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: (y, mean, var_biased). y has x's dtype and memory format; mean and the
    biased variance (C,) are computed in float64; the mean is returned in float64 and the
    variance in ``acc_dtype(x.dtype)`` (as `torch_ops.train_forward`).

    Shape: x (N, C, *) -> y (N, C, *), mean (C,), var (C,).
    """
    layout = _check_supported(x, "train_forward")
    xn = x.detach()
    y = _empty_like(xn)
    kind, n, c, s = _plan(xn, layout)
    small = xn.numel() < _SMALL_WORK
    xf = _flat(xn, layout)
    yf = _flat(y, layout)
    n_c = x.shape[1]
    if kind == "ncs" and _fuse_ncs(n, c, s, xn.element_size()):
        stats = np.empty((2, c))
        k, nseg = _units(n, c, s)
        w = _channel_vec(weight, c, 1.0)
        b = _channel_vec(bias, c, 0.0)
        _run("_train_ncs", xf, n, c, s, k, nseg, float(eps), w, b, stats, yf, small=small)
        st = torch.from_numpy(stats)
        return y, st[0].clone(), st[1].to(acc_dtype(x.dtype))
    st = torch.from_numpy(_stats(xf, kind, n, c, s, n_c, small))
    p = _affine_params(st[0], torch.rsqrt(st[1] + eps), weight, bias, _compute_torch(xn.dtype))
    if kind == "ncs":
        _run("_affine_ncs", xf, n, c, s, _nseg(n * c, s), p, yf, small=small)
    else:
        _run("_affine_mc", xf, n, c, _rows_blocks(n, c), np.repeat(p, s, axis=1), yf, small=small)
    # as torch_ops: the mean in float64 (a float32 mean of 1e4 is off by 5% of a 1e-2 spread),
    # the variance in the accumulation dtype
    return y, st[0].clone(), st[1].to(acc_dtype(x.dtype))


def _stats(xf: np.ndarray, kind: str, n: int, c: int, s: int, n_c: int, small: bool) -> np.ndarray:
    """(2, C) float64 per-channel (mean, biased var) of the flat input (one read of x)."""
    if kind == "ncs":
        stats = np.empty((2, c))
        k, nseg = _units(n, c, s)
        _run("_stats_ncs", xf, n, c, s, k, nseg, stats, small=small)
        return stats
    col = np.empty((2, c))
    _run("_stats_mc", xf, n, c, _rows_blocks(n, c), col, small=small)
    return _merge_columns(col, n_c, s)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch statistics without a normalized output: (mean, var_biased).

    One read of x, no write (the statistics pass of `train_forward`). The mean is
    returned in float64, the biased variance in ``acc_dtype(x.dtype)``, as
    `torch_ops.batch_stats`.

    Shape: x (N, C, *) -> mean (C,), var (C,).
    """
    layout = _check_supported(x, "batch_stats")
    xn = x.detach()
    kind, n, c, s = _plan(xn, layout)
    st = torch.from_numpy(_stats(_flat(xn, layout), kind, n, c, s, x.shape[1], xn.numel() < _SMALL_WORK))
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
    layout = _check_supported(x, "eval_forward")
    xn = x.detach()
    y = _empty_like(xn)
    kind, n, c, s = _plan(xn, layout)
    small = xn.numel() < _SMALL_WORK
    invstd = torch.rsqrt(var.detach().to(torch.float64) + eps)
    p = _affine_params(mean.detach(), invstd, weight, bias, _compute_torch(xn.dtype))
    xf = _flat(xn, layout)
    yf = _flat(y, layout)
    if kind == "ncs":
        _run("_affine_ncs", xf, n, c, s, _nseg(n * c, s), p, yf, small=small)
    else:
        _run("_affine_mc", xf, n, c, _rows_blocks(n, c), np.repeat(p, s, axis=1), yf, small=small)
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
    layout = _check_supported(x, "backward")
    xn = x.detach()
    g = _grad_like(grad_y, xn, "backward")
    dx = _empty_like(xn)
    kind, n, c, s = _plan(xn, layout)
    small = xn.numel() < _SMALL_WORK
    n_c = x.shape[1]
    xf = _flat(xn, layout)
    gf = _flat(g, layout)
    mu = _channel_vec(mean, n_c, 0.0)
    inv = _channel_vec(invstd, n_c, 1.0)
    w = _channel_vec(weight, n_c, 1.0)
    sums = np.empty((2, n_c))
    if kind == "ncs" and _fuse_bwd_ncs(n, c, s, xn.element_size()):
        k, nseg = _units(n, c, s)
        _run("_bwd_ncs", gf, xf, n, c, s, k, nseg, mu, inv, w, sums, _flat(dx, layout), small=small)
        out = torch.from_numpy(sums).to(acc_dtype(x.dtype))
        return dx, out[0].clone(), out[1].clone()
    tot = _bsums(gf, xf, kind, n, c, s, mu, compute_dtype(xn.dtype), small)
    p = _bwd_params(tot, mu, inv, w, float(n * s), sums, compute_dtype(xn.dtype))
    _dx(gf, xf, kind, n, c, s, p, _flat(dx, layout), small)
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
        g = _empty_like(xn).copy_(g)
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
        k, nseg = _units(n, c, s)
        mu_x = mu.astype(cdt)  # sums are taken around the mean rounded to the compute dtype ...
        _run("_bsums_ncs", gf, xf, n, c, s, k, nseg, mu_x, tot, small=small)
        resid = mu - mu_x.astype(np.float64)  # ... and moved to the float64 mean here
        tot[1] -= resid * tot[0]
        tot[2] -= resid * (n * s)
        return tot
    col = np.empty((3, c))
    _run("_bsums_mc", gf, xf, n, c, _rows_blocks(n, c), np.repeat(mu, s), col, small=small)
    return col.reshape(3, -1, s).sum(axis=2)  # (3, C*s) -> (3, C, s) -> (3, C)


def _dx(
    gf: np.ndarray, xf: np.ndarray, kind: str, n: int, c: int, s: int, p: np.ndarray, dxf: np.ndarray, small: bool
) -> None:
    """dx = k1 * g + k2 * ((x - hi) - lo) + k3 with p = (hi, lo, k1, k2, k3) (5, C): one pass."""
    if kind == "ncs":
        _run("_dx_ncs", gf, xf, n, c, s, _nseg(n * c, s), p, dxf, small=small)
    else:
        _run("_dx_mc", gf, xf, n, c, _rows_blocks(n, c), np.repeat(p, s, axis=1), dxf, small=small)


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
    layout = _check_supported(x, "backward_sums")
    xn = x.detach()
    g = _grad_like(grad_y, xn, "backward_sums")
    kind, n, c, s = _plan(xn, layout)
    mu = _channel_vec(mean, x.shape[1], 0.0)
    small = xn.numel() < _SMALL_WORK
    tot = _bsums(_flat(g, layout), _flat(xn, layout), kind, n, c, s, mu, compute_dtype(xn.dtype), small)
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
    layout = _check_supported(x, "backward_apply")
    xn = x.detach()
    g = _grad_like(grad_y, xn, "backward_apply")
    dx = _empty_like(xn)
    kind, n, c, s = _plan(xn, layout)
    n_c = x.shape[1]
    mu = _channel_vec(mean, n_c, 0.0)
    inv = _channel_vec(invstd, n_c, 1.0)
    scale = inv * _channel_vec(weight, n_c, 1.0)
    p = np.empty((5, n_c), dtype=compute_dtype(xn.dtype))
    p[0] = mu
    p[1] = mu - p[0].astype(np.float64)
    p[2] = scale
    p[3] = -scale * inv * _channel_vec(mean_gxhat, n_c, 0.0)
    p[4] = -scale * _channel_vec(mean_g, n_c, 0.0)
    _dx(_flat(g, layout), _flat(xn, layout), kind, n, c, s, p, _flat(dx, layout), xn.numel() < _SMALL_WORK)
    return dx


def _bwd_params(
    tot: np.ndarray, shift: np.ndarray, inv: np.ndarray, w: np.ndarray, m: float, sums: np.ndarray, dtype: Any
) -> np.ndarray:
    """From the sums (sg, sgd, sd) (3, C): dgamma, dbeta into ``sums`` (2, C); returns the dx
    coefficients (5, C) in x's dtype: hi, lo (the refined mean), k1, k2, k3 with

        mu = shift + sd / m,  sum g * (x - mu) = sgd - (sd / m) * sg = sgx
        dx = k1 * g + k2 * (x - mu) + k3,  k1 = w * invstd,  k2 = -w * invstd^3 * sgx / m,
        k3 = -w * invstd * sg / m.
    """
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
