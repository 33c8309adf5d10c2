"""Collective helpers on top of ``torch.distributed`` for synchronized batch norm (private).

Only ``torch.distributed`` collectives are used (no transport of our own), and only
``all_reduce(SUM)``, which every backend supports for every device (gloo: CPU and CUDA
tensors; nccl: CUDA). Nothing here runs at import.

Failure policy: a collective that fails (a peer that never joins runs into the process group's
timeout, a peer that died closes the connection) is re-raised as a ``RuntimeError`` that names
the layer, the collective and the group, and says how to fix it; the original error is chained.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "group_size",
    "group_rank",
    "all_reduce_sum",
    "all_reduce_sum_differentiable",
    "all_reduce_sum_functional",
    "gather_rows",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def group_size(group: object | None, where: str) -> int:
    """Number of processes in ``group`` (default group if None); 1 when not distributed.

    Raises ValueError when this process is not a member of ``group`` (torch reports -1): a
    silent fallback to local statistics there would hide a wrongly built group.
    """
    if not is_distributed():
        return 1
    size = dist.get_world_size(group)
    if size < 1:
        group_rank(group, where)
    return size


def group_rank(group: object | None, where: str) -> int:
    """This process's rank inside ``group``; raises ValueError if it is not a member."""
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"{where}: this process (global rank {dist.get_rank()}) is not a member of the "
            "process_group it was given; only members may call the layer in training mode"
        )
    return rank


def all_reduce_sum(t: Tensor, group: object | None, where: str, what: str) -> Tensor:
    """In-place SUM all-reduce of ``t`` over ``group``, with an explanatory error on failure."""
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as e:
        raise _explain(e, group, where, what) from e
    return t


def _explain(e: Exception, group: object | None, where: str, what: str) -> RuntimeError:
    size = dist.get_world_size(group)
    backend = dist.get_backend(group)
    return RuntimeError(
        f"{where}: the all_reduce of {what} over the process group ({backend}, {size} "
        "processes) failed. Most often a peer did not join within the process group's "
        "timeout (set it with init_process_group(timeout=...) or new_group(timeout=...)) "
        "or has exited: every rank must call every synchronized layer in the same order, "
        "forward and backward, also ranks with no samples. Original error: "
        f"{str(e).strip()[:500]}"
    )


@torch.library.custom_op("batchnorm::all_reduce_sum", mutates_args=())
def _all_reduce_op(t: Tensor, group_name: str, where: str, what: str) -> Tensor:
    """Out-of-place SUM all-reduce of ``t`` over the process group named ``group_name``."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    return all_reduce_sum(t.clone(memory_format=torch.contiguous_format), group, where, what)


@_all_reduce_op.register_fake
def _all_reduce_fake(t: Tensor, group_name: str, where: str, what: str) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _all_reduce_grad(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
    # y = sum_r t_r on every rank, so dL/dt_r = sum_r' dL/dy_r': the same all-reduce, differentiable
    return _all_reduce_op(grad, ctx.group_name, ctx.where, "the gradient of " + ctx.what), None, None, None


def _all_reduce_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, ctx.group_name, ctx.where, ctx.what = inputs


_all_reduce_op.register_autograd(_all_reduce_grad, setup_context=_all_reduce_setup)


def group_name(group: object | None) -> str:
    """The registered name of ``group`` (the default group if None), as operators take it."""
    pg = dist.group.WORLD if group is None else group
    return pg.group_name  # type: ignore[union-attr,attr-defined]


def all_reduce_sum_functional(t: Tensor, group: object | None, where: str, what: str) -> Tensor:
    """Out-of-place SUM all-reduce of ``t`` over ``group`` as ONE operator,
    ``batchnorm::all_reduce_sum``: an opaque node for torch.compile (fullgraph), torch.export and
    torch.jit.trace, no host read; differentiable (its backward is the same all-reduce, so every
    rank must run it). Errors as ``all_reduce_sum``."""
    return _all_reduce_op(t, group_name(group), where, what)


def all_reduce_sum_differentiable(t: Tensor, group: object | None, where: str, what: str) -> Tensor:
    """Out-of-place SUM all-reduce of ``t`` over ``group`` that autograd differentiates (its
    backward is another all-reduce, so every rank must run it); errors as ``all_reduce_sum``."""
    return all_reduce_sum_functional(t, group, where, what)


def gather_rows(parts: list[Tensor | float], group: object | None, where: str, what: str) -> Tensor:
    """Every rank's row (the concatenation of ``parts``, K values) stacked into (W, K) float64,
    in group-rank order, by ONE all_reduce.

    Each rank writes its row into a zero (W, K) buffer; summing the buffers is a gather that
    every backend and device supports, and adding exact zeros leaves the rows bit-identical
    on every rank. ``parts`` are numbers or 1-D tensors (on the device the buffer goes to).
    """
    w = dist.get_world_size(group)
    rank = group_rank(group, where)
    sizes = [1 if not isinstance(p, Tensor) else p.numel() for p in parts]
    device = next(p.device for p in parts if isinstance(p, Tensor))
    buf = torch.zeros(w, sum(sizes), dtype=torch.float64, device=device)  # (W, K)
    start = 0
    for p, n in zip(parts, sizes):
        buf[rank, start : start + n] = p
        start += n
    return all_reduce_sum(buf, group, where, what)
