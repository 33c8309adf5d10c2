"""Which path a layer call takes: the one decision, made once per call (private).

Every operator entry (``train_forward``, ``eval_forward``, ``update_running_stats_``, the act,
ghost and sync entries) asks `eager` once and then takes one of two paths:

=====================  ==========================================================================
path                   taken when, and what runs
=====================  ==========================================================================
eager                  `eager` is True: no torch.compile / torch.export / jit.trace /
                       torch.func transform / dispatch or function mode / forward-mode AD is
                       active, and every tensor argument is a plain ``Tensor`` or ``Parameter``.
                       The operator's implementation runs directly (the kernel back-end is
                       chosen once, by `batchnorm._kernels.dispatch.backend_for`); when a
                       gradient is needed, through the operator's ``autograd.Function`` applied
                       with `apply` (no Python argument binding). BatchNorm*d steps on small
                       CPU inputs (`batchnorm._kernels.dispatch.aten_direct`) first try aten's
                       kernel with our guard: one C++ call when `batchnorm._kernels.step_ext`
                       is built, else its Python form; an input it declines takes the above.
dispatcher             everything else: the registered ``torch.ops.batchnorm.*`` operator
                       (fake implementation for compilers and meta tensors, batching rule for
                       vmap, registered autograd), applied through the ``autograd.Function``
                       (``Function.apply``, so torch.func sees it); with forward-mode AD active,
                       the Function's subclass that carries a ``jvp``.
=====================  ==========================================================================

Both paths compute the same numbers with the same kernels; the dispatcher exists for the tools
that need a node (compilers, export, vmap), the eager path because on small tensors the
dispatch around a kernel costs several times the kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = [
    "apply",
    "compiling_not_exporting",
    "eager",
    "eager_backward",
    "forward_ad_active",
    "needs_grad",
    "recomputing",
]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_c = torch._C


def eager(first: Tensor, *tensors: Tensor | None) -> bool:
    """True when a call may run its operator's implementation directly (see the module docstring).
    ``first``: the operator's input, the other ``tensors`` its parameters and statistics."""
    if (
        torch.compiler.is_compiling()  # first: torch.compile reads it as a constant and stops here
        or _c._are_functorch_transforms_active()
        or _c._len_torch_dispatch_stack() > 0
        or _c._is_torch_function_mode_enabled()
        or _c._is_tracing()
        or fwAD._current_level >= 0
        or first.__class__ not in _PLAIN
        or not _c._has_storage(first)  # a sparse input, or a batched or wrapped one
    ):
        return False
    for t in tensors:  # a subclass; without a transform active, only the input can lack a storage
        if t is not None and t.__class__ not in _PLAIN:
            return False
    return True


def eager_backward(grad: Tensor | None) -> bool:
    """Whether a backward begun on the eager path may run its kernels directly: a plain incoming
    gradient, no torch.func transform (``gradcheck``'s batched gradients vmap the backward) or
    dispatch mode active, no graph to build (``create_graph``). Otherwise the backward goes through
    the operators (batching rules) or the differentiable composite."""
    return (
        grad is not None
        and grad.__class__ is Tensor
        and _c._has_storage(grad)
        and not _c.is_grad_enabled()
        and not _c._are_functorch_transforms_active()
        and _c._len_torch_dispatch_stack() == 0
    )


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd must record this call: grad mode on and some tensor requires grad."""
    if not _c.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def compiling_not_exporting() -> bool:
    """Whether torch.compile (and not torch.export) is tracing: the BatchNorm*d steps then give
    Inductor their math as torch ops to fuse with the neighbours, instead of an opaque operator."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (outside torch.compile's tracing)."""
    return fwAD._current_level >= 0 and not torch.compiler.is_compiling()


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not) re-running a forward to rebuild what it did not
    save. Such a forward must compute what the first one computed and change no state: the
    running-statistics updates skip it (one update per step, as without checkpointing).

    The signal is autograd's own: the engine's current graph task is set on the thread that runs
    a backward (also for non-reentrant checkpointing, whose recomputation is triggered from a
    saved-tensor hook during the backward) and is -1 elsewhere. Under torch.compile the compiler
    owns recomputation (its partitioner never replays a mutation), so it is never "recomputing".
    The hot paths inline the check (``_c._current_graph_task_id() != -1``) where the path is
    already known to be eager.
    """
    return not torch.compiler.is_compiling() and _c._current_graph_task_id() != -1


def apply(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """``fn.apply(*args)`` on the eager path, without ``Function.apply``'s Python wrapper.

    That wrapper binds the arguments with ``inspect.signature`` (for keyword and default
    arguments) and unwraps dead torch.func wrappers: about sixty Python calls per application,
    more than the rest of a small layer's step. The eager path passes every argument
    positionally and has no torch.func wrapper, so it calls autograd's own (C++) apply directly;
    forward, setup_context and backward run exactly as under ``fn.apply``.
    """
    return super(torch.autograd.Function, fn).apply(*args)  # type: ignore[misc]
