"""Per-channel (sum, sum of squares) of a CPU tensor in one pass, with numba (private).

Used by [`Moments.from_tensor`][batchnorm.Moments.from_tensor] for its common case, an (N, C, *) float32 or
float64 input reduced over every dim but C, where it is several times faster than a float64
copy plus ``torch.var_mean`` and makes population statistics nearly free next to the forward
pass.

Numerics: values are shifted by one sample per channel (``shift_c = x[0, c, 0...]``) and
accumulated in float64,

    S1 = sum (x - shift),   S2 = sum (x - shift)^2,   mean = shift + S1/n,   M2 = S2 - S1^2/n.

The subtraction in M2 loses about log10(k) of float64's 16 digits, with
``k = 1 + (mean - shift)^2 / var``; the shift is a sample of the data, so k is small unless that
sample is an extreme outlier. The caller checks k and falls back to an exact two-pass
computation above 1e6 (``needs_two_pass``). Only reassociation is allowed to the compiler
(``fastmath={"reassoc", "contract"}``: vectorized partial sums), so NaN/inf still propagate.

numba is imported and the kernels compiled on first use, never at import time;
``available()`` is False when numba is missing, and callers then use torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["available", "shifted_sums", "needs_two_pass"]

_KERNELS: dict[str, Any] = {}
_STATE = {"tried": False}


def _compile() -> None:
    """Import numba and define the two kernels (once)."""
    _STATE["tried"] = True
    try:
        import numba
        import numpy as np
    except ImportError:
        return
    flags = {"reassoc", "contract"}

    @numba.njit(fastmath=flags, cache=False)
    def sums_nck(x: Any, shift: Any, s1: Any, s2: Any) -> None:  # pragma: no cover - compiled
        # x (N, C, K) contiguous: inner loop over the K contiguous values of one (n, c)
        n_, c_, k_ = x.shape
        for n in range(n_):
            for c in range(c_):
                sh = shift[c]
                a = 0.0
                b = 0.0
                for k in range(k_):
                    d = np.float64(x[n, c, k]) - sh
                    a += d
                    b += d * d
                s1[c] += a
                s2[c] += b

    @numba.njit(fastmath=flags, cache=False)
    def sums_mc(x: Any, shift: Any, s1: Any, s2: Any) -> None:  # pragma: no cover - compiled
        # x (M, C) contiguous: rows are samples (or pixels, for channels_last)
        m_, c_ = x.shape
        for m in range(m_):
            for c in range(c_):
                d = np.float64(x[m, c]) - shift[c]
                s1[c] += d
                s2[c] += d * d

    _KERNELS["nck"] = sums_nck
    _KERNELS["mc"] = sums_mc


def available() -> bool:
    """True when numba can be imported (compiles the kernels on the first call)."""
    if not _STATE["tried"]:
        _compile()
    return bool(_KERNELS)


def _layout(x: Tensor) -> tuple[str, Tensor] | None:
    """The kernel and the contiguous view to run it on, or None if neither fits without a copy."""
    if x.dim() == 2 and x.is_contiguous():
        return "mc", x  # (N, C)
    if x.is_contiguous():
        return "nck", x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, K)
    moved = x.movedim(1, -1)  # (N, *spatial, C): contiguous for channels_last
    if moved.is_contiguous():
        return "mc", moved.reshape(-1, x.shape[1])  # (N * K, C)
    return None


def shifted_sums(x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(shift, S1, S2) per channel of an (N, C, *) CPU float32/float64 tensor, all float64 (C,).

    Returns None when the fast path does not apply (numba missing, other device or dtype,
    no contiguous layout, empty tensor); the caller then computes the moments with torch.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() < 2 or x.numel() == 0:
        return None
    if x.requires_grad:
        x = x.detach()
    found = _layout(x)
    if found is None or not available():
        return None
    kind, view = found
    arr = view.numpy()
    # the first value of each channel: row 0 of (N, C) / (N*K, C), or x[0, c, 0] of (N, C, K)
    shift = (arr[0].astype("float64") if kind == "mc" else arr[0, :, 0].astype("float64")).copy()
    c = x.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    _KERNELS[kind](arr, shift, s1.numpy(), s2.numpy())
    return torch.from_numpy(shift), s1, s2


def needs_two_pass(s1: Tensor, m2: Tensor, n: int) -> bool:
    """True when the shift was so far from the mean that M2 = S2 - S1^2/n lost > 6 digits."""
    mean_d_sq = (s1 / n).square()
    var = m2.clamp_min(0) / n
    return bool((mean_d_sq > 1e6 * var).any())
