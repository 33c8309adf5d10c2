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
from .ops._path import eager
from .ops.masked import masked_train

__all__ = [
    "batch_norm",
    "channels_to_front",
    "check_mask",
    "check_train_args",
    "is_fx_proxy",
    "masked_step",
    "normalize_step",
    "update_step",
    "update_step_counted",
]


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


def update_step_counted(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    total: Tensor,
    momentum: float | None,
    where: str,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
) -> None:
    """`update_step` with a count known only on the device (a 0-dim tensor: the real
    values of a masked batch, the values of a synchronized batch): the variance is unbiased
    there, var * total / (total - 1), and a batch of at most one value per channel has none: its
    statistics enter as NaN, so the update leaves them out and counts the batch as skipped."""
    if running_mean is None:
        return
    with torch.no_grad():
        unbiased = var * total / (total - 1.0).clamp_min(1.0)
        nothing = torch.where(total > 1, 0.0, float("nan"))
        update_step(
            x, running_mean, running_var, mean + nothing, unbiased, momentum, where,
            num_batches_tracked, num_batches_skipped, unbiased=False, count=2,
        )  # fmt: skip


def check_mask(mask: object, x: Tensor, where: str) -> Tensor:
    """A mask for x (N, C, *spatial): a bool tensor of shape (N, *spatial) on x's device."""
    expected = (x.shape[0], *x.shape[2:])
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{where}: expected mask to be a bool tensor of shape {expected} (True = real), got {got}")
    if tuple(mask.shape) != expected or mask.device != x.device:
        raise ValueError(
            f"{where}: expected mask of shape {expected} (the input's shape without the channel dim) on "
            f"{x.device}, got shape {tuple(mask.shape)} on {mask.device}"
        )
    return mask


def channels_to_front(x: Tensor, channel_dim: int, num_features: int | None, where: str) -> Tensor:
    """x with its channel dim at 1: (N, *, C) -> (N, C, *) for ``channel_dim=-1`` (a view: the
    kernels take the channels-last layout without a copy). A 2D (N, C) input is returned as is."""
    if channel_dim not in (1, -1):
        raise ValueError(f"{where}: expected channel_dim to be 1 or -1, got {channel_dim!r}")
    if channel_dim == 1 or not isinstance(x, Tensor) or x.dim() <= 2:
        return x
    if num_features is not None and x.shape[-1] != num_features:
        raise ValueError(
            f"{where}: expected input with {num_features} channels in its last dim (channel_dim=-1), "
            f"got input of shape {tuple(x.shape)}"
        )
    return x.movedim(-1, 1)


def masked_step(
    x: Tensor,
    mask: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_batch_stats: bool,
    training: bool,
    momentum: float | None,
    eps: float,
    where: str,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
) -> Tensor:
    """Batch norm of x (N, C, *) over the real positions of ``mask`` (N, *) on checked arguments
    (`batchnorm.ops.masked`): batch statistics of the real values and, when running
    statistics are given, their update (unbiased over the real count); or the running
    statistics. Padded outputs are 0 with 0 gradient either way. In training, fewer than two
    real values is a ``ValueError`` (checked where values can be read: not under
    torch.compile/export/vmap, where such a batch is skipped by the update instead)."""
    check_mask(mask, x, where)
    if not use_batch_stats:
        y = ops.eval_forward(x, running_mean, running_var, weight, bias, eps)  # type: ignore[arg-type]
        return torch.where(mask.unsqueeze(1), y, torch.zeros((), dtype=y.dtype, device=y.device))
    y, mean, var, count = masked_train(x, mask, weight, bias, eps)
    if training and x.shape[1] > 0 and eager(x, mask) and int(count) < 2:
        raise ValueError(
            f"{where}: expected more than 1 real value per channel when training, got {int(count)} "
            f"(mask of shape {tuple(mask.shape)}; a single value has no variance)"
        )
    update_step_counted(
        x, running_mean, running_var, mean, var, count, momentum, where, num_batches_tracked, num_batches_skipped
    )
    return y


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    channel_dim: int = 1,
) -> Tensor:
    """Batch normalization with the signature of ``torch.nn.functional.batch_norm``.

    See the module docstring for the formulas and conventions. ``running_mean``/``running_var``
    (C,) are updated in place when ``training`` and given; ``momentum`` in [0, 1] is the weight
    of the new batch statistic; ``eps`` > 0 when training. A batch with non-finite statistics
    leaves the running statistics unchanged and warns (on CPU).

    Shape: input (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W) -> output of the same shape.

    Beyond ``F.batch_norm`` (keyword-only):

    - ``channel_dim=-1``: the channels are the last dim, e.g. (N, L, C) sequences, normalized
      per C without permuting (a (N, C) input is the same either way).
    - ``mask`` (N, *spatial) bool, True where a value is real (for ``channel_dim=-1`` and (N, L, C)
      input: (N, L)): statistics, running statistics (unbiased over the real count) and
      gradients from the real positions only; padded outputs are 0 with 0 gradient
      (`batchnorm.ops.masked`).

    Raises:
        TypeError: non-tensor or non-floating input.
        ValueError: input not 2D-5D, parameter shapes that do not match C, one value per
            channel in training, eps <= 0 in training, momentum outside [0, 1], a mask of the
            wrong shape or dtype, fewer than two real values in training, channel_dim not 1/-1.
    """
    where = "batch_norm"
    if mask is not None or channel_dim != 1:
        x = channels_to_front(input, channel_dim, None, where)
        if mask is None:
            y = batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        else:
            x, eps = _checks.check_args(
                x, where, training=training, eps=eps, weight=weight, bias=bias,
                running_mean=running_mean, running_var=running_var,
            )  # fmt: skip
            if training:
                momentum = _checks.check_momentum(momentum, where, allow_none=False)  # type: ignore[assignment]
            elif running_mean is None:
                raise ValueError(f"{where}: expected running_mean and running_var in evaluation mode, got None")
            y = masked_step(x, mask, running_mean, running_var, weight, bias, training, training, momentum, eps, where)
        return y.movedim(1, channel_dim) if y.dim() > 2 else y
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
