"""Collective helpers on top of ``torch.distributed`` for synchronized batch norm (private).

Only ``torch.distributed`` collectives are used (no transport of our own), and only
``all_reduce(SUM)``, which every backend supports for every device (gloo: CPU and CUDA
tensors; nccl: CUDA). Nothing here runs at import.

Failure policy: a collective that fails (a peer that never joins runs into the process group's
timeout, a peer that died closes the connection) is re-raised as a ``RuntimeError`` that names
the layer, the collective and the group, and says how to fix it; the original error is chained.
"""

from __future__ import annotations

import numpy as np
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
    "merge_moments",
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


def all_reduce_sum_functional(t: Tensor, group: object | None, where: str, what: str) -> Tensor:
    """Out-of-place SUM all-reduce of ``t`` over ``group`` with ``torch.distributed``'s functional
    collectives: traceable by torch.compile (fullgraph) and torch.export, no host read. Not
    differentiable (see :func:`all_reduce_sum_differentiable`); errors as :func:`all_reduce_sum`."""
    import torch.distributed._functional_collectives as funcol

    pg = dist.group.WORLD if group is None else group
    if torch.compiler.is_compiling():
        return funcol.all_reduce(t, "sum", pg)  # type: ignore[arg-type]
    try:
        return funcol.wait_tensor(funcol.all_reduce(t.contiguous(), "sum", pg))  # type: ignore[arg-type]
    except RuntimeError as e:
        raise _explain(e, group, where, what) from e


class _AllReduceSum(torch.autograd.Function):
    """SUM all-reduce as an autograd op. y = sum_r t_r on every rank, so dL/dt_r = sum_r' dL/dy_r'
    (each rank's loss depends on y): backward is the same all-reduce of ``grad``, itself
    differentiable, so every rank must run it, to any order.

    Our own because torch's ``torch.distributed.nn.functional.all_reduce`` warns
    (FutureWarning, deprecated) on every call in torch 2.13 and its suggested replacement,
    ``torch.distributed._functional_collectives``, is private and not differentiable in the
    oldest torch we support (2.3). Failures carry :func:`all_reduce_sum`'s explanation.
    """

    @staticmethod
    def forward(ctx, t: Tensor, group: object | None, where: str, what: str) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.where, ctx.what = group, where, what
        return all_reduce_sum_functional(t, group, where, what)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        back = _AllReduceSum.apply(grad, ctx.group, ctx.where, "the gradient of " + ctx.what)
        return back, None, None, None


def all_reduce_sum_differentiable(t: Tensor, group: object | None, where: str, what: str) -> Tensor:
    """Out-of-place SUM all-reduce of ``t`` over ``group`` that autograd differentiates (its
    backward is another all-reduce, so every rank must run it); errors as :func:`all_reduce_sum`."""
    return _AllReduceSum.apply(t, group, where, what)


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


def merge_moments(counts: np.ndarray, means: np.ndarray, m2s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Chan et al.'s parallel merge of per-part (count, mean, M2) into the whole's.

        n    = sum_k n_k
        mean = sum_k n_k mean_k / n
        M2   = sum_k M2_k + sum_k n_k (mean_k - mean)^2

    counts (W,), means and m2s (W, C) float64 NumPy arrays; returns (n, mean (C,), M2 (C,)).
    Parts with n_k = 0 contribute nothing (their mean and M2 must be 0). The spread term is a
    sum of non-negative numbers, so nothing cancels. For n = 0 the mean and M2 are 0; NaN/inf
    parts give NaN/inf results, silently.
    """
    n = float(counts.sum())
    # NaN/inf from any rank propagate (inf - inf = NaN) without NumPy's RuntimeWarning: the
    # layer reports non-finite statistics itself
    with np.errstate(invalid="ignore", over="ignore"):
        w = counts[:, None] / max(n, 1.0)  # (W, 1) weight of each part
        mean = (w * means).sum(0)  # (C,)
        m2 = m2s.sum(0) + (counts[:, None] * np.square(means - mean)).sum(0)  # (C,)
    return n, mean, m2
