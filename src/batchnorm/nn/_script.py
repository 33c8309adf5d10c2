"""The layers under ``torch.jit.script`` (private): each layer's own step as one operator.

TorchScript compiles a subset of Python, and a layer's step (input checks, the choice of path,
the kernels, the running-statistics update) is ordinary Python. So the step function of each
kind is registered as one operator whose kernel calls that function (lists of ints become
the tuples it takes):

    torch.ops.batchnorm.bn_layer      `batchnorm.nn.batchnorm.batch_norm_layer`   (BatchNorm*d, SyncBatchNorm)
    torch.ops.batchnorm.ghost_layer   `batchnorm.nn.ghost.ghost_batch_norm_layer`
    torch.ops.batchnorm.renorm_layer  `batchnorm.nn.renorm.batch_renorm_layer`
    torch.ops.batchnorm.act_layer     `batchnorm.nn.act.batch_norm_act_layer`
    torch.ops.batchnorm.frozen_layer  `batchnorm.nn.frozen.frozen_batch_norm`

registered for ``CompositeImplicitAutograd``: the function runs above autograd, so gradients
come from the operators it calls, as in eager. A layer's ``__prepare_scriptable__`` returns a
`Scripted` module in its place: the same parameter and buffer tensors under the same names (the
same ``state_dict``), the layer's settings, and a forward that is one call of its kind's operator.
A scripted layer therefore runs the eager step itself: the same checks and messages, the same
paths and the same updates. The schemas mark the buffers that a step writes (``Tensor(a!)``).

A saved TorchScript module names these operators: loading it needs ``import batchnorm`` first.
``torch.jit.script`` replaces the layers of the module it is given (torch's own behaviour for
``__prepare_scriptable__``); the `Scripted` modules also run eagerly, through the same step.
"""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
from torch import Tensor, nn

from .act import batch_norm_act_layer
from .batchnorm import batch_norm_layer
from .frozen import frozen_batch_norm
from .ghost import ghost_batch_norm_layer
from .renorm import batch_renorm_layer

__all__ = ["Scripted", "ScriptedBatchNorm", "ScriptedGhost", "ScriptedRenorm", "ScriptedAct", "ScriptedFrozen"]

_LIB = torch.library.Library("batchnorm", "FRAGMENT")

_STATE = (
    "Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "Tensor(c!)? num_batches_tracked, bool training"
)


def _define(name: str, schema: str, step: Any) -> None:
    """Register ``name(schema) -> Tensor`` with ``step`` as its kernel above autograd."""
    _LIB.define(f"{name}({schema}) -> Tensor")
    _LIB.impl(name, step, "CompositeImplicitAutograd")


_define(
    "bn_layer",
    f"{_STATE}, bool track_running_stats, float? momentum, float eps, int[] ndims, int num_features, str where, "
    "Tensor(d!)? num_batches_skipped, int channel_dim, Tensor? mask",
    lambda x, w, b, rm, rv, nbt, training, track, momentum, eps, ndims, c, where, nbs, channel_dim, mask: (
        batch_norm_layer(
            x, w, b, rm, rv, nbt, training, track, momentum, eps, tuple(ndims), c, where, nbs, channel_dim, mask
        )
    ),
)
_define(
    "ghost_layer",
    f"{_STATE}, bool track_running_stats, float? momentum, float eps, int virtual_batch_size, int[] ndims, "
    "int num_features, str where, Tensor(d!)? num_batches_skipped",
    lambda x, w, b, rm, rv, nbt, training, track, momentum, eps, v, ndims, c, where, nbs: ghost_batch_norm_layer(
        x, w, b, rm, rv, nbt, training, track, momentum, eps, v, tuple(ndims), c, where, nbs
    ),
)
_define(
    "renorm_layer",
    f"{_STATE}, float? momentum, float eps, float r_max, float d_max, int warmup_steps, int r_max_steps, "
    "int d_max_steps, int[] ndims, int num_features, str where, Tensor(d!)? num_batches_skipped",
    lambda x, w, b, rm, rs, nbt, training, momentum, eps, r, d, warm, r_steps, d_steps, ndims, c, where, nbs: (
        batch_renorm_layer(
            x, w, b, rm, rs, nbt, training, momentum, eps, (r, d, warm, r_steps, d_steps), tuple(ndims), c, where, nbs
        )
    ),
)
_define(
    "act_layer",
    f"{_STATE}, bool track_running_stats, float? momentum, float eps, str activation, float negative_slope, "
    "float alpha, int[] ndims, int num_features, str where, Tensor(d!)? num_batches_skipped",
    lambda x, w, b, rm, rv, nbt, training, track, momentum, eps, act, slope, alpha, ndims, c, where, nbs: (
        batch_norm_act_layer(
            x, w, b, rm, rv, nbt, training, track, momentum, eps, act, slope, alpha, tuple(ndims), c, where, nbs
        )
    ),
)
_define(
    "frozen_layer",
    "Tensor input, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, float eps, int[] ndims, "
    "int num_features, str where",
    lambda x, w, b, rm, rv, eps, ndims, c, where: frozen_batch_norm(x, w, b, rm, rv, eps, tuple(ndims), c, where),
)


