"""Converting batch-norm hyper-parameters between PyTorch's convention and Keras/Flax's.

PyTorch (and batchnorm):  running = (1 - momentum) * running + momentum * batch,  momentum=0.1,
                          eps=1e-5, running_var stores the *unbiased* batch variance.
Keras / Flax:             moving  = momentum * moving + (1 - momentum) * batch,   momentum=0.99,
                          epsilon=1e-3 (Keras) / 1e-5 (Flax), moving_variance stores the
                          *biased* batch variance.

So a Keras momentum m is a PyTorch momentum 1 - m, and the epsilons differ by default: a model
ported without changing eps normalizes differently wherever the variance is small.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import _checks

__all__ = ["from_keras_momentum", "to_keras_momentum", "KerasConversion", "from_keras"]


def from_keras_momentum(momentum: float) -> float:
    """Keras/Flax momentum (weight of the *old* value, e.g. 0.99) -> ours/PyTorch's (0.01)."""
    where = "from_keras_momentum"
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{where}: expected a Keras/Flax momentum, a float in [0, 1], got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"{where}: expected a Keras/Flax momentum in [0, 1] (the weight of the OLD value, e.g. 0.99), "
            f"got {momentum}"
        )
    return 1.0 - float(momentum)


def to_keras_momentum(momentum: float) -> float:
    """Ours/PyTorch's momentum (weight of the *new* value, e.g. 0.1) -> Keras/Flax's (0.9)."""
    m = _checks.check_momentum(momentum, "to_keras_momentum", allow_none=False)
    return 1.0 - m  # type: ignore[operator]


@dataclass(frozen=True)
class KerasConversion:
    """Constructor arguments for our layers that reproduce a Keras/Flax BatchNormalization."""

    momentum: float
    """Ours/PyTorch's momentum: the weight of the new batch statistic (= 1 - Keras momentum)."""
    eps: float
    """Added to the variance inside the square root (Keras calls it ``epsilon``)."""
    note: str
    """A sentence saying what was converted and what to watch (variance bias)."""

    def kwargs(self) -> dict[str, float]:
        """``{"momentum": ..., "eps": ...}`` to pass to ``BatchNorm*d``."""
        return {"momentum": self.momentum, "eps": self.eps}


def from_keras(momentum: float = 0.99, epsilon: float = 1e-3) -> KerasConversion:
    """Convert Keras/Flax BatchNormalization settings (defaults: Keras's) to ours.

    >>> c = from_keras(0.99, 1e-3); c.momentum, c.eps
    (0.010000000000000009, 0.001)
    """
    ours = from_keras_momentum(momentum)
    eps = _checks.check_eps(epsilon, "from_keras", training=True)
    note = (
        f"Keras/Flax momentum {momentum} weights the OLD value; ours weights the NEW one, so "
        f"momentum={ours:g}. eps={eps:g} kept (PyTorch's default is 1e-5). Keras stores the "
        "biased moving variance; ours stores the unbiased one (x m/(m-1)) - convert "
        "moving_variance with the batch size when moving checkpoints."
    )
    return KerasConversion(momentum=ours, eps=eps, note=note)
