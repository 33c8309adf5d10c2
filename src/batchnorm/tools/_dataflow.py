"""Which batch norm is fed by / feeds which Linear or Conv: found by torch.fx dataflow (private).

Module registration order says nothing about execution order, and a module may be called at
several places; so we trace the model symbolically and read the graph. A (layer, BN) pair is
only reported when rewriting it cannot change anything else:

- both modules are called exactly once in the graph (a shared conv is left alone), counted by
  module *object* (the same module registered under two names counts twice);
- neither module's tensors are read directly (``self.conv.weight`` in a forward);
- the tensor between them has no other user (the conv output is not also used by a skip path);
- the batch norm is a plain one: its class does not override ``forward`` (subclasses that add
  an activation or anything else are reported, not folded).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..nn.batchnorm import MaskableBatchNorm
from ..nn.frozen import FrozenBatchNormBase
from ..nn.ghost import GhostBatchNormBase
from ..nn.renorm import BatchRenormBase
from ..nn.sync import SyncBatchNorm as OurSyncBatchNorm

__all__ = ["is_batchnorm", "is_plain_batchnorm", "Dataflow", "trace", "Pair", "bn_pairs"]

# Forwards that compute exactly the batch-norm map in eval mode (fold and freeze only use that):
# ghost and our sync layer differ from plain BN in training only.
_PLAIN_FORWARDS = (
    _BatchNorm.forward,
    SyncBatchNorm.forward,
    MaskableBatchNorm.forward,  # BatchNorm*d: without a mask, the plain map
    FrozenBatchNormBase.forward,
    GhostBatchNormBase.forward,
    OurSyncBatchNorm.forward,
)


def is_batchnorm(m: nn.Module) -> bool:
    """Any batch norm: torch's ``_BatchNorm`` (BatchNorm*d, SyncBatchNorm, ours, subclasses),
    frozen, or batch renorm (so that tools list it instead of skipping it silently)."""
    return isinstance(m, (_BatchNorm, FrozenBatchNormBase, BatchRenormBase))


def is_plain_batchnorm(m: nn.Module) -> bool:
    """A batch norm whose class computes exactly ``gamma * (x - mean) / sqrt(var + eps) + beta``
    in eval mode.

    Decided by its ``forward``: inherited from torch's, ours (plain, ghost, sync) or the frozen
    one (so user subclasses that only rename or add attributes count; ones that override
    ``forward`` do not, nor batch renorm, whose state is a running std).
    """
    return is_batchnorm(m) and type(m).forward in _PLAIN_FORWARDS


def is_weight_layer(m: nn.Module) -> bool:
    """A Linear or Conv/ConvTranspose (1d/2d/3d, subclasses included) with a ``weight``."""
    return isinstance(m, (nn.Linear, _ConvNd)) and isinstance(getattr(m, "weight", None), torch.Tensor)


class _Tracer(fx.Tracer):
    """Keeps batch norms, Linear and Conv modules as leaves (ours and subclasses included)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_batchnorm(m) or is_weight_layer(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class Dataflow:
    """The traced graph of a model and how often each module object is used."""

    root: nn.Module
    graph: fx.Graph
    calls: Counter[int] = field(default_factory=Counter)
    """Number of ``call_module`` sites per module object (by ``id``)."""
    attr_read: set[int] = field(default_factory=set)
    """Modules whose parameters/buffers the forward reads directly."""

    def module(self, node: Any) -> nn.Module | None:
        """The module a ``call_module`` node calls (None for other nodes)."""
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.root.get_submodule(node.target)
        return None

    def exclusive(self, m: nn.Module) -> bool:
        """Called once and its tensors not read elsewhere."""
        return self.calls[id(m)] == 1 and id(m) not in self.attr_read


def trace(root: nn.Module) -> Dataflow:
    """Trace ``root`` with torch.fx (raises whatever fx raises on untraceable code)."""
    graph = _Tracer().trace(root)
    flow = Dataflow(root, graph)
    for node in graph.nodes:
        if node.op == "call_module":
            flow.calls[id(root.get_submodule(node.target))] += 1
        elif node.op == "get_attr" and node.users:  # fx may leave unused get_attr nodes behind
            owner, _, _ = str(node.target).rpartition(".")
            try:
                flow.attr_read.add(id(root.get_submodule(owner)))
            except AttributeError:
                continue
    return flow


@dataclass(frozen=True)
class Pair:
    """A batch norm next to a weight layer, with its direction."""

    bn: str
    """Qualified name of the batch norm (the name of its call site)."""
    layer: str
    """Qualified name of the Linear/Conv."""
    bn_after: bool
    """True for ``bn(layer(x))``, False for ``layer(bn(x))``."""
    node: fx.Node
    """The batch norm's call node."""


def _only_input(node: fx.Node) -> fx.Node | None:
    """The single tensor argument of a call with no other arguments (None otherwise)."""
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def producer_problem(flow: Dataflow, bn_node: fx.Node) -> tuple[str | None, str]:
    """(layer name or None, why not) for ``bn(layer(x))`` with an exclusive layer and edge."""
    src = _only_input(bn_node)
    layer = flow.module(src)
    if src is None or layer is None or not is_weight_layer(layer):
        what = "nothing" if src is None else (src.op if src.op != "call_module" else type(layer).__name__)
        return None, f"its input comes from {what}, not a Linear/Conv"
    bn = flow.module(bn_node)
    name = str(src.target)
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return None, f"{name} has {out} outputs, the batch norm {bn.num_features} channels"
    if not flow.exclusive(layer):
        return None, f"{name} is used more than once (shared layer), so it cannot absorb the batch norm"
    if len(src.users) != 1:
        return None, f"the output of {name} is also used elsewhere (e.g. a skip connection)"
    return name, ""


def consumer_problem(flow: Dataflow, bn_node: fx.Node) -> tuple[str | None, str]:
    """(layer name or None, why not) for ``layer(bn(x))``."""
    from ._fold import conv_after_bn_problem

    users = list(bn_node.users)
    if len(users) != 1:
        return None, f"its output has {len(users)} users"
    user = users[0]
    layer = flow.module(user)
    if layer is None or not is_weight_layer(layer) or _only_input(user) is not bn_node:
        what = user.op if layer is None else type(layer).__name__
        return None, f"its output goes to {what}, not a Linear/Conv"
    bn = flow.module(bn_node)
    name = str(user.target)
    inp = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if inp != bn.num_features:
        return None, f"{name} takes {inp} inputs, the batch norm has {bn.num_features} channels"
    if not flow.exclusive(layer):
        return None, f"{name} is used more than once (shared layer)"
    if isinstance(layer, _ConvNd):
        problem = conv_after_bn_problem(layer)
        if problem is not None:
            return None, problem
    return name, ""


def bn_pairs(flow: Dataflow) -> tuple[list[Pair], dict[str, str]]:
    """Foldable (BN, layer) pairs in graph order, and a reason for every other batch norm."""
    pairs: list[Pair] = []
    problems: dict[str, str] = {}
    for node in flow.graph.nodes:
        bn = flow.module(node)
        if bn is None or not is_batchnorm(bn):
            continue
        name = str(node.target)
        if not is_plain_batchnorm(bn):
            problems[name] = f"{type(bn).__name__} overrides forward (it may do more than normalize)"
            continue
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            problems[name] = "no running statistics (track_running_stats=False): it uses batch statistics at inference"
            continue
        if not (torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()):
            problems[name] = "its running statistics contain NaN/inf (recompute them first)"
            continue
        if not flow.exclusive(bn):
            problems[name] = "the batch norm is called more than once or its tensors are read elsewhere"
            continue
        layer, why_after = producer_problem(flow, node)
        if layer is not None:
            pairs.append(Pair(name, layer, True, node))
            continue
        layer, why_before = consumer_problem(flow, node)
        if layer is not None:
            pairs.append(Pair(name, layer, False, node))
            continue
        problems[name] = f"{why_after}; and {why_before}"
    return pairs, problems
