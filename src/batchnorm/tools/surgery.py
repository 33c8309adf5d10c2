"""Model surgery for inference: fold batch norm, strip redundant biases, freeze / unfreeze.

Every function returns a new model by default (``inplace=False``; the input is deep-copied
first, so it is provably untouched) and works on the module hierarchy: the returned model is
still an instance of the user's class, with folded batch norms replaced by ``nn.Identity``.
Which modules are adjacent is read from a torch.fx trace of the forward (``_dataflow``), never
from module registration order; shared layers are never rewritten.

Tensor-level building blocks live in ``batchnorm.tools._fold`` (``fold_bn_weights`` ...), re-exported
here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenBatchNormBase
from . import _dataflow
from ._fold import (
    bn_scale_shift,
    fold_bn_conv,
    fold_bn_into_next_weights,
    fold_bn_linear,
    fold_bn_weights,
    fold_conv_bn,
    fold_linear_bn,
)
from .convert import replace_modules

__all__ = [
    "FoldResult",
    "fold",
    "RedundantBias",
    "find_redundant_biases",
    "strip_redundant_bias",
    "freeze",
    "unfreeze",
    "bn_scale_shift",
    "fold_bn_weights",
    "fold_bn_into_next_weights",
    "fold_linear_bn",
    "fold_conv_bn",
    "fold_bn_linear",
    "fold_bn_conv",
]


def _check_module(model: object, where: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
    return model


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered in ``root`` (every name it has)."""
    replace_modules(root, lambda m: new if m is old else None)


# ----------------------------------------------------------------------------------- fold


@dataclass
class FoldResult:
    """What [`fold`][batchnorm.fold] returns."""

    model: nn.Module
    """The folded model (a copy unless ``inplace=True``)."""
    folded: list[tuple[str, str, str]] = field(default_factory=list)
    """(batch norm, layer, "after"|"before") for every fold done: BN after or before the layer."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(batch norm, reason) for every batch norm left in place."""

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norm(s), left {len(self.skipped)}"]
        lines += [f"  folded {bn} into {layer} (BN {where} it)" for bn, layer, where in self.folded]
        lines += [f"  kept {bn}: {why}" for bn, why in self.skipped]
        return "\n".join(lines)


def _ranks_ok(pair: _dataflow.Pair, layer: nn.Module) -> str | None:
    """With shape metadata, check that a Linear next to a BN sees (N, C) tensors."""
    if not isinstance(layer, nn.Linear):
        return None
    meta = pair.node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    if len(meta.shape) != 2:
        return f"the batch norm sees a {len(meta.shape)}D tensor, so its channels are not the Linear's features"
    return None


def fold(model: nn.Module, *, inplace: bool = False, example_inputs: tuple[Any, ...] | None = None) -> FoldResult:
    """Fold every eval-mode batch norm into the Linear/Conv next to it.

        BN(layer(x)) -> layer'(x):   W' = s W,  b' = s b + t      (s, t: BN as x * s + t)
        layer(BN(x)) -> layer'(x):   W' = W diag(s),  b' = b + W t

    Adjacency comes from a torch.fx trace (batch norms, Linear and Conv kept as leaves; the
    forward may take dicts or several arguments). BN after a Linear / Conv1d-3d /
    ConvTranspose1d-3d (grouped, dilated, strided) is always folded; BN before a Linear, or
    before a Conv with padding 0 or a non-zero padding mode, too. Batch norms are matched by
    type (torch's, SyncBatchNorm, ours, plain subclasses, frozen), and a layer used more than
    once, or whose output is also used elsewhere, is never rewritten. Folding is computed in
    float64 and cast to each layer's dtype; dtype, device and ``requires_grad`` are kept.

    Args:
        model: the model, in eval mode (every module: ``model.eval()``).
        inplace: rewrite ``model`` itself instead of a deep copy.
        example_inputs: optional arguments of one forward call; if given, shapes are propagated
            and a Linear next to a batch norm is folded only when the tensor between them is
            2D (N, C). Without them that is assumed, as for every BatchNorm1d before or after
            a Linear in practice.

    Returns:
        [`FoldResult`][batchnorm.FoldResult] with the model, the folds made, and every batch norm left in place
        with the reason (untraceable model, shared layer, BN subclass with its own forward,
        zero-padded conv after the BN, no running statistics...). Nothing is skipped silently.

    Raises:
        ValueError: some module is in training mode.
    """
    _check_module(model, "fold")
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:3]) + (" ..." if len(training) > 3 else "")
        raise ValueError(f"fold: expected a model in eval mode (call model.eval()), but {shown} is in training mode")
    root = model if inplace else copy.deepcopy(model)
    all_bns = [name for name, m in root.named_modules() if _dataflow.is_batchnorm(m)]
    result = FoldResult(root)
    try:
        flow = _dataflow.trace(root)
    except Exception as err:  # fx raises many types on dynamic control flow
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        result.skipped = [
            (name, f"torch.fx could not trace the model ({type(err).__name__}: {msg})") for name in all_bns
        ]
        return result
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        # annotates every node of flow.graph with tensor_meta (shape, dtype)
        ShapeProp(fx.GraphModule(root, flow.graph)).propagate(*example_inputs)
    pairs, problems = _dataflow.bn_pairs(flow)
    reached = {p.bn for p in pairs} | set(problems)
    for pair in pairs:
        bn = root.get_submodule(pair.bn)
        layer = root.get_submodule(pair.layer)
        problem = _ranks_ok(pair, layer)
        if problem is not None:
            problems[pair.bn] = problem
            continue
        with torch.no_grad():
            if pair.bn_after and isinstance(layer, nn.Linear):
                fold_linear_bn(layer, bn, inplace=True)
            elif pair.bn_after:
                fold_conv_bn(layer, bn, inplace=True)
            elif isinstance(layer, nn.Linear):
                fold_bn_linear(bn, layer, inplace=True)
            else:
                fold_bn_conv(bn, layer, inplace=True)
        _replace(root, bn, nn.Identity())
        result.folded.append((pair.bn, pair.layer, "after" if pair.bn_after else "before"))
    result.skipped = sorted(problems.items())
    result.skipped += [(name, "not called by the model's forward") for name in all_bns if name not in reached]
    return result


