"""Choose the kernel back-end for a tensor.

Back-ends:
- ``"torch"``: :mod:`batchnorm._kernels.torch_ops`, pure torch, any device, differentiable;
- ``"numba"``: :mod:`batchnorm._kernels.cpu`, fused CPU kernels (needs numba), CPU tensors only.

``"auto"`` (the default) picks numba for CPU tensors of supported dtype when numba is
installed, torch otherwise. The choice is global, and can be set with :func:`set_backend`, the
:func:`use_backend` context manager, or the ``BATCHNORM_BACKEND`` environment variable (read
when first needed, not at import).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from . import torch_ops

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "backend_for"]

BACKENDS = ("auto", "torch", "numba")
_state: dict[str, str | None] = {"name": None}
_numba_module: dict[str, ModuleType | None] = {}


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
    """Set the global back-end (``"auto"``, ``"torch"`` or ``"numba"``)."""
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


def _numba() -> ModuleType | None:
    """The numba CPU back-end module, or None when numba (or the module) is unavailable."""
    if "cpu" not in _numba_module:
        try:
            _numba_module["cpu"] = importlib.import_module("batchnorm._kernels.cpu")
        except ImportError:
            _numba_module["cpu"] = None
    return _numba_module["cpu"]


def backend_for(x: torch.Tensor) -> ModuleType:
    """The kernel module to run for input ``x`` under the current back-end setting."""
    name = get_backend()
    if name == "torch":
        return torch_ops
    cpu = _numba()
    usable = cpu is not None and cpu.supports(x)
    if name == "numba" and cpu is None:
        raise RuntimeError(
            "batchnorm back-end 'numba' was requested but batchnorm._kernels.cpu cannot be imported "
            "(is numba installed? pip install 'batchnorm[fast]')"
        )
    return cpu if usable else torch_ops  # type: ignore[return-value]
