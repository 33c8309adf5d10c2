"""Property-based tests (hypothesis): random shapes, scales and offsets."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm import batch_norm
from batchnorm import reference as ref

shapes = st.tuples(
    st.integers(2, 6),  # N
    st.integers(1, 4),  # C
    st.lists(st.integers(1, 4), min_size=0, max_size=3),  # spatial
).map(lambda t: (t[0], t[1], *t[2]))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, scale=st.floats(1e-3, 1e3), offset=st.floats(-1e3, 1e3), seed=st.integers(0, 2**16))
def test_forward_backward_equal_reference(shape: tuple[int, ...], scale: float, offset: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * scale + offset
    g = rng.normal(size=shape)
    w = rng.uniform(0.5, 2.0, size=shape[1])
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    y = batch_norm(xt, None, None, wt, None, training=True, eps=1e-5)
    dx, dw = torch.autograd.grad(y, (xt, wt), torch.tensor(g))
    y_ref, _, _ = ref.forward(x, w, None, eps=1e-5)
    dx_ref, dw_ref, _ = ref.backward(g, x, w, eps=1e-5)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(dx.numpy(), dx_ref, rtol=1e-6, atol=1e-6 * np.abs(dx_ref).max() + 1e-12)
    np.testing.assert_allclose(dw.numpy(), dw_ref, rtol=1e-6, atol=1e-8)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, a=st.floats(0.1, 10.0), b=st.floats(-100, 100), seed=st.integers(0, 2**16))
def test_output_invariant_to_positive_affine_input_change(
    shape: tuple[int, ...], a: float, b: float, seed: int
) -> None:
    """BN(a*x + b; eps*a^2) == BN(x; eps) for a > 0, exactly in exact arithmetic: why a bias
    before BN is redundant (eps scales with the variance, so it is scaled too)."""
    x = torch.tensor(np.random.default_rng(seed).normal(size=shape) * 3)
    eps = 1e-5
    y1 = batch_norm(x, None, None, training=True, eps=eps)
    y2 = batch_norm(a * x + b, None, None, training=True, eps=eps * a * a)
    torch.testing.assert_close(y1, y2, rtol=1e-7, atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), momentum=st.floats(0.0, 1.0))
def test_running_stats_equal_reference(shape: tuple[int, ...], seed: int, momentum: float) -> None:
    rng = np.random.default_rng(seed)
    rm0, rv0 = rng.normal(size=shape[1]), rng.uniform(0.1, 3, size=shape[1])
    rm, rv = torch.tensor(rm0), torch.tensor(rv0)
    x = rng.normal(size=shape) * 2 + 1
    batch_norm(torch.tensor(x), rm, rv, training=True, momentum=momentum)
    rm_ref, rv_ref = ref.running_update(rm0, rv0, x, momentum)
    np.testing.assert_allclose(rm.numpy(), rm_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv.numpy(), rv_ref, rtol=1e-12, atol=1e-14)
    assert (rv.numpy() >= 0).all()
