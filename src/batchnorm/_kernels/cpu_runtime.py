"""The numba runtime of the CPU kernels: compiling, threading, launching and output buffers.

- compiling: `jit` (``numba.njit`` with the disk cache), `FASTMATH` (the reductions' fastmath
  flags), `serial_copy` and `LazyKernels` (a module's kernels, compiled on first request);
- threading: `configure_threading` (numba's threading layer), `omp_usable`, `serial` (the
  fork rule) and `threads` (threads per launch; its first call starts numba's pool);
- launching: `launch` (one launch at a time; one thread for tensors under `SMALL_WORK` elements);
- buffers: `empty_like` (outputs, large ones from `batchnorm._kernels.outpool`) and
  `madvise_huge` (transparent huge pages for fresh memory).

Threading layer: numba's OpenMP layer by default on Linux (see `configure_threading`);
in a process forked from one whose OpenMP pool is running, the kernels run compiled without
``parallel`` (numba would terminate the child at a parallel launch).

Compilation happens on the first call of each kernel (never at import) and is cached on disk
(``cache=True``: numba's ``__pycache__`` next to the kernels' source file, or
``NUMBA_CACHE_DIR``, or the user-wide cache). If no cache location is writable, the kernels are
compiled without a cache instead of failing.
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
import torch
from torch import Tensor

from . import outpool

__all__ = [
    "FASTMATH",
    "SMALL_WORK",
    "LazyKernels",
    "configure_threading",
    "empty_like",
    "jit",
    "launch",
    "madvise_huge",
    "omp_usable",
    "serial",
    "serial_copy",
    "threads",
]

SMALL_WORK = 1 << 17
"""Tensors with fewer elements run their kernels on the calling thread alone (see `launch`)."""

FASTMATH = {"reassoc", "contract"}
"""Reassociation lets LLVM vectorize the sums; no 'nnan'/'ninf', so NaN and inf propagate."""


# --------------------------------------------------------------------------------------------
# Compiling: kernels are plain functions, compiled on first use.


def jit(func: Callable[..., Any], **options: Any) -> Any:
    """``numba.njit(func, cache=True, **options)``, or without cache if no cache dir is writable."""
    try:
        return numba.njit(cache=True, **options)(func)
    except (RuntimeError, OSError):
        # numba raises RuntimeError("cannot cache function ...: no locator available") when
        # neither NUMBA_CACHE_DIR, __pycache__ next to the source, nor the user cache is writable
        return numba.njit(cache=False, **options)(func)


def serial_copy(func: Callable[..., Any]) -> Callable[..., Any]:
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


class LazyKernels:
    """The parallel kernels of one module, each compiled on its first request.

    ``namespace`` is the module's ``globals()``: kernel ``name`` is its function ``_py_<name>``.
    Before the first kernel is created, the threading layer is configured
    (`configure_threading`) and, for each helper ``h`` of ``helpers`` (name -> jit options, in
    order), the global ``_<h>`` is replaced by the jitted ``_py_<h>`` (the kernels call the
    helpers as globals).
    """

    def __init__(self, namespace: dict[str, Any], helpers: dict[str, dict[str, Any]]) -> None:
        self._namespace = namespace
        self._helpers = helpers
        self._helpers_built = False
        self._kernels: dict[str, Any] = {}

    @property
    def compiled(self) -> dict[str, Any]:
        """The dispatchers created so far, by key (``name``, or ``name@serial``); a copy."""
        return dict(self._kernels)

    def kernel(self, name: str) -> Any:
        """The dispatcher of kernel ``name``: created on first request, compiled on first call.

        In a serial process (`serial`) the same function is compiled without ``parallel``
        (``prange`` runs as ``range``; see `serial_copy`), under its own key ``name@serial``.
        """
        in_serial = serial()
        key = name + "@serial" if in_serial else name
        kern = self._kernels.get(key)
        if kern is None:
            if not self._helpers_built:
                configure_threading()
                self._build_helpers()
            func = self._namespace["_py_" + name]
            if in_serial:
                kern = jit(serial_copy(func), parallel=False)
            else:
                kern = jit(func, parallel=True)
            self._kernels[key] = kern
        return kern

    def run(self, name: str, *args: Any, small: bool = False) -> None:
        """Launch kernel ``name`` on ``args`` (see `launch`)."""
        launch(self.kernel(name), args, small=small)

    def _build_helpers(self) -> None:
        """Replace the scalar helpers by their jitted versions (the kernels call them as globals)."""
        g = self._namespace
        for name, options in self._helpers.items():
            g["_" + name] = jit(g["_py_" + name], **options)
        self._helpers_built = True


# --------------------------------------------------------------------------------------------
# Threading.

_state: dict[str, bool] = {}
"""``threading``: the threading layer is configured; ``pool``: numba's pool is started."""