# ------------------------------------------------------------------- redundant biases


@dataclass(frozen=True)
class RedundantBias:
    """A Linear/Conv bias that the batch norm right after it cancels."""

    layer: str
    """Qualified name of the Linear/Conv."""
    bn: str
    """Qualified name of the batch norm it feeds."""
    parameters: int
    """Number of wasted parameters (the bias's size)."""


def _bias_pairs(flow: _dataflow.Dataflow) -> list[tuple[fx.Node, str, str]]:
    """(bn node, layer name, bn name) for every biased layer feeding only a batch norm."""
    found = []
    for node in flow.graph.nodes:
        bn = flow.module(node)
        if bn is None or not _dataflow.is_batchnorm(bn) or not flow.exclusive(bn):
            continue
        layer_name, _ = _dataflow.producer_problem(flow, node)
        if layer_name is None:
            continue
        if getattr(flow.root.get_submodule(layer_name), "bias", None) is None:
            continue
        found.append((node, layer_name, str(node.target)))
    return found


def find_redundant_biases(model: nn.Module) -> list[RedundantBias]:
    """Lint: every Linear/Conv whose bias feeds straight into a batch norm (and nothing else).

    BN subtracts the mean of its input, so a per-channel constant added just before it has no
    effect in training and is absorbed by the running mean in eval: ``parameters`` counts the
    waste. Found by torch.fx dataflow; returns [] for a model fx cannot trace.
    """
    _check_module(model, "find_redundant_biases")
    try:
        flow = _dataflow.trace(model)
    except Exception:
        return []
    return [
        RedundantBias(layer, bn, int(model.get_submodule(layer).bias.numel())) for _, layer, bn in _bias_pairs(flow)
    ]


