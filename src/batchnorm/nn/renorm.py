"""``BatchRenorm1d/2d/3d``: Batch Renormalization (Ioffe 2017, arXiv 1702.03275), Algorithm 1.

Training, per channel over the m = N * prod(spatial) values of a batch:

    mu_B    = (1/m) sum x
    sigma_B = sqrt((1/m) sum (x - mu_B)^2 + eps)           (biased batch variance, eps inside)
    r       = sg(clip(sigma_B / sigma, 1/r_max, r_max))     (sg = stop-gradient: a constant)
    d       = sg(clip((mu_B - mu) / sigma, -d_max, d_max))
    x_hat   = r * (x - mu_B) / sigma_B + d
    y       = gamma * x_hat + beta

then the moving averages (PyTorch's momentum convention, ``momentum`` = the paper's alpha):

    mu    = (1 - momentum) * mu    + momentum * mu_B
    sigma = (1 - momentum) * sigma + momentum * sigma_B    (a moving *std*, not a variance)

Inference: y = gamma * (x - mu) / sigma + beta (no eps: sigma_B already contains it).

The gradient flows through mu_B and sigma_B only; r and d are constants (the paper's
stop-gradient). With r_max = 1 and d_max = 0, r = 1 and d = 0 and the layer is exactly batch
norm in training. The paper relaxes the limits with the training step t (`renorm_limits`):
plain BN for the first ``warmup_steps`` (5k), then linearly to ``r_max`` (3) at ``r_max_steps``
(40k) and to ``d_max`` (5) at ``d_max_steps`` (25k). The step counter is the buffer
``num_batches_tracked`` (one per training batch that updated the statistics), so checkpoints
carry the schedule's position. For short runs scale the three step counts, e.g. for T steps
``warmup_steps=T//10, d_max_steps=T//2, r_max_steps=4*T//5``.

Conventions that bite:

- ``momentum`` defaults to 0.01, the paper's "relatively fast" alpha (torch BN uses 0.1);
  ``momentum=None`` is the cumulative average 1/(t+1).
- State: ``running_mean``, ``running_std`` (init 0 and 1) and ``num_batches_tracked``.
  There is no ``running_var`` buffer; the read-only property ``running_var`` returns
  ``running_std**2 - eps`` (clamped >= 0), the variance for which the standard BN inference map
  ``(x - mean) / sqrt(var + eps)`` equals ours, so folding and inspection code that reads
  ``running_var`` gets the right affine map. `from_batchnorm` starts from a trained BN.
- The classes are deliberately *not* ``torch.nn.modules.batchnorm._BatchNorm`` subclasses: tools
  that reset or recompute ``running_var`` of "any batch norm" (``swa_utils.update_bn``) would
  silently miss ``running_std``.
- A non-finite batch changes no statistic and no step; an empty batch changes nothing.
- Activation checkpointing: a forward recomputed inside the backward (``torch.utils.checkpoint``)
  must see the mu, sigma and step the first forward saw, though the first forward has already
  updated them. Each training forward keeps its (mu_B, sigma_B^2, r, d) for a while (the last
  eight per layer, references to tensors it computed anyway); a recomputation finds its entry by
  its batch statistics (the same input gives the same mu_B and sigma_B) and reuses r and d, so
  outputs and gradients equal the un-checkpointed ones, and it does not update the statistics.
"""

from __future__ import annotations

import math
import weakref
from collections import deque

import torch
import torch.fx
from torch import Tensor, nn

from .. import _checks, ops
from ..functional import is_fx_proxy, update_step
from ..ops import renorm_math
from ._fx import leaf_call, root_call

__all__ = [
    "renorm_limits",
    "batch_renorm",
    "BatchRenormBase",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "batch_renorm_layer",
]


def renorm_limits(
    step: int,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    r_max_steps: int = 40000,
    d_max_steps: int = 25000,
) -> tuple[float, float]:
    """The clipping limits (r_max_t, d_max_t) at training step ``step`` (0-based), Ioffe 2017:

        r_max_t = 1 + (r_max - 1) * ramp(step, warmup_steps, r_max_steps)
        d_max_t =      d_max      * ramp(step, warmup_steps, d_max_steps)
        ramp(t, a, b) = clip((t - a) / (b - a), 0, 1)      (a step function when b == a)

    So the layer is plain BN for ``step <= warmup_steps``. Defaults are the paper's.
    """
    r_lim, d_lim = renorm_math.limits_at(torch.tensor(step), r_max, d_max, warmup_steps, r_max_steps, d_max_steps)
    return float(r_lim), float(d_lim)


