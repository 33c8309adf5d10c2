"""Choose the kernel back-end for a tensor.

Back-ends:
- ``"torch"``: `batchnorm._kernels.torch_ops`, pure torch, any device, differentiable;
- ``"numba"``: `batchnorm._kernels.cpu`, fused parallel CPU kernels (needs numba), CPU
  tensors only, at every size (tests use it to reach these kernels with small tensors);
- ``"triton"``: `batchnorm._kernels.triton_bn` (needs triton), CUDA tensors, and CPU
  tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` is set (slow; for tests).
  Inputs it cannot run (e.g. empty or oddly strided) go to torch;
- ``"native"``: `batchnorm._kernels.native`, torch's own aten batch-norm kernels, any
  device (contiguous or channels-last inputs; others go to torch).

``"auto"`` (the default):

- CUDA tensors go to ``native`` (torch's fast CUDA batch-norm kernels, no host sync), never to
  the pure-torch fallback, unless ``native`` cannot take them (e.g. oddly strided);
- CPU tensors, when numba is installed: float32/float64 tensors of fewer than
  ``AUTO_MIN_NUMEL`` elements go to the serial one-call kernels of
  `batchnorm._kernels.cpu_small`, float16/bfloat16 ones (``AUTO_NATIVE``) to ``native``,
  and tensors of at least ``AUTO_MIN_NUMEL`` elements to the parallel kernels of
  `batchnorm._kernels.cpu`; everything else (other devices, unsupported strides, no
  numba) to torch (small 16-bit tensors to ``native`` even without numba).

The CPU rule is measured (same run, kernels called directly, medians of 5 rounds of 60 calls,
microseconds; 2 shared cores, ``torch.set_num_threads(1)`` so that OpenMP stalls of the busy
machine stay out): ``native`` loses to ``cpu_small`` on small float32 tensors (train forward
37 vs 15 at 32x128, 54 vs 28 at 64x512, 134 vs 41 at 60x100x8; backward 31 vs 22, 51 vs 38,
71 vs 49; eval level), so float32/float64 keep the numba kernels, but it beats the pure-torch
path that small 16-bit tensors took before (bfloat16 train forward 37 vs 73, 51 vs 109,
145 vs 341, 49 vs 125 at 32x128, 64x512, 60x100x8, 16x32x8x8; backward 33 vs 60, 53 vs 104,
278 vs 317, 46 vs 108; eval 35 vs 30, 45 vs 45, 55 vs 126, 41 vs 45; float16 alike with
2 threads). Commands:
``python -m benchmarks.bn_native --direct --threads 1 --repeats 5 --calls 60`` (these
numbers) and ``python -m benchmarks.bn_native`` (through the layers, every back-end). Both aten paths stall for milliseconds on a machine whose cores
are oversubscribed (their OpenMP regions wait for descheduled threads); the serial numba
kernels do not, which is one more reason float32/float64 stay there.

The choice is global, and can be set with `set_backend`, the `use_backend` context
manager, or the ``BATCHNORM_BACKEND`` environment variable (read when first needed, not at
import).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

from . import native, torch_ops

__all__ = ["BACKENDS", "aten_direct", "get_backend", "host_kernels", "set_backend", "use_backend", "backend_for"]

BACKENDS = ("auto", "torch", "numba", "triton", "native")
BACKEND_API = (
    "supports",
    "train_forward",
    "eval_forward",
    "backward",
    "batch_stats",
    "backward_sums",
    "backward_apply",
)
"""The functions every numba back-end module provides, with torch_ops' contracts."""
AUTO_MIN_NUMEL = 1 << 17
"""Under "auto", CPU tensors with fewer elements go to ``cpu_small``, larger ones to ``cpu``."""
AUTO_NATIVE: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
"""Under "auto", CPU tensors of these dtypes with fewer than ``AUTO_MIN_NUMEL`` elements go to ``native``."""
_state: dict[str, str | None] = {"name": None}
_numba_module: dict[str, ModuleType | None] = {}
_numba_error: dict[str, str] = {}
_warned: dict[str, bool] = {"no_numba": False}


def get_backend() -> str:
    """The current back-end name: one of ``BACKENDS``."""
    if _state["name"] is None:
        _state["name"] = _check(os.environ.get("BATCHNORM_BACKEND", "auto"))
    return _state["name"]  # type: ignore[return-value]


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"batchnorm back-end must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the global back-end (one of ``BACKENDS``)."""
    _state["name"] = _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily use back-end ``name``; the previous one is restored on exit."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state["name"] = previous


def _numba(name: str = "cpu") -> ModuleType | None:
    """The numba back-end module ``batchnorm._kernels.<name>`` ("cpu" or "cpu_small"), or None
    when numba (or the module) is unavailable."""
    if name not in _numba_module:
        try:
            _numba_module[name] = importlib.import_module(f"batchnorm._kernels.{name}")
        except ImportError as err:
            _numba_module[name] = None
            _numba_error[name] = f"{type(err).__name__}: {err}"
    return _numba_module[name]


