"""``SyncBatchNorm``: batch norm whose training statistics span every process of a group.

The normalization batch is the *global* batch: the concatenation of the local batches of all
ranks of ``process_group`` (the default group if None). Per channel, over all M = sum_r m_r values:

    mu    = (1/M) sum x                       var = (1/M) sum (x - mu)^2      (biased)
    y     = weight * (x - mu) / sqrt(var + eps) + bias

Forward: each rank computes its (m_r, mean_r, M2_r) locally with the back-end's statistics
(numba on CPU: float64 accumulation; torch ops elsewhere: shifted two-pass), and ONE
``all_reduce`` gathers them (a (W, 1 + 2C) float64 buffer); every rank then merges them with
Chan's formula in float64, so uneven batch sizes and ranks with zero samples give the
statistics of the concatenated batch, with no cancellation. The output is the back-end's
normalize pass with the global statistics (mean kept in float64).

Backward (g = dL/dy, sums over the global batch):

    dx = weight / sqrt(var + eps) * (g - (1/M) sum g - x_hat (1/M) sum g * x_hat)

with ONE ``all_reduce`` of the 2C local sums (sum g, sum g*x_hat), taken by the back-end's
``backward_sums`` around the float64 global mean (one read of g and x), and dx from the
back-end's ``backward_apply`` with the global means (one more read of g and x, one write).
``weight``/``bias`` get their *local* gradients sum_local g*x_hat and sum_local g;
DistributedDataParallel then reduces them across ranks like every other parameter.
Cost: one blocking collective per layer per pass (docs/distributed.md has measurements).

Running statistics (training, ``track_running_stats``): updated on every rank identically with
the global mean and the global *unbiased* variance var * M / (M - 1) (PyTorch's conventions:
``momentum`` is the weight of the new value, None = cumulative average), so buffers stay
identical across ranks; a rank with no samples updates them too.

Without communication: in eval mode (running statistics; with ``track_running_stats=False``
the local batch's statistics, as PyTorch), and when ``torch.distributed`` is not initialized
or the group has one process (then it is exactly :class:`batchnorm.BatchNorm1d`-style BN).

Works on any device the backend supports: gloo with CPU tensors (where
``torch.nn.SyncBatchNorm`` refuses CPU input), nccl with CUDA tensors.

Every rank of the group must call the layer in training mode in the same order, and run the
backward through it if one does (whether the input needs a gradient must agree across ranks).
A peer that does not join makes the collective fail after the process group's timeout
(``init_process_group(timeout=...)``) with a ``RuntimeError`` that says so, instead of hanging
forever. Double backward (``create_graph=True``, gradient penalties) works: that backward is
built from differentiable ops and differentiable all-reduces (two more collectives per layer).

torch.fx: ``symbolic_trace`` records one :func:`sync_batch_norm_layer` node per layer, which
decides when the graph runs whether to synchronize (docs/fx.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx
from torch import Tensor

from .. import _checks, _collectives
from .._kernels import torch_ops
from .._kernels.dispatch import backend_for
from ..functional import update_running_stats, warn_if_skipped
from .batchnorm import (
    BatchNormBase,
    batch_norm_layer,
    is_fx_proxy,
    momentum_now,
    record_update,
    record_update_traced,
)

__all__ = ["SyncBatchNorm", "sync_batch_norm", "sync_batch_norm_layer"]


def _local_moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """(m, mean (C,) float64, M2 (C,)) of the local batch; zeros if empty.

    The back-end's statistics pass (numba on CPU: float64 accumulation, one read of x and no
    output; other tensors: the shifted two-pass :func:`torch_ops.batch_stats`).
    """
    c = x.shape[1]
    m = x.numel() // c
    if m == 0:
        zeros = torch.zeros(c, dtype=torch.float64, device=x.device)
        return 0, zeros, zeros
    mean, var = backend_for(x).batch_stats(x)
    return m, mean, var * m


def global_moments(x: Tensor, group: object | None, where: str) -> tuple[int, Tensor, Tensor]:
    """(M, mean, var_biased) of the concatenation of every rank's ``x`` (N_r, C, *).

    ONE all_reduce of the per-rank (m, mean, M2) rows, Chan merge in float64 (NumPy, on the
    (W, 1 + 2C) host copy: a few dozen tiny operations cost ~1 us each there, ~10 us as torch
    ops). Returns the statistics in float64 on x's device; M is the global number of values
    per channel.
    """
    with torch.no_grad():
        m, mean, m2 = _local_moments(x.detach())
        what = "the per-rank batch statistics (count, mean, M2)"
        rows = _collectives.gather_rows([float(m), mean, m2], group, where, what)  # (W, 1 + 2C) float64
        c = x.shape[1]
        host = rows.cpu().numpy()  # (W, 1 + 2C); no copy for CPU tensors
        total, mean_g, m2_g = _collectives.merge_moments(host[:, 0], host[:, 1:1 + c], host[:, 1 + c:])
        total_i = int(total)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf propagate; reported by the caller
            var = np.maximum(m2_g / max(total_i, 1), 0.0)  # (C,)
        mean_t = torch.from_numpy(mean_g).to(x.device)
        var_t = torch.from_numpy(var).to(x.device)
    return total_i, mean_t, var_t


class _SyncNormalize(torch.autograd.Function):
    """y = normalize(x, mean, var, weight, bias) with the *global* statistics' backward.

    mean and var (biased) are the global statistics in float64 (constants to autograd); the
    backward accounts for their dependence on x through the globally all-reduced sums.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        eps: float,
        total: int,
        group: object | None,
        where: str,
    ) -> Tensor:
        invstd = torch.rsqrt(var + eps)  # (C,) float64
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total = total
        ctx.group = group
        ctx.where = where
        ctx.eps = eps
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # the back-end's eval kernel: the same fused pass (numba on CPU) as our local layer
        return backend_for(x).eval_forward(x, mean, var, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
            return (*_backward_graph(ctx, grad_y), None, None, None, None, None, None)
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        backend = backend_for(x)
        # local sums (C,) float64 around the float64 global mean: one read of g and x
        sum_g, sum_gx = backend.backward_sums(grad_y, x, mean)
        dx = None
        if need_x:
            c = sum_g.numel()
            packed = torch.cat([sum_g, sum_gx])  # (2C,) float64
            _collectives.all_reduce_sum(packed, ctx.group, ctx.where, "the gradient sums (sum g, sum g*x_hat)")
            # DESIGN.md's backward with the global means of g and g*x_hat: one pass over g and x
            mean_g = packed[:c] / ctx.total
            mean_gxhat = packed[c:] * invstd / ctx.total
            dx = backend.backward_apply(grad_y, x, mean, invstd, weight, mean_g, mean_gxhat)
        dw = (sum_gx * invstd).to(weight.dtype) if (need_w and weight is not None) else None
        db = sum_g.to(ctx.bias_dtype) if (need_b and ctx.bias_dtype is not None) else None
        return dx, dw, db, None, None, None, None, None, None


def _backward_graph(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias) of :class:`_SyncNormalize` as differentiable float64 ops.

    For ``create_graph=True`` (gradient penalties). The forward's statistics were constants
    to autograd, so they are recomputed here from x, around the float64 global mean ``s``:

        S1 = AR(sum (x - s)),  S2 = AR(sum (x - s)^2)     mu - s = S1/M,  var = S2/M - (S1/M)^2

    and then dx = weight / sqrt(var + eps) * (g - AR(sum g)/M - x_hat AR(sum g x_hat)/M), where
    AR is a differentiable all-reduce (its backward is an all-reduce too). Second derivatives
    therefore see every rank's x through mu and var. Four collectives per layer per backward
    pass and double-backward pass; every rank must differentiate with create_graph alike.
    """
    x, weight, mean, _ = ctx.saved_tensors
    nd = x.dim()
    dims = torch_ops.reduce_dims(x)
    c = mean.numel()
    m = ctx.total

    def channel(t: Tensor) -> Tensor:
        return torch_ops.channel_view(t, nd)  # (C,) -> broadcastable against (N, C, *)

    d = x.double() - channel(mean)  # (N, C, *)
    local = torch.cat([d.sum(dim=dims), d.square().sum(dim=dims)])  # (2C,)
    sums = _collectives.all_reduce_sum_differentiable(local, ctx.group, ctx.where, "the batch sums")
    shift = sums[:c] / m  # (C,) mu - s
    invstd = torch.rsqrt((sums[c:] / m - shift.square()).clamp_min(0) + ctx.eps)  # (C,)
    x_hat = (d - channel(shift)) * channel(invstd)  # (N, C, *)
    g = grad_y.double()
    local_g = torch.cat([g.sum(dim=dims), (g * x_hat).sum(dim=dims)])  # (2C,)
    sums_g = _collectives.all_reduce_sum_differentiable(local_g, ctx.group, ctx.where, "the gradient sums")
    scale = invstd if weight is None else invstd * weight.double()  # (C,)
    dx = channel(scale) * (g - channel(sums_g[:c] / m) - x_hat * channel(sums_g[c:] / m))
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dw = local_g[c:].to(weight.dtype) if (need_w and weight is not None) else None
    db = local_g[:c].to(ctx.bias_dtype) if (need_b and ctx.bias_dtype is not None) else None
    return (dx.to(x.dtype) if need_x else None), dw, db


def _sync_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    group: object | None,
    where: str,
) -> tuple[Tensor, bool | None]:
    """Training forward over the group; returns (y, whether running stats were updated)."""
    c = x.shape[1]
    total, mean64, var64 = global_moments(x, group, where)
    if total == 1:
        raise ValueError(
            f"{where}: expected more than 1 value per channel when training, got 1 over the whole "
            f"process group (local input shape {tuple(x.shape)})"
        )
    if total == 0:
        zeros = torch.zeros(c, dtype=torch_ops.acc_dtype(x.dtype), device=x.device)
        return torch_ops.normalize(x, zeros, zeros + 1, weight, bias), False if running_mean is not None else None
    # the mean stays float64: centring subtracts its rounding to x's precision, then the
    # residual, so mean 1e4 / std 1e-2 in float32 keeps the spread's digits
    y = _SyncNormalize.apply(x, weight, bias, mean64, var64, eps, total, group, where)
    if running_mean is None:
        return y, None
    return y, update_running_stats(running_mean, running_var, mean64, var64, total, momentum)


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: object | None = None,
) -> Tensor:
    """Training-mode batch norm with statistics over ``process_group`` (module docstring).

    Every rank of the group must call it (one all_reduce in forward, one in backward). The
    running statistics, if given, are updated in place with the global mean and unbiased
    variance. Requires an initialized ``torch.distributed``.

    Shape: input (N_r, C, *) on each rank (N_r may differ, may be 0) -> same shape.
    """
    where = "sync_batch_norm"
    if not _collectives.is_distributed():
        raise RuntimeError(f"{where}: torch.distributed is not initialized (call init_process_group first)")
    _checks.check_args(
        input,
        where,
        training=True,
        eps=eps,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    momentum = _checks.check_momentum(momentum, where, allow_none=False)  # type: ignore[assignment]
    y, updated = _sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, process_group, where)
    warn_if_skipped(updated, input, where)
    return y


class SyncBatchNorm(BatchNormBase):
    """Batch norm synchronized over a process group, on CPU (gloo) and GPU (nccl).

        y = weight * (x - mu) / sqrt(var + eps) + bias,   mu, var (biased) over ALL ranks' x

    running_var stores the unbiased variance with the global count; momentum as PyTorch.

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        eps, momentum, affine, track_running_stats, device, dtype, bias: as ``nn.BatchNorm*d``.
        process_group: the group whose processes share statistics (default: the whole world).

    Shape: input (N_r, C, *) with 2 to 5 dims on each rank -> same shape. N_r may differ
    between ranks and may be 0. Same parameters, buffers and ``state_dict`` keys as
    ``torch.nn.SyncBatchNorm``/``BatchNorm*d``. See the module docstring for the math.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: object | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _synchronized(self) -> bool:
        """Whether this forward communicates: training and a group of more than one process."""
        return self.training and _collectives.group_size(self.process_group, self._where()) > 1

    def forward(self, input: Tensor) -> Tensor:
        """Normalize with statistics over the group in training; plain BN otherwise."""
        if is_fx_proxy(input):
            return self._traced_forward(input)
        if not self._synchronized():
            return super().forward(input)
        self._check_input_dim(input)
        where = self._where()
        y, updated = _synchronized_step(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            self.track_running_stats, self.momentum, self.eps, self.process_group, where,
        )  # fmt: skip
        record_update(self, updated, input, where)
        return y

    def _traced_forward(self, input: Tensor) -> Tensor:
        """Under torch.fx symbolic tracing: one ``sync_batch_norm_layer`` node.

        Whether to synchronize is decided when the graph runs, so a graph traced before
        ``init_process_group`` still synchronizes under DDP. A process group object cannot be a
        graph argument: a layer with its own ``process_group`` traces only in eval mode (which
        never communicates), as a plain ``batch_norm_layer``.
        """
        if self.process_group is not None:
            if self.training:
                raise TypeError(
                    f"{self._where()}: torch.fx cannot record a process_group object in a graph; "
                    "trace in eval mode, or use the default group (process_group=None) to trace training"
                )
            return super()._traced_forward(input)
        return sync_batch_norm_layer(input, *self._layer_state(), self._ndims, self.num_features, self._where())


def _synchronized_step(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    track_running_stats: bool,
    momentum: float | None,
    eps: float,
    group: object | None,
    where: str,
) -> tuple[Tensor, bool | None]:
    """A training forward over the group (input already checked); returns (y, updated)."""
    _checks.check_eps(eps, where, training=True)
    return _sync_batch_norm(
        input,
        running_mean if track_running_stats else None,
        running_var if track_running_stats else None,
        weight,
        bias,
        momentum_now(momentum, num_batches_tracked) if track_running_stats else 0.0,
        eps,
        group,
        where,
    )


def sync_batch_norm_layer(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    training: bool,
    track_running_stats: bool,
    momentum: float | None,
    eps: float,
    ndims: tuple[int, ...],
    num_features: int,
    where: str,
) -> Tensor:
    """One forward of a ``SyncBatchNorm`` (default group) from its state: the fx graph node.

    Synchronizes when ``training`` and the default group has more than one process *at run
    time*; otherwise it is :func:`batch_norm_layer`. Same checks, output and in-place update
    of the running statistics and ``num_batches_tracked`` as the module's forward.

    Shape: input (N_r, C, *) with ``input.dim() in ndims`` -> same shape.
    """
    if not (training and _collectives.group_size(None, where) > 1):
        return batch_norm_layer(
            input, weight, bias, running_mean, running_var, num_batches_tracked, training,
            track_running_stats, momentum, eps, ndims, num_features, where,
        )  # fmt: skip
    _checks.check_input(input, where, ndims=ndims, num_features=num_features)
    y, updated = _synchronized_step(
        input, weight, bias, running_mean, running_var, num_batches_tracked, track_running_stats, momentum, eps,
        None, where,
    )  # fmt: skip
    record_update_traced(updated, num_batches_tracked, input, where)
    return y


# During symbolic_trace a call with a Proxy argument becomes one graph node (call_function).
torch.fx.wrap("sync_batch_norm_layer")
