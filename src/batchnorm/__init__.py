"""batchnorm: exact, fast and understandable batch normalization for PyTorch.

    y = gamma * (x - mean) / sqrt(var + eps) + beta

Conventions (as PyTorch): momentum is the weight of the *new* batch statistic
(``running = (1 - momentum) * running + momentum * batch``, default 0.1); ``running_var`` stores
the *unbiased* variance; eps sits inside the square root.
"""

from .conventions import KerasConversion, from_keras, from_keras_momentum, to_keras_momentum
from .convert import convert
from .functional import batch_norm
from .functional_act import batch_norm_act
from .nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchNormBase,
)
from ._kernels.dispatch import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormBase",
    "KerasConversion",
    "batch_norm",
    "batch_norm_act",
    "convert",
    "from_keras",
    "from_keras_momentum",
    "get_backend",
    "set_backend",
    "to_keras_momentum",
    "use_backend",
]
