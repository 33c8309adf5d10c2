"""Planning for the parallel CPU kernels: inputs taken, layouts, work split and parameters.

Shared by `batchnorm._kernels.cpu` and `batchnorm._kernels.cpu_act`:

- inputs: `DTYPES`, `layout_of`, `float16_native`, `check_supported`;
- layout: `plan` (kernel family and dimensions), `flat` (numpy views in the kernels' order);
- work split: `units` (ncs reduction units), `nseg` (ncs elementwise pieces), `rows_blocks`
  (row-kernel blocks), all from `cpu_runtime.threads`;
- parameters: `channel_vec`, `bwd_params` (dgamma, dbeta and the dx coefficients);
- dtypes: `as_native`, `as_dtype` (copies into `cpu_runtime.empty_like` buffers).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch
from llvmlite import binding as llvm_binding
from torch import Tensor

from . import cpu_runtime
from .half import storage_view

__all__ = [
    "DTYPES",
    "SEG",
    "as_dtype",
    "as_native",
    "bwd_params",
    "channel_vec",
    "check_supported",
    "flat",
    "float16_native",
    "layout_of",
    "nseg",
    "plan",
    "rows_blocks",
    "units",
]

SEG = 4096
"""Longest contiguous run handled with one two-pass (mean, M2): 16 KB of float32, L1-resident."""

_SMALL_S = 64
"""ncs inputs with fewer spatial positions per row than this run on the row kernels."""

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""Input dtypes the kernels take (float16 only with hardware conversion, see `float16_native`)."""

_NATIVE = (torch.float32, torch.float64)

_features: dict[str, bool] = {}


# --------------------------------------------------------------------------------------------
# Inputs.


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


def float16_native() -> bool:
    """Whether numba's target CPU converts float16 in hardware (x86 F16C).

    Without it LLVM lowers the float16 conversions of `batchnorm._kernels.half` to
    compiler-rt calls that numba cannot link; float16 inputs then go to torch_ops. Follows
    ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` when set (e.g. ``generic`` for portable caches).
    """
    if "f16" not in _features:
        features = numba.config.CPU_FEATURES
        if features is None:
            host = numba.config.CPU_NAME in (None, "host")
            features = llvm_binding.get_host_cpu_features().flatten() if host else ""
        _features["f16"] = "+f16c" in features
    return bool(_features["f16"])


def check_supported(x: Tensor, where: str) -> str:
    """x's layout (`layout_of`); ValueError naming ``where`` when the kernels cannot take x."""
    ok = x.device.type == "cpu" and x.dtype in DTYPES and not x.is_neg() and x.numel() > 0
    if ok and x.dtype == torch.float16 and not float16_native():
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
# Layout.


def _dims(x: Tensor, layout: str) -> tuple[int, int, int]:
    """(N, C, S) for ncs, (M, C, 1) for mc."""
    c = x.shape[1]
    if layout == "ncs":
        return x.shape[0], c, x.numel() // (x.shape[0] * c)
    return x.numel() // c, c, 1


def plan(x: Tensor, layout: str) -> tuple[str, int, int, int]:
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


def flat(t: Tensor, layout: str) -> np.ndarray:
    """A 1D numpy view (shared memory) of t in the ncs or mc element order."""
    if layout == "mc":
        t = t.movedim(1, -1)  # (N, *spatial, C), contiguous
    return storage_view(t.detach().view(-1))


# --------------------------------------------------------------------------------------------
# Work split.


def units(n_b: int, n_c: int, n_s: int) -> tuple[int, int]:
    """(k rows per group, nseg pieces per row) for ncs reductions.

    Units hold about `SEG` values (k rows of a short row, or a piece of a long one) and there
    are at least 4 per thread when the tensor allows it (within-channel parallelism for small C).
    """
    if n_s >= SEG:
        k, nseg = 1, -(-n_s // SEG)
    else:
        k, nseg = max(1, min(n_b, SEG // n_s)), 1
    want = 4 * cpu_runtime.threads()
    while n_c * -(-n_b // k) * nseg < want:
        if k > 1:
            k = max(1, k // 2)
        elif nseg < n_s:
            nseg = min(n_s, 2 * nseg)
        else:
            break
    return k, nseg


def nseg(rows: int, n_s: int) -> int:
    """Segments per row: enough units for 4 per thread, and each at most `SEG` long."""
    want = max(1, -(-4 * cpu_runtime.threads() // rows))
    return min(n_s, max(want, -(-n_s // SEG)))


def rows_blocks(n_rows: int, n_cols: int) -> int:
    """Row blocks for the row kernels: 4 per thread, none below ~`SEG` values, and per-block
    float64 partial vectors (3 x n_cols each) kept under ~4 MB in all."""
    t = cpu_runtime.threads()
    by_size = max(1, (n_rows * n_cols) // SEG)
    by_memory = max(t, (4 << 20) // (24 * n_cols))
    return max(1, min(n_rows, 4 * t, by_size, by_memory))


# --------------------------------------------------------------------------------------------
# Parameters.


def channel_vec(v: Tensor | None, c: int, fill: float) -> np.ndarray:
    """A float64 numpy copy of a per-channel vector (C,), or ``fill`` everywhere when None."""
    if v is None:
        return np.full(c, fill)
    return v.detach().to(torch.float64).reshape(c).numpy().copy()


def bwd_params(
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


# --------------------------------------------------------------------------------------------
# Dtypes.


def as_native(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (same memory format); float32/float64 unchanged."""
    return x if x.dtype in _NATIVE else cpu_runtime.empty_like(x, torch.float32).copy_(x)


def as_dtype(y: Tensor, dtype: torch.dtype) -> Tensor:
    """y cast to dtype (same memory format); y itself when it already has it."""
    return y if y.dtype == dtype else cpu_runtime.empty_like(y, dtype).copy_(y)
