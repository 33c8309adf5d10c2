"""The NumPy oracle, checked against first principles (hand values, finite differences)."""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm import reference as ref


def test_forward_on_hand_values() -> None:
    # one channel, values 1..4: mean 2.5, biased var 1.25
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(4, 1)
    y, mu, var = ref.forward(x, eps=0.0)
    assert mu[0] == 2.5
    assert var[0] == 1.25
    np.testing.assert_allclose(y[:, 0], (x[:, 0] - 2.5) / np.sqrt(1.25))


def test_running_update_stores_unbiased_variance() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(4, 1)
    rm, rv = ref.running_update(np.zeros(1), np.ones(1), x, momentum=1.0)
    assert rm[0] == 2.5
    np.testing.assert_allclose(rv[0], 5.0 / 3.0)


@pytest.mark.parametrize("shape", [(6, 3), (4, 2, 5), (3, 2, 2, 3)])
def test_backward_matches_finite_differences(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    gamma = rng.normal(size=shape[1])
    g = rng.normal(size=shape)
    dx, dgamma, dbeta = ref.backward(g, x, gamma, eps=1e-3)

    def loss(xx: np.ndarray, gg: np.ndarray, bb: np.ndarray) -> float:
        return float((ref.forward(xx, gg, bb, eps=1e-3)[0] * g).sum())

    h = 1e-6
    beta = np.zeros(shape[1])
    num_dx = np.zeros_like(x)
    for idx in np.ndindex(*shape):
        e = np.zeros_like(x)
        e[idx] = h
        num_dx[idx] = (loss(x + e, gamma, beta) - loss(x - e, gamma, beta)) / (2 * h)
    num_dgamma = np.array(
        [
            (loss(x, gamma + h * np.eye(shape[1])[c], beta) - loss(x, gamma - h * np.eye(shape[1])[c], beta)) / (2 * h)
            for c in range(shape[1])
        ]
    )
    num_dbeta = np.array(
        [
            (loss(x, gamma, beta + h * np.eye(shape[1])[c]) - loss(x, gamma, beta - h * np.eye(shape[1])[c])) / (2 * h)
            for c in range(shape[1])
        ]
    )
    np.testing.assert_allclose(dx, num_dx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dgamma, num_dgamma, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbeta, num_dbeta, rtol=1e-6, atol=1e-8)


def test_moments_merge_equals_concatenation_for_any_split() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(loc=3.0, size=(50, 4, 3))
    whole = ref.Moments.of(x)
    acc = ref.Moments.empty(4)
    for part in np.split(x, [1, 7, 7, 30]):  # includes an empty piece
        acc = acc.merge(ref.Moments.of(part))
    assert acc.count == whole.count == 150
    np.testing.assert_allclose(acc.mean, whole.mean, rtol=1e-13)
    np.testing.assert_allclose(acc.var(), np.var(np.moveaxis(x, 1, 0).reshape(4, -1), axis=1, ddof=1), rtol=1e-12)


def test_moments_var_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="need more than 1"):
        ref.Moments.of(np.ones((1, 2))).var()