_launch_lock = threading.Lock()
_pool_lock = threading.Lock()
_fork_state = {"serial": False}
"""``serial``: set in a forked child whose parent started numba's OpenMP pool (see below)."""


def configure_threading() -> None:
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
    run there compiled without ``parallel`` (`serial`): same results, one thread, no
    launch. Launches are serialized by a lock (the workqueue layer refuses concurrent ones).
    """
    if _state.get("threading"):
        return
    _state["threading"] = True
    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "omp" if omp_usable() else "workqueue"


def omp_usable() -> bool:
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
    # registered when this module is first imported (dispatch imports the back-ends lazily, at
    # the first CPU tensor), so that it also covers a pool that someone else's numba code started
    os.register_at_fork(after_in_child=_after_fork_in_child)


def serial() -> bool:
    """Whether the kernels must run without a parallel launch (forked child of an OpenMP parent)."""
    return _fork_state["serial"]


def threads() -> int:
    """Threads per launch: numba's count, capped by ``torch.get_num_threads()``.

    The cap makes ``torch.set_num_threads`` (and torchrun's ``OMP_NUM_THREADS=1``) hold for
    our kernels too: 2 processes x 2 numba threads on 2 cores, spinning under OpenMP, made a
    DDP step 2-5x slower (benchmarks/bench_sync.py). Its first call starts numba's pool, so the
    threading layer is chosen before.
    """
    if serial():
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
    if _state.get("pool"):
        return
    configure_threading()
    with _pool_lock:
        if _state.get("pool"):
            return
        before = torch.get_num_threads()
        numba.get_num_threads()  # starts the pool, choosing the threading layer
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
        _state["pool"] = True


# --------------------------------------------------------------------------------------------
# Launching.


def launch(kern: Any, args: tuple[Any, ...], *, small: bool = False) -> None:
    """Run compiled kernel ``kern`` on `threads` threads, one launch at a time.

    ``small``: run on one thread. For small tensors, waking numba's workers costs more than
    the work, and much more right after torch ops whose OpenMP threads still spin on the cores.
    """
    if not serial():
        _start_pool()
    with _launch_lock:
        if serial():
            kern(*args)
            return
        want = 1 if small else threads()
        before = numba.get_num_threads()
        if want == before:
            kern(*args)
            return
        numba.set_num_threads(want)
        try:
            kern(*args)
        finally:
            numba.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Buffers.

_HUGE = 1 << 21
"""Transparent-huge-page size on x86-64 Linux (2 MiB)."""

_libc: dict[str, Any] = {}


def madvise_huge(t: Tensor) -> None:
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


def empty_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.empty_like(x, dtype=dtype)`` (same memory format); outputs of at least
    ``outpool.MIN_BYTES`` come from `batchnorm._kernels.outpool` (memory no tensor uses
    any more, reused without page faults; new pool buffers on huge pages)."""
    out = outpool.empty_like(x, x.dtype if dtype is None else dtype)
    if out is not None:
        return out
    # below outpool.MIN_BYTES (1 MiB) glibc's heap reuses freed memory: no page faults, and no
    # huge pages (advising them on heap blocks made a 16 MB output 2.8x slower to fill)
    return torch.empty_like(x, dtype=dtype)
