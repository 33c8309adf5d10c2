"""Where the Triton kernels run and how a launch is planned (private to the ``"triton"``
back-end; imported by `batchnorm._kernels.triton_bn`, never at ``import batchnorm``).

- availability: `INTERPRETED`, `interpreter_requested`, `unavailable_reason`, `supports`,
  `check` (the ``ValueError`` form);
- geometry: `layout_of` (``"ncs"`` contiguous with spatial > 1, ``"mc"`` channels innermost)
  and `Geo`, x seen as (N, C, S) with the strides of a reduction tile;
- launch plans: `reduce_plan` (tile, row splits), `words_per_program` (elementwise passes);
- argument helpers: `vec` (optional per-channel vector), `like` (a tensor in x's shape,
  dtype and strides), `on_device` (the CUDA device context).

Importing this module imports triton (``triton``) and the device code (``K``,
`batchnorm._kernels.triton_kernels`), and raises ImportError, with the install hint, when
triton is missing.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor

try:
    import triton
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchnorm back-end 'triton' needs the triton package (pip install 'triton>=3'; Linux "
        "x86-64 wheels): " + str(exc)
    ) from exc

from . import triton_kernels as K

__all__ = [
    "K",
    "triton",
    "ACT_CODES",
    "DTYPES",
    "Geo",
    "INTERPRETED",
    "TARGET_PROGRAMS",
    "check",
    "interpreter_requested",
    "layout_of",
    "like",
    "on_device",
    "reduce_plan",
    "supports",
    "unavailable_reason",
    "vec",
    "words_per_program",
]


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET is set now (it takes effect only at this module's first import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


try:  # triton >= 3.4 reads its settings through ``triton.knobs``
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older triton
    _knobs = None
INTERPRETED: bool = bool(_knobs.runtime.interpret) if _knobs is not None else interpreter_requested()
"""Whether the kernels were created for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
if INTERPRETED and _knobs is not None:
    # triton reads the knob again at launch (e.g. when it lazily imports its gluon front end):
    # keep it consistent with the kernels created here even if the variable is unset later
    _knobs.runtime.interpret = True
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACT_CODES = {"identity": K.ACT_IDENTITY, "relu": K.ACT_RELU, "leaky_relu": K.ACT_LEAKY, "elu": K.ACT_ELU}
TARGET_PROGRAMS = {"cpu": 4}
"""Programs a reduction aims at per device type (CUDA: 4 per SM); splits follow from it."""


def layout_of(x: Tensor) -> str | None:
    """``"ncs"`` (contiguous, spatial > 1), ``"mc"`` (C innermost) or None."""
    if x.dim() < 2 or x.dim() > 5:
        return None
    spatial = x.numel() // max(1, x.shape[0] * x.shape[1])
    if x.dim() > 2 and spatial > 1 and x.is_contiguous():
        return "ncs"
    if x.movedim(1, -1).is_contiguous():
        return "mc"
    return None


def unavailable_reason(x: Tensor) -> str | None:
    """Why these kernels cannot run ``x`` (None when `supports` holds)."""
    if not isinstance(x, Tensor):
        return f"expected a tensor, got {type(x).__name__}"
    if x.device.type == "cpu" and not INTERPRETED:
        return (
            "CPU tensors run the Triton kernels only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before the first use of the 'triton' back-end"
        )
    if x.device.type not in ("cpu", "cuda"):
        return f"expected a CUDA tensor, got one on {x.device}"
    if x.device.type == "cuda" and INTERPRETED:
        return "the Triton kernels were created for the interpreter (TRITON_INTERPRET=1); unset it for CUDA"
    if x.dtype not in DTYPES:
        return f"expected dtype in {DTYPES}, got {x.dtype}"
    if x.layout != torch.strided or x.is_neg() or x.is_conj():
        return "expected a plain strided tensor"
    if x.numel() == 0 or x.numel() >= 2**31:
        return f"expected 1 to 2**31 - 1 elements, got {x.numel()}"
    if layout_of(x) is None:
        return f"expected 2-5 dims, contiguous or channels-last, got shape {tuple(x.shape)} strides {x.stride()}"
    return None


def supports(x: Tensor) -> bool:
    """True for non-empty float16/bfloat16/float32/float64 tensors of 2-5 dims, contiguous or
    channels-last, on CUDA (or on CPU under the interpreter)."""
    return unavailable_reason(x) is None


def check(x: Tensor, where: str) -> str:
    why = unavailable_reason(x)
    if why is not None:
        raise ValueError(f"batchnorm._kernels.triton_bn.{where}: {why}")
    return layout_of(x)  # type: ignore[return-value]


class Geo:
    """Geometry of x seen as (N, C, S): strides of the reduction tile and the flat channel map."""

    def __init__(self, x: Tensor, layout: str) -> None:
        self.n, self.c = x.shape[0], x.shape[1]
        self.s = x.numel() // max(1, self.n * self.c)
        self.numel = x.numel()
        if layout == "ncs":
            self.r, self.S, self.s_n, self.s_c, self.s_s, self.div = (
                self.n * self.s,
                self.s,
                self.c * self.s,
                self.s,
                1,
                self.s,
            )
        else:  # rows of C: (n, s) folded into one row index
            self.r, self.S, self.s_n, self.s_c, self.s_s, self.div = self.n * self.s, 1, self.c, 1, 0, 1
        self.layout = layout


def on_device(x: Tensor) -> Any:
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def reduce_plan(geo: Geo, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, nsplit, per): tile, number of row splits and rows per split."""
    if geo.layout == "ncs":
        block_c, block_r = 1, 1024
    else:
        block_c = min(64, triton.next_power_of_2(geo.c))
        block_r = max(16, 4096 // block_c)
    block_r = min(block_r, max(16, triton.next_power_of_2(geo.r)))
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = TARGET_PROGRAMS["cpu"]
    cblocks = triton.cdiv(geo.c, block_c)
    want = triton.cdiv(target, cblocks)
    nsplit = max(1, min(want, triton.cdiv(geo.r, 2 * block_r)))
    per = triton.cdiv(triton.cdiv(geo.r, nsplit), block_r) * block_r
    return block_r, block_c, triton.cdiv(geo.r, per), per


def words_per_program(x: Tensor) -> int:
    """Words of 32 elements per elementwise program."""
    return 32 if x.device.type == "cuda" else 64


def vec(v: Tensor | None, x: Tensor) -> tuple[Tensor, bool]:
    """(pointer tensor, present) for an optional per-channel vector."""
    if v is None:
        return x, False
    return v.detach().contiguous(), True


def like(t: Tensor, x: Tensor, where: str) -> Tensor:
    """``t`` with x's shape, dtype and strides (a copy when they differ)."""
    if t.shape != x.shape:
        raise ValueError(f"batchnorm._kernels.triton_bn.{where}: expected shape {tuple(x.shape)}, got {tuple(t.shape)}")
    t = t.detach()
    if t.dtype != x.dtype or t.stride() != x.stride() or t.device != x.device:
        t = torch.empty_like(x).copy_(t)
    return t
