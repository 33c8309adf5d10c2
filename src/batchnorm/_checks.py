"""Input validation shared by the functional form and the modules (private).

Every check raises ``TypeError`` or ``ValueError`` with a message that names the caller
(``where``), what was expected and what arrived. No ``assert``: these guard user input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ShapeError(ValueError, RuntimeError):
    """A tensor whose shape does not fit the layer or call: both a ``ValueError`` (our convention
    for bad input) and a ``RuntimeError``, the class torch raises for the same inputs (a weight or
    running statistic of the wrong size, an input with the wrong number of channels), so code
    written against either catches it."""


_LAYOUTS = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def layout(ndim: int) -> str:
    """The conventional name of an ndim-dimensional BN input, e.g. ``(N, C, H, W)``."""
    return _LAYOUTS.get(ndim, f"{ndim}D")


def check_input(
    x: object,
    where: str,
    *,
    ndims: tuple[int, ...] = (2, 3, 4, 5),
    num_features: int | None = None,
) -> Tensor:
    """Check that ``x`` is a floating tensor with ``x.dim() in ndims`` and the right channels."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(
            f"{where}: expected a floating-point input (float64/float32/float16/bfloat16), got dtype {x.dtype}"
        )
    if x.dim() not in ndims:
        want = " or ".join(f"{n}D {layout(n)}" for n in ndims)
        raise ValueError(f"{where}: expected {want} input, got {x.dim()}D input of shape {tuple(x.shape)}")
    if num_features is not None and x.shape[1] != num_features:
        raise ShapeError(
            f"{where}: expected {num_features} channels in dim 1, got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    return x


def check_layer_input(
    x: object, where: str, ndims: tuple[int, ...], num_features: int, use_batch_stats: bool, eps: object
) -> None:
    """Every check of a layer's forward, in one call (it runs on every step): the input as
    `check_input`, a batch size as `check_batch_size` with batch statistics, eps as
    `check_eps`. The common, valid case costs no further Python call."""
    if (
        (x.__class__ is Tensor or isinstance(x, Tensor))
        and x.is_floating_point()
        and x.dim() in ndims
        and x.shape[1] == num_features
    ):
        if use_batch_stats and x.shape[1] > 0 and x.numel() == x.shape[1]:
            check_batch_size(x, where)
        if eps.__class__ is float and eps > 0 and eps < math.inf:
            return
        check_eps(eps, where, training=use_batch_stats)
        return
    check_input(x, where, ndims=ndims, num_features=num_features)


def check_batch_size(x: Tensor, where: str) -> None:
    """In training, each channel needs more than one value (or none at all: an empty batch)."""
    if x.shape[1] > 0 and x.numel() == x.shape[1]:
        raise ValueError(
            f"{where}: expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)} (a single value has no variance; use eval mode or a larger batch)"
        )


def check_eps_type(eps: object, where: str) -> float:
    """eps must be a real number (int or float, not bool); returns it as a float."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{where}: expected eps to be a float, got {type(eps).__name__}")
    return float(eps)


def check_eps(eps: object, where: str, *, training: bool) -> float:
    """eps must be a finite number, > 0 when training (it keeps 1/sqrt(var + eps) finite), >= 0
    otherwise. The messages contain torch's wording ("eps must be positive" in training, "eps
    must be non-negative" otherwise), so code that matches torch's errors matches ours."""
    eps = check_eps_type(eps, where)
    if not math.isfinite(eps):
        raise ValueError(f"{where}: eps must be a finite number, got {eps}")
    if training and eps <= 0:
        raise ValueError(f"{where}: eps must be positive when training (it keeps 1/sqrt(var + eps) finite), got {eps}")
    if eps < 0:
        raise ValueError(f"{where}: eps must be non-negative, got {eps}")
    return eps


def check_momentum(momentum: object, where: str, *, allow_none: bool) -> float | None:
    """momentum is the weight of the *new* batch statistic (PyTorch convention), in [0, 1]."""
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        none = " or None" if allow_none else ""
        raise TypeError(f"{where}: expected momentum to be a float in [0, 1]{none}, got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"{where}: expected momentum in [0, 1] (PyTorch convention: the weight of the new batch "
            f"statistic), got {momentum}; for a Keras/Flax momentum m use batchnorm.from_keras_momentum(m)"
        )
    return float(momentum)


def check_param(p: Tensor | None, name: str, num_features: int, where: str) -> None:
    """A per-channel tensor (weight, bias, running stat) must be 1D of length C."""
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"{where}: expected {name} to be a Tensor or None, got {type(p).__name__}")
    if p.shape != (num_features,):
        raise ShapeError(
            f"{where}: expected {name} of shape ({num_features},) to match the input's channels, got {tuple(p.shape)}"
        )
    if not p.is_floating_point():
        raise TypeError(f"{where}: expected {name} to be floating point, got dtype {p.dtype}")


def check_args(
    input: object,
    where: str,
    *,
    training: bool,
    eps: object,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
) -> tuple[Tensor, float]:
    """The checks every functional form makes: input (2D-5D floating tensor), eps, and each
    per-channel tensor of shape (C,); the running statistics must be given together.
    Returns (input, eps as float)."""
    x = check_input(input, where)
    c = x.shape[1]
    eps = check_eps(eps, where, training=training)
    params = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for name, p in params.items():
        check_param(p, name, c, where)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{where}: expected running_mean and running_var both given or both None")
    return x, eps


def finite(*tensors: Tensor) -> bool:
    """True when every element of every tensor is finite.

    Fast path: a finite sum of all elements implies that all are finite (a NaN or inf makes
    the sum NaN or inf); only a non-finite sum (which finite values can also give, by
    overflow) is settled element by element.
    """
    if math.isfinite(sum(float(t.sum()) for t in tensors)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)
