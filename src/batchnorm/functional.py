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
statistics (the output still carries the NaN, so a loss scaler sees it) and a warning says so;
an empty batch changes nothing. The backward is the hand-derived formula of DESIGN.md, and is
itself differentiable (``create_graph=True`` works: gradient penalties, ``gradgradcheck``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import _checks
from ._kernels import torch_ops
from ._kernels.dispatch import backend_for

__all__ = ["batch_norm", "update_running_stats", "warn_if_skipped"]


class _BatchNormTrain(torch.autograd.Function):
    """y, mean, var = BN_train(x, weight, bias); mean and var are non-differentiable outputs."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var = backend_for(x).train_forward(x, weight, bias, eps)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _gmean: Tensor, _gvar: Tensor):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: recompute the statistics differentiably so that autograd sees
            # how mean and invstd depend on x, and differentiate our backward formula itself.
            mean, var = torch_ops.batch_stats(x)
            invstd = torch.rsqrt(var + ctx.eps)
            dx, dw, db = torch_ops.backward(grad_y, x, mean, invstd, weight)
        else:
            dx, dw, db = backend_for(x).backward(grad_y.contiguous(memory_format=_format(x)), x, mean, invstd, weight)
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        return (
            dx if need_x else None,
            dw.to(weight.dtype) if need_w else None,
            db.to(ctx.bias_dtype) if (need_b and ctx.bias_dtype is not None) else None,
            None,
        )


def _format(x: Tensor) -> torch.memory_format:
    """channels_last(_3d) when x is laid out that way, else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var_biased: Tensor,
    count: int,
    momentum: float,
) -> bool:
    """EMA-update the running statistics in place with one batch's statistics.

    running = (1 - momentum) * running + momentum * batch, where the batch variance enters
    unbiased (``var_biased * count / (count - 1)``), as in PyTorch. Returns False, touching
    nothing, when the batch is empty or its statistics are not finite.
    """
    if count == 0 or not _checks.finite(mean, var_biased):
        return False
    with torch.no_grad():  # (1 - momentum) * running + momentum * batch, as torch computes it
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
        if running_var is not None:
            unbias = count / (count - 1) if count > 1 else 1.0
            running_var.mul_(1.0 - momentum).add_(var_biased, alpha=momentum * unbias)
    return True


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    where: str,
) -> tuple[Tensor, bool | None]:
    """The work behind :func:`batch_norm`; also returns whether running stats were updated
    (None when there was nothing to update)."""
    x, eps = _checks.check_args(
        input,
        where,
        training=training,
        eps=eps,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    c = x.shape[1]
    if not training:
        if running_mean is None:
            raise ValueError(f"{where}: expected running_mean and running_var in evaluation mode, got None")
        y = torch_ops.eval_forward(x, running_mean, running_var, weight, bias, eps) if _needs_autograd(
            x, weight, bias
        ) else backend_for(x).eval_forward(x, running_mean, running_var, weight, bias, eps)
        return y, None
    momentum = _checks.check_momentum(momentum, where, allow_none=False)  # type: ignore[assignment]
    _checks.check_batch_size(x, where)
    count = x.numel() // c if c else 0
    if count == 0:
        # empty batch: empty output, still connected to weight/bias; no statistic changes
        zeros = torch.zeros(c, dtype=torch_ops.acc_dtype(x.dtype), device=x.device)
        return torch_ops.normalize(x, zeros, zeros + 1, weight, bias), False if running_mean is not None else None
    y, mean, var = _BatchNormTrain.apply(x, weight, bias, eps)
    if running_mean is None:
        return y, None
    return y, update_running_stats(running_mean, running_var, mean, var, count, momentum)


def warn_if_skipped(updated: bool | None, input: Tensor, where: str) -> None:
    """Warn (the caller's caller is blamed) when a functional form left the running statistics
    untouched because a non-empty batch had non-finite statistics (``updated is False``)."""
    if updated is False and input.numel() > 0:
        warnings.warn(
            f"{where}: batch statistics are not finite (NaN/inf in the input); running "
            "statistics were left unchanged",
            RuntimeWarning,
            stacklevel=3,
        )


def _needs_autograd(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    of the new batch statistic; ``eps`` > 0 when training.

    Raises:
        TypeError: non-tensor or non-floating input.
        ValueError: input not 2D-5D, parameter shapes that do not match C, one value per
            channel in training, eps <= 0 in training, momentum outside [0, 1].
    """
    y, updated = _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, "batch_norm"
    )
    warn_if_skipped(updated, input, "batch_norm")
    return y
