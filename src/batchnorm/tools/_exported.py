"""Working on ``torch.export`` programs (.pt2) with the module-level tools (private).

An exported program has no modules, only operator calls on lifted tensors:
``aten.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)``
(torch's layers), ``batchnorm.eval(x, running_mean, running_var, weight, bias, eps)`` (ours in
eval mode, and FrozenBatchNorm),
``aten.conv2d(x, weight, bias, stride, padding, dilation, groups)``, ``aten.linear(x, weight, bias)``.
``lift_modules`` turns each such call on ``get_attr`` tensors back into a module call
(``torch.nn.BatchNorm*d``, ``Conv*d``, ``ConvTranspose*d``, ``Linear``) holding the *same*
tensors, registered under the original module name. Then ``fold``, ``recompute_statistics`` and
``inspect_model`` work unchanged, and ``reexport`` exports the result again with the
program's example inputs (shapes become those example shapes: re-export yourself for dynamic
shapes). The lifted module is in eval mode (flags set directly: an exported program's module
refuses ``.eval()``); only eval-mode batch norms (``training=False`` in the graph) are lifted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

__all__ = ["lift_modules", "unlifted_batchnorms", "reexport", "example_inputs"]

_aten = torch.ops.aten
_CONVS = {
    _aten.conv1d.default: (nn.Conv1d, False),
    _aten.conv2d.default: (nn.Conv2d, False),
    _aten.conv3d.default: (nn.Conv3d, False),
    _aten.conv_transpose1d.default: (nn.ConvTranspose1d, True),
    _aten.conv_transpose2d.input: (nn.ConvTranspose2d, True),
    _aten.conv_transpose3d.input: (nn.ConvTranspose3d, True),
}
_OUR_EVAL = torch.ops.batchnorm.eval.default  # registered by importing batchnorm (batchnorm.ops)
_BN_FOR_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` target names."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _param(t: torch.Tensor) -> nn.Parameter:
    """``t`` itself if it is a Parameter, else a Parameter sharing its storage."""
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=t.requires_grad)


def _prefix(node: Any) -> str | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    return str(node.target).rpartition(".")[0]


def _arg(node: fx.Node, i: int, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else default


def _install(gm: fx.GraphModule, prefix: str, module: nn.Module) -> bool:
    """Put ``module`` at ``prefix`` if a plain container sits there (the exported module's shell)."""
    if not prefix:
        return False
    parent_name, _, leaf = prefix.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    current = getattr(parent, leaf, None)
    if type(current) is not nn.Module:
        return False
    setattr(parent, leaf, module)
    return True


def _new_bn(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    if node.target is _OUR_EVAL:
        # batchnorm::eval(x, mean, var, weight, bias, eps): our layers' inference, always eval mode
        x, rm, rv, weight, bias = node.args[:5]
        training, momentum, eps = False, 0.1, _arg(node, 5, 1e-5)
    else:
        x, weight, bias, rm, rv = node.args[:5]
        training, momentum, eps = _arg(node, 5, False), _arg(node, 6, 0.1), _arg(node, 7, 1e-5)
    prefix = _prefix(rm)
    if training or prefix is None or _prefix(rv) != prefix:
        return None
    if any(t is not None and _prefix(t) != prefix for t in (weight, bias)):
        return None
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    cls = _BN_FOR_RANK.get(val.dim() if isinstance(val, torch.Tensor) else -1)
    if cls is None:
        return None
    running_mean = _fetch(gm, str(rm.target))
    bn = cls(running_mean.shape[0], eps=float(eps), momentum=momentum, affine=weight is not None, device="meta")
    if weight is not None:
        bn.weight = _param(_fetch(gm, str(weight.target)))
        bn.bias = _param(_fetch(gm, str(bias.target))) if bias is not None else None
    bn.running_mean = running_mean
    bn.running_var = _fetch(gm, str(rv.target))
    container = gm.get_submodule(prefix)
    nbt = getattr(container, "num_batches_tracked", None)
    bn.num_batches_tracked = nbt if isinstance(nbt, torch.Tensor) else torch.tensor(0)
    bn.eval()
    return prefix, bn


def _new_layer(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    weight_node = node.args[1]
    bias_node = _arg(node, 2, None)
    prefix = _prefix(weight_node)
    if prefix is None or (bias_node is not None and _prefix(bias_node) != prefix):
        return None
    weight = _fetch(gm, str(weight_node.target))
    bias = _fetch(gm, str(bias_node.target)) if bias_node is not None else None
    if node.target is _aten.linear.default:
        layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        cls, transposed = _CONVS[node.target]
        stride, padding = _arg(node, 3, 1), _arg(node, 4, 0)
        if transposed:
            output_padding, groups, dilation = _arg(node, 5, 0), _arg(node, 6, 1), _arg(node, 7, 1)
            in_ch, out_ch = weight.shape[0], weight.shape[1] * groups
            layer = cls(
                in_ch,
                out_ch,
                tuple(weight.shape[2:]),
                stride=stride,
                padding=padding,
                output_padding=output_padding,
                groups=groups,
                bias=bias is not None,
                dilation=dilation,
                device="meta",
            )
        else:
            dilation, groups = _arg(node, 5, 1), _arg(node, 6, 1)
            in_ch, out_ch = weight.shape[1] * groups, weight.shape[0]
            layer = cls(
                in_ch,
                out_ch,
                tuple(weight.shape[2:]),
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=bias is not None,
                device="meta",
            )
    layer.weight = _param(weight)
    if bias is not None:
        layer.bias = _param(bias)
    return prefix, layer


def lift_modules(gm: fx.GraphModule) -> list[str]:
    """Rewrite aten batch_norm / conv / linear calls of ``gm`` (``ExportedProgram.module()``) as
    module calls, in place. Returns the names of the lifted modules. A tensor owner used by two
    calls (a shared conv) becomes one module called twice, as in the original model."""
    lifted: list[str] = []
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten.batch_norm.default or node.target is _OUR_EVAL:
            made = _new_bn(gm, node)
        elif node.target is _aten.linear.default or node.target in _CONVS:
            made = _new_layer(gm, node)
        else:
            continue
        if made is None:
            continue
        prefix, module = made
        existing = gm.get_submodule(prefix)
        if type(existing) is nn.Module:
            if not _install(gm, prefix, module):
                continue
            lifted.append(prefix)
        elif type(existing) is not type(module) or repr(existing) != repr(module):
            continue  # the same tensors used by a different kind of call: leave it alone
        with graph.inserting_before(node):
            call = graph.call_module(prefix, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    for m in gm.modules():  # the program's mode is baked in; its modules refuse .eval()
        m.training = False
    return lifted


def unlifted_batchnorms(gm: fx.GraphModule) -> list[str]:
    """Owners of running_mean/running_var buffers that are not batch-norm modules after lifting.

    A batch norm whose forward is Python code (many subclasses) is exported as the primitive
    ops of that code, not as one ``aten.batch_norm`` or ``batchnorm.eval`` call, so it cannot be
    lifted; nor can one exported in training mode: these names are reported instead of being
    silently ignored.
    """
    names = []
    for name, m in gm.named_modules():
        if (
            type(m) is nn.Module
            and isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor)
        ):
            names.append(name)
    return names


def example_inputs(program: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The (args, kwargs) an ExportedProgram was exported with (raises ValueError if absent)."""
    ex = getattr(program, "example_inputs", None)
    if ex is None:
        raise ValueError("the exported program carries no example inputs; re-export it with torch >= 2.5")
    return tuple(ex[0]), dict(ex[1])


def reexport(model: nn.Module, program: Any) -> Any:
    """``torch.export.export`` of ``model`` with ``program``'s example inputs."""
    args, kwargs = example_inputs(program)
    return torch.export.export(model, args, kwargs)
