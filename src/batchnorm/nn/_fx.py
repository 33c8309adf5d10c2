"""How our layers appear in a ``torch.fx`` symbolic trace (private): as one node.

fx's default tracer keeps torch's own layers (``torch.nn.*``) as leaf modules, one
``call_module`` node each, and traces through every other module's ``forward``. Our layers
record themselves the same way: their forward, handed a ``torch.fx.Proxy``, returns
`leaf_call`'s node instead of running. Running the graph then calls the module itself, with
its checks, its state and its mode at that time (``graph_module.train()``/``eval()`` switch it).
``BatchNorm1d/2d/3d`` record their ``torch_layer`` instead where they can (torch's exact type,
for torch's fusion and quantization tools). A layer traced as the root itself (no path to call
it by) records one `root_call` of its step function instead, whose tensor arguments are
``get_attr`` nodes of the root's own parameters and buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["leaf_call", "root_call"]


def leaf_call(module: nn.Module, input: torch.fx.Proxy, **kwargs: Any) -> torch.fx.Proxy | None:
    """``module(input, **kwargs)`` recorded as one ``call_module`` node of the running trace
    (keyword arguments that are None left out), or None when ``module`` is the traced root.
    Raises ``NameError`` ("module is not installed as a submodule"), as for torch's own layers,
    when it is not part of the traced root."""
    tracer = input.tracer
    path = tracer.path_of_module(module)  # type: ignore[attr-defined]
    if not path:
        return None
    given = {k: v for k, v in kwargs.items() if v is not None}
    return tracer.create_proxy("call_module", path, (input,), given)  # type: ignore[no-any-return]


def root_call(module: nn.Module, step: Callable[..., Any] | None, args: tuple[Any, ...]) -> torch.fx.Proxy:
    """``step(*args)`` recorded as one ``call_function`` node (``args[0]``, the input, is a Proxy);
    a ``step`` of None: the layer has no such form, ``TypeError``."""
    if step is None:
        raise TypeError(f"{type(module).__name__}: trace a module that contains the layer, not the layer itself")
    return args[0].tracer.create_proxy("call_function", step, args, {})  # type: ignore[no-any-return]
