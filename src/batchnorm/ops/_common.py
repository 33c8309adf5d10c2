"""Helpers shared by the operator definitions (private).

- `fresh`: a custom operator may not return a tensor that aliases an input or another
  output; kernels sometimes return views (e.g. two rows of one sums buffer), so outputs that
  share storage are cloned.
- `to_front` / `fold_channels` / `unfold_channels`: the batching rule of
  every per-channel operator. A vmapped batch of B independent problems (B, N, C, *) is one
  problem with B*C channels, (N, B*C, *): batch norm treats channels independently, so the
  vmapped call is a single operator call on the folded tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "fresh",
    "register_channel_vmap",
    "to_front",
    "fold_channels",
    "unfold_channels",
    "fold_vector",
    "per_channel",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of statistics for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fresh(outputs: Sequence[Tensor], inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """``outputs`` with every tensor that shares storage with an input or an earlier output cloned."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel() > 0}
    result = []
    for t in outputs:
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        result.append(t)
    return tuple(result)


def per_channel(x: Tensor, dtype: torch.dtype) -> Tensor:
    """An empty (C,) vector on x's device, for fake implementations."""
    return x.new_empty((x.shape[1],), dtype=dtype)


def to_front(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """The vmapped tensor ``t`` with its batch dim ``dim`` moved to the front (expanded when None)."""
    if t is None:
        return None
    if dim is None:
        return t.expand(size, *t.shape)
    return t.movedim(dim, 0)


def fold_channels(t: Tensor) -> Tensor:
    """(B, N, C, *) -> (N, B*C, *): B independent batch-norm problems as one with B*C channels."""
    b, n, c = t.shape[:3]
    return t.movedim(0, 1).reshape(n, b * c, *t.shape[3:])


def unfold_channels(t: Tensor, b: int) -> Tensor:
    """(N, B*C, *) -> (B, N, C, *), the inverse of `fold_channels`."""
    n, bc = t.shape[:2]
    return t.reshape(n, b, bc // b, *t.shape[2:]).movedim(1, 0)


def fold_vector(t: Tensor | None) -> Tensor | None:
    """(B, C) -> (B*C,): a per-channel vector of B problems, in the order of `fold_channels`."""
    return None if t is None else t.reshape(-1)


def register_channel_vmap(op: Any, inputs: str, outputs: str) -> None:
    """Register the batching rule of a per-channel operator ``op``.

    ``inputs``/``outputs`` spell each argument/return: ``x`` for an (N, C, *) tensor, ``c`` for
    a (C,) vector, ``-`` for anything else (passed through). B vmapped problems are folded into
    one call with B*C channels (`fold_channels`), and the results unfolded.
    """

    def rule(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Any, Any]:
        b = info.batch_size
        folded = []
        for kind, arg, dim in zip(inputs, args, in_dims):
            if kind == "x":
                folded.append(fold_channels(to_front(arg, dim, b)))  # type: ignore[arg-type]
            elif kind == "c":
                folded.append(fold_vector(to_front(arg, dim, b)))
            else:
                folded.append(arg)
        result = op(*folded)
        single = not isinstance(result, tuple)
        results = (result,) if single else result
        out = tuple(unfold_channels(r, b) if k == "x" else r.reshape(b, -1) for k, r in zip(outputs, results))
        return (out[0], 0) if single else (out, (0,) * len(out))

    op.register_vmap(rule)