def host_kernels() -> ModuleType | None:
    """The serial numba kernels (`batchnorm._kernels.cpu_small`), for work on CPU memory
    outside the kernel contract (the running-statistics update), or None without numba."""
    return _numba_module.get("cpu_small") or _numba("cpu_small")


def _torch_instead(x: torch.Tensor) -> ModuleType:
    """torch ops for a CPU input that the numba kernels would have taken; says so once per process."""
    if not _warned["no_numba"] and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        _warned["no_numba"] = True
        why = next(iter(_numba_error.values()), "numba is missing")
        warnings.warn(
            f"batchnorm: the fast CPU kernels are unavailable ({why}); using slower torch ops. Fix: pip install numba",
            RuntimeWarning,
            stacklevel=3,
        )
    return torch_ops


AUTO_ATEN_MAX = 1 << 19
"""Under "auto", a layer step on the eager path with a CPU float32/float64 input of fewer elements
runs aten's kernels with aten's own autograd (`aten_direct`). Measured by
``python -m benchmarks.crossover --threads 1`` (training step, ours/torch's layer, same run):
aten's path 0.8-1.2x at every size; our numba kernels 2.0-2.2x at 256x512 and 512x512, 0.78x
at 64x64x8x8, 0.70x at 1024x512, 0.56x at 64x64x16x16, 0.26x at 64x64x56x56."""


def aten_direct(x: torch.Tensor) -> bool:
    """Whether a BatchNorm*d step on the eager path runs aten's batch-norm kernels directly, with
    aten's (C++) autograd, our running-statistics update and precision check on top
    (`batchnorm.ops.bn.train_step`): CPU inputs, under "native" at every size, under "auto"
    below ``AUTO_ATEN_MAX`` elements. The step itself declines (and the kernel contract runs)
    what aten's kernel does not take with our semantics: 16-bit inputs (the contract's
    statistics are float32), mixed dtypes, layouts `native.supports` refuses.

    Why: on a small tensor a step's cost is its Python, not its kernels. Our serial kernels are
    faster than aten's (see the module docstring), but their backward is a Python
    ``autograd.Function``; aten's backward is C++ end to end, which makes the whole step
    cheaper (``python -m benchmarks.bn_small``)."""
    name = _state["name"] or get_backend()
    if name == "auto":
        return x.is_cpu and x.numel() < AUTO_ATEN_MAX
    return name == "native" and x.is_cpu


def backend_for(x: torch.Tensor) -> ModuleType:
    """The kernel module to run for input ``x`` under the current back-end setting."""
    name = _state["name"] or get_backend()
    if name == "auto" and x.device.type == "cpu" and x.numel() < AUTO_MIN_NUMEL and x.dtype not in AUTO_NATIVE:
        small = _numba_module.get("cpu_small") or _numba("cpu_small")  # the common case first: one call
        if small is None:
            return _torch_instead(x)
        return small if small.supports(x) else torch_ops
    if name == "torch":
        return torch_ops
    if name == "triton":
        return _triton_for(x)
    if name == "native" or (name == "auto" and x.device.type == "cuda"):
        return native if native.supports(x) else torch_ops
    if name == "auto" and x.numel() < AUTO_MIN_NUMEL:  # small: one serial call, or torch's kernels
        if x.dtype in AUTO_NATIVE and x.device.type == "cpu" and native.supports(x):
            return native
        small = _numba("cpu_small")
        if small is None:
            return _torch_instead(x)
        return small if small.supports(x) else torch_ops
    cpu = _numba()
    if cpu is None:
        if name == "numba":
            raise RuntimeError(
                "batchnorm back-end 'numba' was requested but batchnorm._kernels.cpu cannot be imported "
                "(is numba installed? pip install numba)"
            )
        return _torch_instead(x)
    return cpu if cpu.supports(x) else torch_ops  # type: ignore[return-value]


def _triton_for(x: torch.Tensor) -> ModuleType:
    """The Triton module for ``x``, torch_ops for inputs it does not take; RuntimeError when
    triton is missing or a CPU tensor arrives without the interpreter."""
    try:
        triton_bn = importlib.import_module("batchnorm._kernels.triton_bn")
    except ImportError as exc:
        raise RuntimeError(f"batchnorm back-end 'triton' was requested but cannot be used: {exc}") from exc
    if triton_bn.supports(x):
        return triton_bn
    if x.device.type == "cpu" and not triton_bn.INTERPRETED:
        raise RuntimeError(f"batchnorm back-end 'triton': {triton_bn.unavailable_reason(x)}")
    return torch_ops
