"""NumPy float64 reference of the textbook equations: the oracle the tests trust.

Written to read like the equations, not to be fast; never imported by the library itself.
Arrays are shaped (N, C, *spatial); every statistic is per channel over the
m = N * prod(spatial) values of x[:, c].

    mu      = (1/m) sum_j x_j
    var     = (1/m) sum_j (x_j - mu)^2                 (biased: used to normalize)
    x_hat   = (x - mu) / sqrt(var + eps)               (eps inside the square root)
    y       = gamma * x_hat + beta

    dbeta   = sum g
    dgamma  = sum g * x_hat
    dx      = gamma / sqrt(var + eps) * (g - mean(g) - x_hat * mean(g * x_hat))

Running statistics (PyTorch convention, momentum = weight of the new value):

    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Moments",
    "backward",
    "eval_forward",
    "forward",
    "moments",
    "running_update",
]

F64 = NDArray[np.float64]


def _per_channel(x: ArrayLike) -> F64:
    """(N, C, *) -> (C, m): channel c's m values in one row."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(f"reference: expected an array of shape (N, C, *), got shape {a.shape}")
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)


def _broadcast(v: F64, ndim: int) -> F64:
    """(C,) -> (1, C, 1, ..., 1)."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def moments(x: ArrayLike) -> tuple[F64, F64]:
    """Per-channel mean and biased variance of x (N, C, *), two-pass in float64."""
    rows = _per_channel(x)
    mu = rows.mean(axis=1)
    var = ((rows - mu[:, None]) ** 2).mean(axis=1)
    return mu, var


def forward(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[F64, F64, F64]:
    """Training forward. Returns (y, mu, var) with var biased; gamma=1, beta=0 when None."""
    a = np.asarray(x, dtype=np.float64)
    c = a.shape[1]
    g = np.ones(c) if gamma is None else np.asarray(gamma, dtype=np.float64)
    b = np.zeros(c) if beta is None else np.asarray(beta, dtype=np.float64)
    mu, var = moments(a)
    x_hat = (a - _broadcast(mu, a.ndim)) / np.sqrt(_broadcast(var, a.ndim) + eps)
    y = _broadcast(g, a.ndim) * x_hat + _broadcast(b, a.ndim)
    return y, mu, var


def eval_forward(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
) -> F64:
    """Inference: y = gamma * (x - mean) / sqrt(var + eps) + beta with fixed statistics."""
    a = np.asarray(x, dtype=np.float64)
    c = a.shape[1]
    g = np.ones(c) if gamma is None else np.asarray(gamma, dtype=np.float64)
    b = np.zeros(c) if beta is None else np.asarray(beta, dtype=np.float64)
    m = _broadcast(np.asarray(mean, dtype=np.float64), a.ndim)
    v = _broadcast(np.asarray(var, dtype=np.float64), a.ndim)
    return _broadcast(g, a.ndim) * (a - m) / np.sqrt(v + eps) + _broadcast(b, a.ndim)


def backward(
    grad_y: ArrayLike,
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[F64, F64, F64]:
    """Training backward for upstream gradient g = dL/dy. Returns (dx, dgamma, dbeta)."""
    a = np.asarray(x, dtype=np.float64)
    g = np.asarray(grad_y, dtype=np.float64)
    nd = a.ndim
    c = a.shape[1]
    gam = np.ones(c) if gamma is None else np.asarray(gamma, dtype=np.float64)
    mu, var = moments(a)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (a - _broadcast(mu, nd)) * _broadcast(inv_std, nd)
    axes = (0, *range(2, nd))
    dbeta = g.sum(axis=axes)
    dgamma = (g * x_hat).sum(axis=axes)
    mean_g = g.mean(axis=axes)
    mean_gx = (g * x_hat).mean(axis=axes)
    dx = _broadcast(gam * inv_std, nd) * (g - _broadcast(mean_g, nd) - x_hat * _broadcast(mean_gx, nd))
    return dx, dgamma, dbeta


def running_update(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    x: ArrayLike,
    momentum: float = 0.1,
) -> tuple[F64, F64]:
    """One EMA step of the running statistics with batch x; returns the new (mean, var).

    The batch variance enters *unbiased* (times m/(m-1)), as PyTorch stores it.
    """
    mu, var = moments(x)
    m = _per_channel(x).shape[1]
    unbiased = var * m / (m - 1)
    rm = (1 - momentum) * np.asarray(running_mean, dtype=np.float64) + momentum * mu
    rv = (1 - momentum) * np.asarray(running_var, dtype=np.float64) + momentum * unbiased
    return rm, rv


@dataclass(frozen=True)
class Moments:
    """Streaming per-channel moments: count n, mean, and M2 = sum (x - mean)^2.

    Merging two summaries uses Chan et al.'s parallel update, which never subtracts two large
    sums (the naive E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std):

        n     = n_a + n_b
        delta = mean_b - mean_a
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta^2 * n_a * n_b / n
    """

    count: int
    mean: F64
    m2: F64

    @classmethod
    def empty(cls, channels: int) -> Moments:
        """No data yet: count 0."""
        return cls(0, np.zeros(channels), np.zeros(channels))

    @classmethod
    def of(cls, x: ArrayLike) -> Moments:
        """Summary of one batch x (N, C, *)."""
        rows = _per_channel(x)
        mu = rows.mean(axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
        m2 = ((rows - mu[:, None]) ** 2).sum(axis=1)
        return cls(rows.shape[1], mu, m2)

    def merge(self, other: Moments) -> Moments:
        """The summary of both data sets (Chan's update)."""
        n = self.count + other.count
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    def var(self, unbiased: bool = True) -> F64:
        """M2 / (n - 1) if unbiased else M2 / n."""
        denom = self.count - 1 if unbiased else self.count
        if denom <= 0:
            raise ValueError(f"Moments.var: need more than {1 if unbiased else 0} samples, have {self.count}")
        return self.m2 / denom
