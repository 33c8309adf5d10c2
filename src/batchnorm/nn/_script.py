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
come from the operators it calls, as in eager. Each layer's ``forward`` starts with
``if torch.jit.is_scripting(): return <its operator>(...)``; TorchScript compiles only that
branch, and the layer itself is what gets scripted (its subclasses' forwards, its hooks, its
``state_dict``). A scripted layer therefore runs the eager step itself: the same checks and
messages, the same paths and the same updates. The schemas mark the buffers that a step writes
(``Tensor(a!)``). `prepare` (each layer's ``__prepare_scriptable__``) gives the layer the two
attributes that branch reads and that TorchScript cannot compute: its accepted ranks as a list,
and its name for messages.

A saved TorchScript module names these operators: loading it needs ``import batchnorm`` first.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from .act import batch_norm_act_layer
from .batchnorm import batch_norm_layer
from .frozen import frozen_batch_norm
from .ghost import ghost_batch_norm_layer
from .renorm import batch_renorm_layer

__all__ = ["prepare"]

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


def prepare(layer: nn.Module) -> nn.Module:
    """The layer itself, ready for ``torch.jit.script``: ``_script_ndims`` (its accepted ranks,
    a list) and ``_script_where`` (its name in messages) set. Refused, with ``RuntimeError``, for a
    parametrized ``weight`` or ``bias`` (``torch.nn.utils.parametrize``), which TorchScript cannot
    compile."""
    where = f"{type(layer).__name__}({layer.num_features})"
    if parametrize.is_parametrized(layer):
        raise RuntimeError(
            f"{where}: torch.jit.script does not support a parametrized weight or bias; "
            "use torch.compile or torch.export, or remove the parametrization first"
        )
    vars(layer).update(_script_ndims=list(cast(tuple[int, ...], layer._ndims)), _script_where=where)
    return layer
