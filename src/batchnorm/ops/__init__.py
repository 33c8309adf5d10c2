"""PyTorch operators in the ``batchnorm`` namespace (``torch.ops.batchnorm.*``).

Every computation of the layers is one registered operator, so torch.compile, torch.export,
torch.fx and torch.func see one opaque, shape-known node per computation instead
of our Python and numba code:

========================================  ==============================================
operator                                  computes
========================================  ==============================================
``train(x, weight, bias, eps)``           (y, mean, var): training forward, batch statistics
``train_backward(g, x, weight, mean,      (dx, dweight, dbias)
var, eps)``
``eval(x, mean, var, weight, bias, eps)`` y with fixed statistics
``moments(x)``                            (mean, var) only
``update_running_stats(...)``             the running-statistics EMA, in place, on the device
========================================  ==============================================

Each layer's whole step is an operator too, which the layer's ``torch.jit.script`` form
calls (`batchnorm.nn._script`). Importing `batchnorm` registers them all (loading an exported
program or a saved TorchScript module that uses them needs ``import batchnorm`` first).
"""

from ._path import recomputing
from .bn import eval_forward, memory_format_of, moments, train_forward, train_step
from .update import update_running_stats_

__all__ = [
    "eval_forward",
    "memory_format_of",
    "moments",
    "recomputing",
    "train_forward",
    "train_step",
    "update_running_stats_",
]
