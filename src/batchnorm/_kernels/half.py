"""16-bit float storage for the numba kernels: load as float32, compute, store back (in registers).

numba has no float16/bfloat16 types, so half tensors reach the kernels as raw 16-bit integer
views (no copy; see `storage_view`):

- bfloat16 as ``uint16``: widening is exact, ``float32 bits = bits << 16``; narrowing rounds to
  nearest, ties to even (``(u + 0x7FFF + ((u >> 16) & 1)) >> 16`` on the float32 bits u), with
  NaN kept NaN (0x7FC0) — the rounding of ``Tensor.to(torch.bfloat16)``;
- float16 as ``int16``: LLVM's ``fpext half -> float`` / ``fptrunc float -> half``, IEEE
  round-to-nearest-even (one ``vcvtph2ps``/``vcvtps2ph`` instruction on x86 CPUs with F16C).

Inside jitted code, ``load(v)`` turns a stored element into its compute value (float32 for the
16-bit views, the value itself for float32/float64) and ``store(arr, v)`` turns a compute value
into an element of ``arr``'s dtype; ``compute_zero(arr)`` is 0 in the compute dtype, ``compute_cast(arr, v)`` converts v to it and
``compute_empty(arr, n)`` a 1D scratch array of it. Registering these with numba at import
compiles nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload
from torch import Tensor

__all__ = ["load", "store", "compute_cast", "compute_zero", "compute_empty", "storage_view", "compute_dtype"]

_VIEW = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}
"""Integer view dtype of each 16-bit float dtype (the kernels tell them apart by it)."""


def storage_view(t: Tensor) -> np.ndarray:
    """A numpy view (shared memory) of ``t``: float32/float64 as is, bfloat16 as uint16 bits,
    float16 as int16 bits."""
    v = _VIEW.get(t.dtype)
    return (t if v is None else t.view(v)).numpy()


def compute_dtype(dtype: torch.dtype) -> Any:
    """The numpy dtype the kernels compute in for an input of ``dtype`` (float64 or float32)."""
    return np.float64 if dtype == torch.float64 else np.float32


# --------------------------------------------------------------------------------------------
# LLVM intrinsics (typed on demand by numba; no code is generated before a kernel compiles).


@intrinsic
def _bf16_to_f32(typingctx, v):  # pragma: no cover - compiled
    sig = types.float32(v)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(bits, ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_bf16(typingctx, v):  # pragma: no cover - compiled
    sig = types.uint16(v)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        u = builder.bitcast(args[0], i32)
        odd = builder.and_(builder.lshr(u, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), odd)
        r16 = builder.trunc(builder.lshr(rounded, ir.Constant(i32, 16)), ir.IntType(16))
        isnan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.select(isnan, ir.Constant(ir.IntType(16), 0x7FC0), r16)

    return sig, codegen


@intrinsic
def _f16_to_f32(typingctx, v):  # pragma: no cover - compiled
    sig = types.float32(v)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_f16(typingctx, v):  # pragma: no cover - compiled
    sig = types.int16(v)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


# --------------------------------------------------------------------------------------------
# Generic helpers, specialized per dtype by numba's overload mechanism.


def load(v):  # pragma: no cover - replaced inside jitted code
    """Stored element -> compute value (only callable from jitted code)."""
    raise NotImplementedError


def store(arr, v):  # pragma: no cover
    """Compute value -> element of ``arr``'s dtype (only callable from jitted code)."""
    raise NotImplementedError


def compute_zero(arr):  # pragma: no cover
    """0 in ``arr``'s compute dtype (only callable from jitted code)."""
    raise NotImplementedError


def compute_cast(arr, v):  # pragma: no cover
    """``v`` converted to ``arr``'s compute dtype (only callable from jitted code)."""
    raise NotImplementedError


def compute_empty(arr, n):  # pragma: no cover
    """np.empty(n) in ``arr``'s compute dtype (only callable from jitted code)."""
    raise NotImplementedError


def _compute_of(dtype: Any) -> Any:
    """numba scalar type -> numpy compute dtype."""
    if dtype == types.float64:
        return np.float64
    if dtype in (types.float32, types.uint16, types.int16):
        return np.float32
    raise TypeError(f"batchnorm kernels: unsupported element type {dtype}")


@overload(load, inline="always")
def _ol_load(v):
    if v == types.uint16:
        return lambda v: _bf16_to_f32(v)
    if v == types.int16:
        return lambda v: _f16_to_f32(v)
    if isinstance(v, types.Float):
        return lambda v: v
    return None


@overload(store, inline="always")
def _ol_store(arr, v):
    if not isinstance(arr, types.Array):
        return None
    if arr.dtype == types.uint16:
        return lambda arr, v: _f32_to_bf16(np.float32(v))
    if arr.dtype == types.int16:
        return lambda arr, v: _f32_to_f16(np.float32(v))
    if arr.dtype == types.float32:
        return lambda arr, v: np.float32(v)
    if arr.dtype == types.float64:
        return lambda arr, v: np.float64(v)
    return None


@overload(compute_zero, inline="always")
def _ol_compute_zero(arr):
    dt = _compute_of(arr.dtype)
    return lambda arr: dt(0)


@overload(compute_cast, inline="always")
def _ol_compute_cast(arr, v):
    dt = _compute_of(arr.dtype)
    return lambda arr, v: dt(v)


@overload(compute_empty)
def _ol_compute_empty(arr, n):
    dt = _compute_of(arr.dtype)
    return lambda arr, n: np.empty(n, dtype=dt)
