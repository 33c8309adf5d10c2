"""``batch_norm``: the signature and semantics of ``torch.nn.functional.batch_norm``, our math.

Training (``training=True``), per channel c over the m = N * prod(spatial) values of x[:, c]:

    mu      = (1/m) sum x
    var     = (1/m) sum (x - mu)^2                 (biased: used to normalize)
    x_hat   = (x - mu) / sqrt(var + eps)           (eps inside the square root)
    y       = weight * x_hat + bias

and, when running statistics are given, an in-place EMA (PyTorch convention: ``momentum`` is
the weight of the *new* value):

    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)   (unbiased)

Inference (``training=False``): y = weight * (x - running_mean) / sqrt(running_var + eps) + bias.

Shape: input (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); output the same shape, dtype
and memory format. Statistics are accumulated in float32 (float64 for float64 input).

Beyond ``F.batch_norm``: a batch whose statistics are not finite never writes into the running
statistics (the output still carries the NaN, so a loss scaler sees it) and, on CPU, a warning
says so; an empty batch changes nothing. These decisions are made on the device (no value is
read back to the host), so a step can be compiled, exported or captured in a CUDA graph. The
backward is the hand-derived formula above, and is itself differentiable (``create_graph=True``
works: gradient penalties, ``gradgradcheck``).

Computed by the ``torch.ops.batchnorm`` operators (`batchnorm.ops`); this module checks the
arguments and calls them.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor

from . import _checks, ops

__all__ = ["batch_norm", "check_train_args", "is_fx_proxy", "normalize_step", "update_step"]


def is_fx_proxy(input: object) -> bool:
    """True when ``input`` is a ``torch.fx.Proxy``: ``symbolic_trace`` is running a forward.

    Checked on the input rather than with ``is_fx_tracing()``: ``make_fx``/``torch.export`` also
    run under an fx tracer but hand real (fake) tensors to forward.
    """
    return isinstance(input, torch.fx.Proxy)


def check_train_args(
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
    """The argument checks of every functional form (shapes and types only, never values).

    Returns (input, eps as float). In training each channel needs more than one value.
    """
    x, eps_f = _checks.check_args(
        input,
        where,
        training=training,
        eps=eps,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    if training:
        _checks.check_batch_size(x, where)
    elif running_mean is None:
        raise ValueError(f"{where}: expected running_mean and running_var in evaluation mode, got None")
    return x, eps_f


def _counter(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.long, device=like.device)


def normalize_step(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    where: str,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
) -> Tensor:
    """Batch norm on checked arguments: the operator calls behind `batch_norm` and the layers.

    Training: `batchnorm.ops.train_step` (the batch statistics and, when running
    statistics are given, their update; ``momentum=None`` needs ``num_batches_tracked``).
    Evaluation: ``batchnorm::eval`` with the running statistics.
    """
    if not training:
        return ops.eval_forward(x, running_mean, running_var, weight, bias, eps)  # type: ignore[arg-type]
    if running_mean is not None and (num_batches_tracked is None or num_batches_skipped is None):
        num_batches_tracked = _counter(x) if num_batches_tracked is None else num_batches_tracked
        num_batches_skipped = _counter(x) if num_batches_skipped is None else num_batches_skipped
    return ops.train_step(
        x, weight, bias, running_mean, running_var, num_batches_tracked, num_batches_skipped, momentum, eps, where
    )  # type: ignore[arg-type]


def update_step(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    momentum: float | None,
    where: str,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    unbiased: bool = True,
    count: int | None = None,
) -> None:
    """Update the running statistics (if given) with the statistics of batch ``x``, on the device
    (``batchnorm::update_running_stats``); counters that are not given are scratch zeros.
    ``count`` (values per channel) defaults to x's."""
    if running_mean is None or running_var is None:
        return
    tracked = _counter(x) if num_batches_tracked is None else num_batches_tracked
    skipped = _counter(x) if num_batches_skipped is None else num_batches_skipped
    if count is None:
        count = x.numel() // x.shape[1] if x.shape[1] else 0
    ops.update_running_stats_(running_mean, running_var, tracked, skipped, mean, var, count, momentum, where, unbiased)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization with the signature of ``torch.nn.functional.batch_norm``.

    See the module docstring for the formulas and conventions. ``running_mean``/``running_var``
    (C,) are updated in place when ``training`` and given; ``momentum`` in [0, 1] is the weight
    of the new batch statistic; ``eps`` > 0 when training. A batch with non-finite statistics
    leaves the running statistics unchanged and warns (on CPU).

    Shape: input (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W) -> output of the same shape.

    Raises:
        TypeError: non-tensor or non-floating input.
        ValueError: input not 2D-5D, parameter shapes that do not match C, one value per
            channel in training, eps <= 0 in training, momentum outside [0, 1].
    """
    where = "batch_norm"
    if not is_fx_proxy(input):
        input, eps = check_train_args(
            input,
            where,
            training=training,
            eps=eps,
            weight=weight,
            bias=bias,
            running_mean=running_mean,
            running_var=running_var,
        )
        if training:
            momentum = _checks.check_momentum(momentum, where, allow_none=False)  # type: ignore[assignment]
    return normalize_step(input, running_mean, running_var, weight, bias, training, momentum, eps, where)
