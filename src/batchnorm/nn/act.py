"""``BatchNormAct1d/2d/3d``: batch norm + invertible activation, fused, saving only the output.

    z = act(weight * (x - E[x]) / sqrt(Var[x] + eps) + bias),  act in {leaky_relu, elu, identity}

Drop-in for ``BatchNorm*d`` followed by ``LeakyReLU``/``ELU``: same parameters, buffers,
running-statistics behaviour (PyTorch momentum convention, unbiased ``running_var``, no update
from non-finite batches) and ``state_dict`` keys, so the ``state_dict`` of a plain
``torch.nn.BatchNorm2d`` loads with ``strict=True``. In training, backward keeps only z and
recomputes x_hat from it (In-Place ABN, Rota Bulo et al. 2018): about half the activation
memory of BN + activation. ReLU is refused (not invertible); see
`batchnorm.functional_act` for the formulas, the |gamma| guard and the ELU caveat.

Example::

    block = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, bias=False), BatchNormAct2d(16))
    # replaces Conv2d -> BatchNorm2d(16) -> LeakyReLU(0.01)
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor

from .. import _checks
from ..functional_act import act_step, check_activation
from ._fx import leaf_call, root_call
from .batchnorm import BatchNormBase, layer_mode

__all__ = ["BatchNormActBase", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "batch_norm_act_layer"]


def batch_norm_act_layer(
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
    activation: str,
    negative_slope: float,
    alpha: float,
    ndims: tuple[int, ...],
    num_features: int,
    where: str,
    num_batches_skipped: Tensor | None = None,
) -> Tensor:
    """One forward of a ``BatchNormAct*d`` from its state (the module's forward).

    ``act(BN(input))`` with the module's checks and running-statistics update in mode
    ``training`` (see `batchnorm.nn.batchnorm.batch_norm_layer`).

    Shape: input (N, C, *) with ``input.dim() in ndims`` -> output of the same shape.
    """
    use_batch_stats, update = layer_mode(training, track_running_stats, running_mean)
    _checks.check_layer_input(input, where, ndims, num_features, use_batch_stats, eps)
    keep = update or not use_batch_stats
    return act_step(
        input,
        running_mean if keep else None,
        running_var if keep else None,
        weight,
        bias,
        use_batch_stats,
        momentum if update else 0.0,
        eps,
        activation,
        negative_slope,
        alpha,
        where,
        num_batches_tracked,
        num_batches_skipped,
    )


class BatchNormActBase(BatchNormBase):
    """Shared implementation of ``BatchNormAct*d``; subclasses set ``_ndims``.

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        activation: "leaky_relu" (default), "elu" or "identity". "relu" raises ValueError:
            ReLU is not invertible, so the memory-saving backward cannot recover its input.
        negative_slope: slope of leaky_relu for y < 0, > 0 (default 0.01, as torch).
        alpha: ELU's alpha, > 0 (default 1.0).
        eps, momentum, affine, track_running_stats, device, dtype, bias: as ``BatchNorm*d``
            (momentum: weight of the new batch statistic, default 0.1; None = cumulative).
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "leaky_relu",
        *,
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        bias: bool = True,
    ) -> None:
        check_activation(activation, negative_slope, alpha, f"{type(self).__name__}({num_features})")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        act = self.activation
        if act == "leaky_relu":
            act += f", negative_slope={self.negative_slope}"
        elif act == "elu":
            act += f", alpha={self.alpha}"
        return f"{super().extra_repr()}, activation={act}"

    def forward(self, input: Tensor) -> Tensor:
        """z = act(BN(input)) per channel, fused; see the module docstring."""
        if torch.jit.is_scripting():  # TorchScript compiles only this branch (nn/_script.py)
            return torch.ops.batchnorm.act_layer(
                input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
                self.training, self.track_running_stats, None if self.momentum is None else float(self.momentum),
                float(self.eps), self.activation, self.negative_slope, self.alpha, self._script_ndims,
                self.num_features, self._script_where, self.num_batches_skipped,
            )  # fmt: skip
        if isinstance(input, torch.fx.Proxy):  # under fx tracing: one node (nn/_fx.py)
            node = leaf_call(self, input)
            if node is not None:
                return node
        args = (
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            self.training, self.track_running_stats, self.momentum, self.eps, self.activation, self.negative_slope,
            self.alpha, self._ndims, self.num_features, f"{type(self).__name__}({self.num_features})",
            self.num_batches_skipped,
        )  # fmt: skip
        if isinstance(input, torch.fx.Proxy):  # the layer is the traced root
            return root_call(self, batch_norm_act_layer, args)
        return batch_norm_act_layer(*args)


class BatchNormAct1d(BatchNormActBase):
    """BN + activation over (N, C) or (N, C, L); replaces ``BatchNorm1d`` + ``LeakyReLU``/``ELU``.

    Shape: input (N, C) or (N, C, L) -> output of the same shape; statistics over N (and L).
    """

    _ndims = (2, 3)


class BatchNormAct2d(BatchNormActBase):
    """BN + activation over (N, C, H, W); replaces ``BatchNorm2d`` + ``LeakyReLU``/``ELU``.

    Shape: input (N, C, H, W) -> same shape, dtype and memory format; statistics per channel
    over N*H*W values.
    """

    _ndims = (4,)


class BatchNormAct3d(BatchNormActBase):
    """BN + activation over (N, C, D, H, W); replaces ``BatchNorm3d`` + ``LeakyReLU``/``ELU``.

    Shape: input (N, C, D, H, W) -> same shape; statistics per channel over N*D*H*W values.
    """

    _ndims = (5,)