def _check_schedule(where: str, r_max: float, d_max: float, warmup: int, r_steps: int, d_steps: int) -> None:
    for name, v in (("r_max", r_max), ("d_max", d_max)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{where}: expected {name} to be a finite float, got {v!r}")
    if r_max < 1.0:
        raise ValueError(f"{where}: expected r_max >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
    if d_max < 0.0:
        raise ValueError(f"{where}: expected d_max >= 0 (d is clipped to [-d_max, d_max]), got {d_max}")
    for name, v in (("warmup_steps", warmup), ("r_max_steps", r_steps), ("d_max_steps", d_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}: expected {name} to be a non-negative int, got {v!r}")
    if r_steps < warmup or d_steps < warmup:
        raise ValueError(
            f"{where}: expected r_max_steps and d_max_steps >= warmup_steps (the limits relax after "
            f"the warm-up), got warmup_steps={warmup}, r_max_steps={r_steps}, d_max_steps={d_steps}"
        )


def _check_renorm_args(
    x: object, running_mean: Tensor | None, running_std: Tensor | None, weight: Tensor | None, bias: Tensor | None,
    training: bool, eps: float, where: str,
) -> Tensor:  # fmt: skip
    x = _checks.check_input(x, where)
    c = x.shape[1]
    for name, p in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_std", running_std)):
        _checks.check_param(p, name, c, where)
    if running_mean is None or running_std is None:
        raise ValueError(f"{where}: batch renorm needs running_mean and running_std, got None")
    if training:
        _checks.check_eps(eps, where, training=True)
        _checks.check_batch_size(x, where)
    return x


# (mu_B, sigma_B^2, r, d) of the recent training forwards of each running_mean tensor (by id;
# dropped with the tensor): what a forward recomputed by activation checkpointing reuses
_SEEN: dict[int, deque[tuple[Tensor, Tensor, Tensor, Tensor]]] = {}
_SEEN_PER_LAYER = 8


def _seen_factors(
    seen: deque[tuple[Tensor, Tensor, Tensor, Tensor]], mean_b: Tensor, var_b: Tensor
) -> tuple[Tensor, Tensor] | None:
    """r and d of the latest earlier forward with these batch statistics (None if none)."""
    for mean_s, var_s, r, d in reversed(seen):
        if torch.equal(mean_s, mean_b) and torch.equal(var_s, var_b):
            return r, d
    return None


def _new_seen(running_mean: Tensor) -> deque[tuple[Tensor, Tensor, Tensor, Tensor]]:
    key = id(running_mean)
    seen = _SEEN[key] = deque(maxlen=_SEEN_PER_LAYER)
    weakref.finalize(running_mean, _SEEN.pop, key, None)
    return seen


def _batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
    where: str,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
) -> Tensor:
    """Batch renorm on checked arguments, as operator calls: ``batchnorm::moments`` (mu_B,
    sigma_B for r and d), ``batchnorm::train`` with the per-channel scale ``weight * r`` and shift
    ``weight * d + bias`` (r and d constants for autograd), ``batchnorm::update_running_stats``
    of the mean and std. Evaluation: ``batchnorm::eval`` with var = running_std^2 and eps = 0."""
    if not training:
        var = running_std.detach().to(torch.float64).square()
        return ops.eval_forward(x, running_mean.detach(), var, weight, bias, 0.0)
    if x.numel() == 0:
        return ops.train_forward(x, weight, bias, eps)[0]
    mean_b, var_b = ops.moments(x)  # (C,) float64, (C,) biased, not differentiable
    # the compiler replays nothing (its partitioner recomputes without mutation): nothing kept
    compiling = torch.compiler.is_compiling()
    seen = None if compiling else _SEEN.get(id(running_mean))
    earlier = None
    if seen is not None and torch._C._current_graph_task_id() != -1:  # ops.recomputing(), inline
        earlier = _seen_factors(seen, mean_b, var_b)
    if earlier is not None:  # recomputed by activation checkpointing: the first forward's r and d
        r, d = earlier
    else:
        r_lim = torch.as_tensor(r_max, dtype=torch.float64, device=x.device)
        d_lim = torch.as_tensor(d_max, dtype=torch.float64, device=x.device)
        r, d = renorm_math.factors(mean_b, var_b, running_mean, running_std, r_lim, d_lim, eps)  # (C,)
        if not compiling:
            (_new_seen(running_mean) if seen is None else seen).append((mean_b, var_b, r, d))
    w, b = renorm_math.folded_affine(weight, bias, r, d)  # y = weight * (r * x_hat + d) + bias
    y, mean, var = ops.train_forward(x, w, b, eps)
    std = torch.sqrt(var + eps)
    update_step(
        x, running_mean, running_std, mean, std, momentum, where, num_batches_tracked, num_batches_skipped, False
    )
    return y


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.01,
    eps: float = 1e-5,
    r_max: float = 1.0,
    d_max: float = 0.0,
) -> Tensor:
    """Functional batch renormalization with fixed limits (see the module docstring).

    In training, ``running_mean``/``running_std`` (C,) are the mu and sigma that r and d compare
    against and are updated in place (``momentum`` = the weight of the new value); in eval
    y = weight * (x - running_mean) / running_std + bias.

    Shape: input (N, C, *) -> output of the same shape and dtype; statistics in float32
    (float64 for float64 input).
    """
    where = "batch_renorm"
    if not is_fx_proxy(input):
        _checks.check_momentum(momentum, where, allow_none=False)
        _check_schedule(where, r_max, d_max, 0, 0, 0)
        input = _check_renorm_args(input, running_mean, running_std, weight, bias, training, eps, where)
    return _batch_renorm(input, running_mean, running_std, weight, bias, training, momentum, eps, r_max, d_max, where)


def batch_renorm_layer(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_std: Tensor,
    num_batches_tracked: Tensor,
    training: bool,
    momentum: float | None,
    eps: float,
    schedule: tuple[float, float, int, int, int],
    ndims: tuple[int, ...],
    num_features: int,
    where: str,
    num_batches_skipped: Tensor | None = None,
) -> Tensor:
    """One forward of a ``BatchRenorm*d`` from its state (the module's forward).

    Same checks, output, schedule (read from ``num_batches_tracked`` at the call) and
    in-place updates of ``running_mean``/``running_std``/``num_batches_tracked`` as the module
    in mode ``training``; ``schedule`` = (r_max, d_max, warmup_steps, r_max_steps,
    d_max_steps).

    Shape: input (N, C, *) with ``input.dim() in ndims`` -> output of the same shape.
    """
    # the layer's own parameters and buffers have the right shapes by construction: the input
    # and eps are what a call can get wrong
    _checks.check_layer_input(input, where, ndims, num_features, training, eps)
    if not training:
        return _batch_renorm(input, running_mean, running_std, weight, bias, False, momentum, eps, 1.0, 0.0, where)
    r_max, d_max = renorm_math.limits_at(num_batches_tracked, *schedule)
    return _batch_renorm(
        input, running_mean, running_std, weight, bias, True, momentum, eps, r_max, d_max, where,
        num_batches_tracked, num_batches_skipped,
    )  # fmt: skip


class BatchRenormBase(nn.Module):
    """Batch renormalization; subclasses set ``_ndims``. See the module docstring for the math.

        training:  y = weight * (r * (x - mu_B) / sigma_B + d) + bias   (r, d clipped, no gradient)
        eval:      y = weight * (x - running_mean) / running_std + bias

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        eps: added to the biased batch variance inside the square root of sigma_B; > 0.
        momentum: the paper's alpha, the weight of the new batch value in the moving mean and
            std (PyTorch convention); default 0.01 as in the paper; None: cumulative average.
        affine: learn a per-channel scale ``weight`` (init 1) and shift ``bias`` (init 0).
        r_max, d_max: the final clipping limits (paper: 3 and 5).
        warmup_steps: plain BN (r_max_t = 1, d_max_t = 0) up to this step (paper: 5000).
        r_max_steps: step at which r_max_t reaches ``r_max`` (paper: 40000).
        d_max_steps: step at which d_max_t reaches ``d_max`` (paper: 25000).

    Buffers: ``running_mean`` (C,), ``running_std`` (C,), ``num_batches_tracked`` (the step).
    """

    _ndims: tuple[int, ...] = (2, 3, 4, 5)
    __jit_unused_properties__ = ["running_var"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: expected num_features to be a positive int, got {num_features!r}")
        where = f"{name}({num_features})"
        self.eps = _checks.check_eps(eps, where, training=True)
        self.momentum = _checks.check_momentum(momentum, where, allow_none=True)
        _check_schedule(where, r_max, d_max, warmup_steps, r_max_steps, d_max_steps)
        self.num_features = num_features
        self.affine = affine
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_steps = r_max_steps
        self.d_max_steps = d_max_steps
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_std", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("num_batches_skipped", torch.tensor(0, dtype=torch.long, device=device), persistent=False)

    def reset_running_stats(self) -> None:
        """mu = 0, sigma = 1, step = 0 (the schedule starts again)."""
        self.running_mean.zero_()
        self.running_std.fill_(1.0)
        self.num_batches_tracked.zero_()
        self.num_batches_skipped.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and, with ``affine``, weight = 1 and bias = 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    @property
    def running_var(self) -> Tensor:
        """``running_std**2 - eps`` (>= 0): the variance that makes BN's inference formula
        ``(x - mean) / sqrt(var + eps)`` equal ours. Read-only and derived, not a buffer."""
        return (self.running_std.detach().square() - self.eps).clamp_min(0.0)

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """(r_max_t, d_max_t) at ``step`` (default: the current step ``num_batches_tracked``)."""
        t = int(self.num_batches_tracked.item()) if step is None else step
        return renorm_limits(t, self.r_max, self.d_max, self.warmup_steps, self.r_max_steps, self.d_max_steps)

    def _where(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _schedule(self) -> tuple[float, float, int, int, int]:
        return (self.r_max, self.d_max, self.warmup_steps, self.r_max_steps, self.d_max_steps)

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles: this layer, whose forward's TorchScript branch is
        one call of its step registered as an operator (`batchnorm.nn._script`)."""
        from ._script import prepare

        return prepare(self)

    def forward(self, input: Tensor) -> Tensor:
        """Renormalize ``input`` (N, C, *) per channel; see the module docstring."""
        if torch.jit.is_scripting():  # TorchScript compiles only this branch (nn/_script.py)
            return torch.ops.batchnorm.renorm_layer(
                input, self.weight, self.bias, self.running_mean, self.running_std, self.num_batches_tracked,
                self.training, None if self.momentum is None else float(self.momentum), float(self.eps),
                float(self.r_max), float(self.d_max), self.warmup_steps, self.r_max_steps, self.d_max_steps,
                self._script_ndims, self.num_features, self._script_where, self.num_batches_skipped,
            )  # fmt: skip
        if isinstance(input, torch.fx.Proxy):  # under fx tracing: one node (nn/_fx.py)
            node = leaf_call(self, input)
            if node is not None:
                return node
        # the schedule and the name inline (each method call is a Python call per step)
        args = (
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_std,
            self.num_batches_tracked,
            self.training,
            self.momentum,
            self.eps,
            (self.r_max, self.d_max, self.warmup_steps, self.r_max_steps, self.d_max_steps),
            self._ndims,
            self.num_features,
            f"{type(self).__name__}({self.num_features})",
            self.num_batches_skipped,
        )
        if isinstance(input, torch.fx.Proxy):  # the layer is the traced root
            return root_call(self, batch_renorm_layer, args)
        return batch_renorm_layer(*args)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **kwargs: object) -> BatchRenormBase:
        """A renorm layer that starts from a trained batch norm ``bn`` (torch's or ours):
        same weight/bias, ``running_mean``, and ``running_std = sqrt(running_var + eps)`` so that
        inference is unchanged. eps and affine are ``bn``'s; ``kwargs`` (momentum, schedule) go
        to the constructor, whose defaults are the paper's. The step counter starts at 0."""
        if getattr(bn, "running_var", None) is None or getattr(bn, "running_mean", None) is None:
            raise ValueError(f"{cls.__name__}.from_batchnorm: expected a batch norm with running statistics")
        params: dict[str, object] = {"eps": bn.eps, "affine": bn.affine, **kwargs}
        ref = bn.running_mean
        new = cls(bn.num_features, device=ref.device, dtype=ref.dtype, **params)  # type: ignore[arg-type]
        with torch.no_grad():
            new.running_mean.copy_(bn.running_mean)
            new.running_std.copy_(torch.sqrt(bn.running_var.double() + new.eps).to(ref.dtype))
            if new.affine and bn.affine:
                new.weight.copy_(bn.weight)
                if bn.bias is not None:
                    new.bias.copy_(bn.bias)
        new.train(bn.training)
        return new

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
            f"r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}"
        )


class BatchRenorm1d(BatchRenormBase):
    """Batch renorm over (N, C) or (N, C, L).

    Shape: input (N, C) or (N, C, L) -> same shape; statistics over N (and L).
    """

    _ndims = (2, 3)


class BatchRenorm2d(BatchRenormBase):
    """Batch renorm over (N, C, H, W).

    Shape: input (N, C, H, W) -> same shape; statistics per channel over N*H*W values.
    """

    _ndims = (4,)


class BatchRenorm3d(BatchRenormBase):
    """Batch renorm over (N, C, D, H, W).

    Shape: input (N, C, D, H, W) -> same shape; statistics per channel over N*D*H*W values.
    """

    _ndims = (5,)
