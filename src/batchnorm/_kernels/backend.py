"""The kernel back-end contract, as typed protocols.

A back-end is a module of plain functions over tensors shaped (N, C, *spatial): statistics per
channel (dim 1), reduced over every other dim, m = N * prod(spatial) values per channel.
`batchnorm._kernels.dispatch` picks one module per call and the layers call these
functions on it, so every back-end must accept the same arguments and return the same things:

- the mean is returned in float64, the biased variance and the parameter gradients in
  ``acc_dtype(x.dtype)`` (float64 for float64 input, float32 otherwise);
- outputs keep the input's dtype and memory format;
- ``x_hat = (x - mean) * invstd``, ``invstd = 1 / sqrt(var + eps)``.

`KernelBackend` is what `torch_ops` (any device) provides;
`NumbaBackend` adds ``supports``, which the numba modules (`cpu`,
`cpu_small`) and the Triton module (`triton_bn`)
answer so that dispatch can fall back to torch ops.
Both are ``runtime_checkable``: ``isinstance(module, NumbaBackend)`` checks that the names
exist; `signature_mismatches` compares the signatures too.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from types import ModuleType
from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["KernelBackend", "NumbaBackend", "signature_mismatches"]


@runtime_checkable
class KernelBackend(Protocol):
    """The functions every kernel back-end module provides (``torch_ops`` and the numba ones)."""

    def train_forward(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Training forward: ``(y, mean, var_biased)``.

        ``y = weight * (x - mean) / sqrt(var + eps) + bias`` with the batch's own statistics.

        Shape: x (N, C, *) -> y (N, C, *), mean (C,) float64, var (C,) in ``acc_dtype``.
        """
        ...

    def eval_forward(
        self, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        """Inference forward with fixed statistics: ``weight * (x - mean) / sqrt(var + eps) + bias``.

        Shape: x (N, C, *), mean, var, weight, bias (C,) -> y (N, C, *).
        """
        ...

    def backward(
        self, grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Training backward, g = dL/dy per channel: ``(dx, dgamma, dbeta)`` with

            dbeta = sum g,  dgamma = sum g * x_hat,
            dx = weight * invstd * (g - mean(g) - x_hat * mean(g * x_hat)).

        Shape: grad_y, x (N, C, *) -> dx (N, C, *), dgamma (C,), dbeta (C,).
        """
        ...

    def batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The statistics pass alone: ``(mean float64, var_biased)``, each (C,)."""
        ...

    def backward_sums(self, grad_y: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        """The backward's two reductions around a given mean: ``(sum g, sum g * (x - mean))`` in float64."""
        ...

    def backward_apply(
        self,
        grad_y: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        mean_g: Tensor,
        mean_gxhat: Tensor,
    ) -> Tensor:
        """dx from already-reduced means: ``weight * invstd * (g - mean_g - x_hat * mean_gxhat)``."""
        ...


@runtime_checkable
class NumbaBackend(KernelBackend, Protocol):
    """A back-end that runs only some inputs: dispatch asks `supports` first."""

    def supports(self, x: Tensor) -> bool:
        """True when this back-end can run ``x``; False sends dispatch to torch ops."""
        ...


def _hints(func: Callable[..., object]) -> dict[str, object]:
    return typing.get_type_hints(func)


def signature_mismatches(module: ModuleType, protocol: type) -> list[str]:
    """Every way ``module``'s functions differ from ``protocol``'s methods (empty when none).

    A function matches when it takes the protocol's parameters (without ``self``) in the same
    order, with the same kinds and annotations, and the same return annotation; extra
    parameters are allowed only with a default (e.g. a keyword-only option).
    """
    problems: list[str] = []
    for name, member in inspect.getmembers(protocol, inspect.isfunction):
        if name.startswith("_"):
            continue
        func = getattr(module, name, None)
        if not callable(func):
            problems.append(f"{module.__name__}.{name}: missing")
            continue
        want = list(inspect.signature(member).parameters.values())[1:]  # drop self
        have = list(inspect.signature(func).parameters.values())
        want_hints, have_hints = _hints(member), _hints(func)
        for i, p in enumerate(want):
            if i >= len(have) or have[i].name != p.name or have[i].kind != p.kind:
                got = [q.name for q in have]
                problems.append(f"{module.__name__}.{name}: parameters {got}, expected {[q.name for q in want]}")
                break
            if have_hints.get(p.name) != want_hints.get(p.name):
                problems.append(
                    f"{module.__name__}.{name}: {p.name} is {have_hints.get(p.name)}, expected {want_hints.get(p.name)}"
                )
        for extra in have[len(want) :]:
            if extra.default is inspect.Parameter.empty and extra.kind not in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            ):
                problems.append(f"{module.__name__}.{name}: extra parameter {extra.name!r} has no default")
        if have_hints.get("return") != want_hints.get("return"):
            problems.append(
                f"{module.__name__}.{name}: returns {have_hints.get('return')}, expected {want_hints.get('return')}"
            )
    return problems