class Scripted(nn.Module):
    """What ``torch.jit.script`` compiles in a layer's place: the layer's parameters and buffers
    (the same tensors, names and persistence; a tensor the step takes that the layer lacks is
    None), its mode, the settings its step reads, its accepted ranks ``ndims`` and its name
    ``where`` for messages."""

    def __init__(self, layer: nn.Module, tensors: tuple[str, ...], settings: tuple[str, ...]) -> None:
        super().__init__()
        self.training = layer.training
        for key, param in layer._parameters.items():
            self.register_parameter(key, param)
        for key, buf in layer._buffers.items():
            self.register_buffer(key, buf, persistent=key not in layer._non_persistent_buffers_set)
        for key in tensors:
            if key not in self._parameters and key not in self._buffers:
                self.register_buffer(key, None, persistent=False)
        for key in settings:
            setattr(self, key, getattr(layer, key))
        self.ndims: list[int] = list(cast(tuple[int, ...], layer._ndims))
        self.num_features: int = cast(int, layer.num_features)
        self.where: str = f"{type(layer).__name__}({self.num_features})"


_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked", "num_batches_skipped")
_BN_SETTINGS = ("track_running_stats", "momentum", "eps")


class ScriptedBatchNorm(Scripted):
    """``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (without collectives) under TorchScript."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer, _BN, (*_BN_SETTINGS, "channel_dim"))

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:  # noqa: UP045 (TorchScript)
        return torch.ops.batchnorm.bn_layer(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            self.training, self.track_running_stats, self.momentum, self.eps, self.ndims, self.num_features,
            self.where, self.num_batches_skipped, self.channel_dim, mask,
        )  # fmt: skip


class ScriptedGhost(Scripted):
    """``GhostBatchNorm1d/2d/3d`` under TorchScript."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer, _BN, (*_BN_SETTINGS, "virtual_batch_size"))

    def forward(self, input: Tensor) -> Tensor:
        return torch.ops.batchnorm.ghost_layer(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            self.training, self.track_running_stats, self.momentum, self.eps, self.virtual_batch_size, self.ndims,
            self.num_features, self.where, self.num_batches_skipped,
        )  # fmt: skip


class ScriptedRenorm(Scripted):
    """``BatchRenorm1d/2d/3d`` under TorchScript."""

    def __init__(self, layer: nn.Module) -> None:
        tensors = ("weight", "bias", "running_mean", "running_std", "num_batches_tracked", "num_batches_skipped")
        schedule = ("r_max", "d_max", "warmup_steps", "r_max_steps", "d_max_steps")
        super().__init__(layer, tensors, ("momentum", "eps", *schedule))

    def forward(self, input: Tensor) -> Tensor:
        return torch.ops.batchnorm.renorm_layer(
            input, self.weight, self.bias, self.running_mean, self.running_std, self.num_batches_tracked,
            self.training, self.momentum, self.eps, self.r_max, self.d_max, self.warmup_steps, self.r_max_steps,
            self.d_max_steps, self.ndims, self.num_features, self.where, self.num_batches_skipped,
        )  # fmt: skip


class ScriptedAct(Scripted):
    """``BatchNormAct1d/2d/3d`` under TorchScript."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer, _BN, (*_BN_SETTINGS, "activation", "negative_slope", "alpha"))

    def forward(self, input: Tensor) -> Tensor:
        return torch.ops.batchnorm.act_layer(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            self.training, self.track_running_stats, self.momentum, self.eps, self.activation, self.negative_slope,
            self.alpha, self.ndims, self.num_features, self.where, self.num_batches_skipped,
        )  # fmt: skip


class ScriptedFrozen(Scripted):
    """``FrozenBatchNorm1d/2d/3d`` under TorchScript."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer, ("weight", "bias", "running_mean", "running_var"), ("eps",))

    def forward(self, input: Tensor) -> Tensor:
        return torch.ops.batchnorm.frozen_layer(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.ndims,
            self.num_features, self.where,
        )  # fmt: skip
