"""``FrozenBatchNorm1d/2d/3d``: batch norm with fixed statistics and affine, whatever the mode.

    y = weight * (x - running_mean) / sqrt(running_var + eps) + bias
      = (x - running_mean) * scale + bias,   scale = weight / sqrt(running_var + eps)

computed in that order: the expanded ``x * scale + shift`` (``shift = bias - running_mean *
scale``) cancels catastrophically for a large mean and a small spread (mean 1e4, std 1e-2 in
float32: ``x * scale`` ~ 1e6 has an ulp of 0.06), whereas ``x - running_mean`` is exact there.

Everything is a buffer (no parameters, nothing to train, nothing updated): the layer computes the
same function after ``.train()`` as after ``.eval()``. Use it to fine-tune with small batches
on top of trusted statistics, or as the frozen backbone of a detector.

Checkpoints: the ``state_dict`` keys are exactly those of ``BatchNorm*d`` (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), so a BatchNorm checkpoint loads
strictly into a frozen layer and back. ``num_batches_tracked`` is kept only for that: it is
carried unchanged (freezing then unfreezing is lossless) and never used. A checkpoint of a
``BatchNorm*d(affine=False)`` (no weight/bias) loads as weight 1, bias 0; one without
``num_batches_tracked`` (very old) loads as 0. ``running_var`` holds the *unbiased* variance
(our convention and PyTorch's), and eps sits inside the square root; unlike old torchvision
``FrozenBatchNorm2d`` the default eps is 1e-5, as ``BatchNorm*d``.

These layers are deliberately *not* subclasses of torch's ``_BatchNorm``: tools that reset and
re-estimate "every batch norm" (``swa_utils.update_bn``, PreciseBN) would otherwise wipe them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from .. import _checks, ops
from ._fx import leaf_call, root_call

__all__ = ["FrozenBatchNormBase", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "frozen_batch_norm"]


def frozen_batch_norm(
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    ndims: tuple[int, ...],
    num_features: int,
    where: str,
) -> Tensor:
    """``y = (x - running_mean) * scale + bias``, ``scale = weight / sqrt(running_var + eps)``,
    per channel (dim 1), in at least float32 (see the module docstring for the order).

    The whole forward of a frozen layer, which checks ``input.dim() in ndims`` and its
    ``num_features`` channels.

    Shape: input (N, C, *) -> output of the same shape and dtype.
    """
    _checks.check_input(input, where, ndims=ndims, num_features=num_features)
    return ops.eval_forward(input, running_mean, running_var, weight, bias, eps)  # batchnorm::eval


class FrozenBatchNormBase(nn.Module):
    """Frozen batch norm over any (N, C, *) input; see the module docstring.

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        eps: added to ``running_var`` inside the square root (>= 0; default 1e-5).

    Shape: input (N, C, *) -> output of the same shape and dtype (scale/shift applied in at
    least float32 for float16/bfloat16 input).
    """

    _ndims: tuple[int, ...] = (2, 3, 4, 5)
    frozen = True
    """Marks layers whose statistics must not be re-estimated (read by ``recompute_statistics``)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: expected num_features to be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.eps = _checks.check_eps(eps, f"{type(self).__name__}({num_features})", training=False)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> FrozenBatchNormBase:
        """A frozen copy of a batch-norm layer's current eval-mode function (and its dtype/device).

        Raises ``ValueError`` for a layer without running statistics (it has no fixed function).
        """
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            raise ValueError(
                f"{cls.__name__}.from_batchnorm: {type(bn).__name__} has no running statistics "
                "(track_running_stats=False), so there is nothing to freeze"
            )
        rm = bn.running_mean
        new = cls(bn.num_features, eps=float(bn.eps), device=rm.device, dtype=rm.dtype)
        with torch.no_grad():
            new.running_mean.copy_(rm)
            new.running_var.copy_(bn.running_var)
            if getattr(bn, "weight", None) is not None:
                new.weight.copy_(bn.weight.detach())
            if getattr(bn, "bias", None) is not None:
                new.bias.copy_(bn.bias.detach())
            nbt = getattr(bn, "num_batches_tracked", None)
            if isinstance(nbt, Tensor):
                new.num_batches_tracked.copy_(nbt)
        # remembered so that unfreeze() can give back the same kind of layer
        affine = bool(getattr(bn, "affine", True))
        new._unfreeze_as = (type(bn), affine, getattr(bn, "momentum", 0.1))
        # BatchNorm*d(bias=False): unfreeze must not add a bias the original did not have
        new._unfreeze_without_bias = affine and getattr(bn, "bias", None) is None
        return new

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # BatchNorm*d(affine=False) and very old checkpoints lack some keys: fill the identity
        defaults = {"weight": self.weight.new_ones, "bias": self.bias.new_zeros}
        for key, make in defaults.items():
            if prefix + key not in state_dict:
                state_dict[prefix + key] = make(self.num_features)
        if prefix + "num_batches_tracked" not in state_dict:
            state_dict[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """(scale, shift) of ``y = x * scale + shift``, per channel, in float64."""
        scale = self.weight.double() * torch.rsqrt(self.running_var.double() + self.eps)
        shift = self.bias.double() - self.running_mean.double() * scale
        return scale, shift

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles: this layer, whose forward's TorchScript branch is
        one call of its step registered as an operator (`batchnorm.nn._script`)."""
        from ._script import prepare

        return prepare(self)

    def forward(self, input: Tensor) -> Tensor:
        """``y = (x - running_mean) * scale + bias`` per channel (dim 1), in any mode."""
        if torch.jit.is_scripting():  # TorchScript compiles only this branch (nn/_script.py)
            return torch.ops.batchnorm.frozen_layer(
                input, self.weight, self.bias, self.running_mean, self.running_var, float(self.eps),
                self._script_ndims, self.num_features, self._script_where,
            )  # fmt: skip
        if isinstance(input, torch.fx.Proxy):  # under fx tracing: one node (nn/_fx.py)
            node = leaf_call(self, input)
            if node is not None:
                return node
        args = (
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.eps,
            self._ndims,
            self.num_features,
            f"{type(self).__name__}({self.num_features})",
        )
        if isinstance(input, torch.fx.Proxy):  # the layer is the traced root
            return root_call(self, frozen_batch_norm, args)
        return frozen_batch_norm(*args)


class FrozenBatchNorm1d(FrozenBatchNormBase):
    """Frozen batch norm for (N, C) or (N, C, L) input (the frozen ``BatchNorm1d``)."""

    _ndims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNormBase):
    """Frozen batch norm for (N, C, H, W) input (the frozen ``BatchNorm2d``)."""

    _ndims = (4,)


class FrozenBatchNorm3d(FrozenBatchNormBase):
    """Frozen batch norm for (N, C, D, H, W) input (the frozen ``BatchNorm3d``)."""

    _ndims = (5,)
