"""Reusable memory for large kernel outputs (y, dx), so repeated calls skip the page faults.

A tensor above glibc's largest mmap threshold (32 MiB) gets fresh pages from the kernel on
every allocation, and the kernel zeroes each page on first touch. Smaller ones do too whenever
glibc has returned the freed memory to the system in between (its mmap and trim thresholds
move with the sizes freed; interleaved with torch ops allocating tensors of the same size this
happened on most calls: a (128, 512, 7, 7) float32 training forward took 5.2 ms with a fresh
12.8 MB output, 2.2 ms with a reused one, measured on the quiet 2-core VM). Measured for a 51 MB float32
output on the 2-core VM: ``empty_like(x).fill_()`` 12 ms (5 ms with huge pages) against 0.9 ms
for a fill of already-mapped memory, while the whole batch-norm forward kernel takes ~4 ms.

`empty_like` therefore serves outputs of at least `MIN_BYTES` from a pool of byte
buffers (numpy arrays). A returned tensor's storage is built on the buffer with
``torch.from_numpy``, and so holds a reference to it for as long as *any* tensor, view or saved
autograd tensor uses that memory. A buffer is handed out again only when the pool's own
reference is the last one (``sys.getrefcount``), i.e. no tensor can still see the memory; it
is then an ordinary new output, overwritten by the kernel before it is returned.

Idle buffers are kept up to `KEEP_BYTES` in all (the oldest idle ones are dropped
first); `release` drops every idle buffer. Tensors from the pool are normal tensors
(not views) except that their storage cannot be resized (``resize_`` to a larger size raises).
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import torch
from torch import Tensor

__all__ = ["MIN_BYTES", "KEEP_BYTES", "empty_like", "release", "idle_bytes"]

MIN_BYTES = 1 << 20
"""Smallest output served from the pool (1 MiB; glibc keeps smaller blocks in its heap)."""

KEEP_BYTES = 512 << 20
"""Most bytes of idle buffers kept for reuse."""

_ALIGN = 4096
"""Start address alignment of pool buffers (a page). numpy aligns large arrays to 16 bytes only:
an output 16 bytes off a 64-byte cache line splits every 64-byte vector store across two lines
(measured: 51 MB float32 training forward 4.5 ms into such a buffer, 3.7 ms into an aligned one)."""

_lock = threading.Lock()
_buffers: list[np.ndarray] = []
"""Every buffer of the pool (in use or idle), oldest first; uint8, 1D."""

_REFS_IDLE = 3
"""sys.getrefcount of an idle buffer inside `_idle`: the list, the loop variable, the call."""


def _idle() -> list[np.ndarray]:
    """The buffers no tensor references any more (call with ``_lock`` held)."""
    return [buf for buf in _buffers if sys.getrefcount(buf) <= _REFS_IDLE]


def _advise(buf: np.ndarray) -> None:
    """Huge pages for a new buffer (see `batchnorm._kernels.cpu_runtime.madvise_huge`); best effort."""
    from .cpu_runtime import madvise_huge

    madvise_huge(torch.from_numpy(buf))


def _drop(buf: np.ndarray) -> None:
    """Remove ``buf`` from the pool (by identity: numpy's == is elementwise)."""
    _buffers[:] = [b for b in _buffers if b is not buf]


def _take(nbytes: int) -> np.ndarray:
    """An idle buffer of exactly ``nbytes`` bytes, or a new one (added to the pool); then the
    idle buffers beyond `KEEP_BYTES` are dropped, oldest first."""
    with _lock:
        buf = next((b for b in _idle() if b.nbytes == nbytes), None)
        if buf is None:
            raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
            skip = -raw.ctypes.data % _ALIGN
            buf = raw[skip : skip + nbytes]  # aligned view; it keeps raw alive through .base
            _advise(buf)
            _buffers.append(buf)
        idle = _idle()  # without buf: the local name holds it
        excess = sum(b.nbytes for b in idle) - KEEP_BYTES
        for old in idle:
            if excess <= 0:
                break
            excess -= old.nbytes
            _drop(old)
        return buf


def empty_like(x: Tensor, dtype: torch.dtype) -> Tensor | None:
    """An uninitialized CPU tensor with x's shape and strides in ``dtype`` from the pool, or None
    when the output is smaller than `MIN_BYTES` (the caller allocates it normally).

    ``x`` must be dense and non-overlapping (contiguous in some dim order), as every input of
    the CPU kernels is.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = x.numel() * itemsize
    if nbytes < MIN_BYTES:
        return None
    buf = _take(nbytes)
    storage = torch.from_numpy(buf).untyped_storage()  # holds a reference to buf
    out = torch.empty((0,), dtype=dtype)
    out.set_(storage, 0, tuple(x.shape), tuple(x.stride()))
    return out


def release() -> None:
    """Drop every idle buffer (their memory goes back to the system)."""
    with _lock:
        for buf in _idle():
            _drop(buf)


def idle_bytes() -> int:
    """Bytes held in idle buffers."""
    with _lock:
        return sum(b.nbytes for b in _idle())