def strip_redundant_bias(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Remove every bias listed by [`find_redundant_biases`][batchnorm.find_redundant_biases], keeping outputs unchanged.

        BN(W x + b) with running mean m  ==  BN'(W x) with running mean m - b

    The bias parameter is deleted (set to None) and subtracted from the batch norm's running
    mean (in float64, cast back), so eval outputs are unchanged; training outputs are unchanged
    because BN subtracts the batch mean, which contains b. A batch norm without running
    statistics needs no adjustment. Returns a new model unless ``inplace=True``.
    Note: an optimizer built on the old model's parameters must be rebuilt.

    Raises:
        ValueError: torch.fx cannot trace the model (nothing is changed).
    """
    _check_module(model, "strip_redundant_bias")
    root = model if inplace else copy.deepcopy(model)
    try:
        flow = _dataflow.trace(root)
    except Exception as err:  # fx raises many types on dynamic control flow
        msg = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            "strip_redundant_bias: expected a model torch.fx can trace (to see which layer feeds which "
            f"batch norm), but tracing failed ({type(err).__name__}: {msg}); nothing was changed"
        ) from err
    for _, layer_name, bn_name in _bias_pairs(flow):
        layer = root.get_submodule(layer_name)
        bn = root.get_submodule(bn_name)
        with torch.no_grad():
            if getattr(bn, "running_mean", None) is not None:
                shifted = bn.running_mean.double() - layer.bias.detach().double()
                bn.running_mean.copy_(shifted.to(bn.running_mean.dtype))
        layer.bias = None
    return root


# ------------------------------------------------------------------------- freeze


_FROZEN_FOR = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
_OURS_FOR = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


_DIMS_FOR_NDIMS = {(2, 3): 1, (4,): 2, (5,): 3}


def _spatial_dims(bn: nn.Module) -> int | None:
    """1, 2 or 3 for a BN that accepts (N, C, L) / (N, C, H, W) / (N, C, D, H, W); None if unknown."""
    for d, classes in {
        1: (nn.BatchNorm1d, BatchNorm1d, FrozenBatchNorm1d),
        2: (nn.BatchNorm2d, BatchNorm2d, FrozenBatchNorm2d),
        3: (nn.BatchNorm3d, BatchNorm3d, FrozenBatchNorm3d),
    }.items():
        if isinstance(bn, classes):
            return d
    # our other layers (GhostBatchNorm2d ...) declare the input ranks they accept
    return _DIMS_FOR_NDIMS.get(tuple(getattr(type(bn), "_ndims", ())))


def freeze(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every plain batch norm with running statistics by a ``FrozenBatchNorm*d``.

    The frozen layer computes the batch norm's current eval-mode function in every mode.
    BatchNorm1d/2d/3d (torch's, ours, plain subclasses) become FrozenBatchNorm1d/2d/3d; a
    SyncBatchNorm (any rank) becomes ``FrozenBatchNormBase``. Subclasses that override forward and
    layers without running statistics are left alone. A module passed directly is frozen too.
    """
    _check_module(model, "freeze")
    root = model if inplace else copy.deepcopy(model)

    def frozen(bn: nn.Module) -> nn.Module:
        cls = _FROZEN_FOR.get(_spatial_dims(bn) or 0, FrozenBatchNormBase)
        return cls.from_batchnorm(bn)

    def eligible(m: nn.Module) -> bool:
        return isinstance(m, _BatchNorm) and _dataflow.is_plain_batchnorm(m) and m.running_mean is not None

    # one frozen layer per batch-norm object: a shared batch norm stays shared
    return replace_modules(root, lambda m: frozen(m) if eligible(m) else None)


def _thawed(fb: FrozenBatchNormBase) -> nn.Module:
    cls, affine, momentum = getattr(fb, "_unfreeze_as", (None, True, 0.1))
    if cls is None or not issubclass(cls, _BatchNorm):
        cls = _OURS_FOR.get(_spatial_dims(fb) or 0, BatchNorm2d)
    rm = fb.running_mean
    try:
        new = cls(fb.num_features, eps=fb.eps, momentum=momentum, affine=affine)
    except TypeError:  # a subclass with its own constructor: fall back to ours
        new = _OURS_FOR.get(_spatial_dims(fb) or 0, BatchNorm2d)(
            fb.num_features, eps=fb.eps, momentum=momentum, affine=affine
        )
    if affine and getattr(fb, "_unfreeze_without_bias", False):
        new.register_parameter("bias", None)
    new = new.to(device=rm.device, dtype=rm.dtype)
    with torch.no_grad():
        new.running_mean.copy_(rm)
        new.running_var.copy_(fb.running_var)
        new.num_batches_tracked.copy_(fb.num_batches_tracked)
        if affine:
            new.weight.copy_(fb.weight)
            if new.bias is not None:
                new.bias.copy_(fb.bias)
    new.train(fb.training)
    return new


def unfreeze(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every ``FrozenBatchNorm*d`` by a trainable batch norm with the same state.

    A layer made by [`freeze`][batchnorm.freeze] comes back as its original class (affine, momentum kept);
    other frozen layers become our ``BatchNorm1d/2d/3d`` (affine, momentum 0.1). The new
    layer's train/eval flag is that of the frozen layer.
    """
    _check_module(model, "unfreeze")
    root = model if inplace else copy.deepcopy(model)
    return replace_modules(root, lambda m: _thawed(m) if isinstance(m, FrozenBatchNormBase) else None)
