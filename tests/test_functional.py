"""batchnorm.functional.batch_norm against the NumPy float64 reference and torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchnorm
from batchnorm import batch_norm
from batchnorm import reference as ref

SHAPES = [(7, 3), (5, 3, 4), (4, 3, 5, 6), (3, 3, 2, 4, 5)]


def _data(shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    w = torch.rand(c, dtype=torch.float64) + 0.5
    b = torch.randn(c, dtype=torch.float64)
    return x.to(dtype), w, b


@pytest.mark.parametrize("shape", SHAPES)
def test_training_forward_backward_match_reference(shape: tuple[int, ...]) -> None:
    x, w, b = _data(shape)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    rm = torch.zeros(shape[1], dtype=torch.float64)
    rv = torch.ones(shape[1], dtype=torch.float64)
    y = batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-5)
    g = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), g)

    y_ref, _, _ = ref.forward(x.detach().numpy(), w.detach().numpy(), b.detach().numpy(), eps=1e-5)
    dx_ref, dw_ref, db_ref = ref.backward(g.numpy(), x.detach().numpy(), w.detach().numpy(), eps=1e-5)
    rm_ref, rv_ref = ref.running_update(np.zeros(shape[1]), np.ones(shape[1]), x.detach().numpy(), 0.3)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx.numpy(), dx_ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dw.numpy(), dw_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db.numpy(), db_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rm.numpy(), rm_ref, rtol=1e-12)
    np.testing.assert_allclose(rv.numpy(), rv_ref, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_forward_matches_reference(shape: tuple[int, ...]) -> None:
    x, w, b = _data(shape)
    rm = torch.randn(shape[1], dtype=torch.float64)
    rv = torch.rand(shape[1], dtype=torch.float64) + 0.1
    y = batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)
    y_ref = ref.eval_forward(x.numpy(), rm.numpy(), rv.numpy(), w.numpy(), b.numpy(), eps=1e-3)
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 3), (4, 2, 3), (3, 2, 3, 2), (2, 2, 2, 2, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(shape: tuple[int, ...], affine: bool) -> None:
    x, w, b = _data(shape)
    inputs = [x.requires_grad_(True)]
    if affine:
        inputs += [w.requires_grad_(True), b.requires_grad_(True)]

    def fn(*args: torch.Tensor) -> torch.Tensor:
        ww, bb = (args[1], args[2]) if affine else (None, None)
        return batch_norm(args[0], None, None, ww, bb, training=True, eps=1e-3)

    assert torch.autograd.gradcheck(fn, tuple(inputs))
    assert torch.autograd.gradgradcheck(fn, tuple(inputs))


def test_eval_gradcheck() -> None:
    x, w, b = _data((5, 3, 4))
    rm = torch.randn(3, dtype=torch.float64)
    rv = torch.rand(3, dtype=torch.float64) + 0.5

    def fn(xx: torch.Tensor, ww: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
        return batch_norm(xx, rm, rv, ww, bb, training=False)

    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_gradient_penalty_matches_torch() -> None:
    """create_graph=True through the backward: d/dw of ||dL/dx||^2 equals torch's."""
    x, w, b = _data((8, 3, 4))
    grads = []
    for impl in (batch_norm, F.batch_norm):
        xx = x.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        y = impl(xx, None, None, ww, b, training=True)
        (gx,) = torch.autograd.grad((y.sin()).sum(), xx, create_graph=True)
        (gw,) = torch.autograd.grad(gx.square().sum(), ww)
        grads.append(gw)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_match_torch(dtype: torch.dtype) -> None:
    x64, w, b = _data((16, 4, 5, 5))
    x = x64.to(dtype)
    w32, b32 = w.float(), b.float()
    rm_a, rv_a = torch.zeros(4), torch.ones(4)
    rm_b, rv_b = torch.zeros(4), torch.ones(4)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya = batch_norm(xa, rm_a, rv_a, w32, b32, training=True)
    yb = F.batch_norm(xb, rm_b, rv_b, w32, b32, training=True)
    assert ya.dtype == dtype
    g = torch.randn_like(ya)
    (ga,) = torch.autograd.grad(ya, xa, g)
    (gb,) = torch.autograd.grad(yb, xb, g)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(ya.float(), yb.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(ga.float(), gb.float(), rtol=tol, atol=tol * 4)
    torch.testing.assert_close(rm_a, rm_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv_a, rv_b, rtol=1e-4, atol=1e-5)
    # statistics are accumulated in float32: compare with the float64 reference of the same values
    _, mu_ref, var_ref = ref.forward(x.double().numpy())
    np.testing.assert_allclose(rm_a.numpy(), 0.1 * mu_ref, rtol=1e-5, atol=1e-7)


def test_bias_gradient_keeps_the_bias_dtype_without_weight() -> None:
    """weight=None, float32 bias, float16 input: dbias = sum g is returned in the bias's dtype.

    It used to be cast to the input's float16, where the sum of 131072 ones overflows to inf.
    """
    x = torch.randn(32, 2, 64, 64).half()
    b = torch.zeros(2, requires_grad=True)
    batch_norm(x, None, None, None, b, training=True).float().sum().backward()
    torch.testing.assert_close(b.grad, torch.full((2,), 32.0 * 64 * 64), rtol=0, atol=0)


def test_large_mean_small_spread_does_not_cancel() -> None:
    """mean 1e4, std 1e-2 in float32: the variance must match float64 statistics of the same values."""
    x = (1e4 + 1e-2 * torch.randn(64, 3, 8, 8)).float()
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, rm, rv, training=True, momentum=1.0)
    _, mu_ref, var_ref = ref.forward(x.double().numpy())
    m = 64 * 8 * 8
    np.testing.assert_allclose(rv.double().numpy(), var_ref * m / (m - 1), rtol=1e-4)
    np.testing.assert_allclose(rm.double().numpy(), mu_ref, rtol=1e-7)
    y_ref, _, _ = ref.forward(x.double().numpy())
    np.testing.assert_allclose(y.double().numpy(), y_ref, rtol=0, atol=2e-5)  # measured ~1.3e-6
    # eps=1e-5 is 10% of var=1e-4 here, so the output std is sqrt(var / (var + eps)), not 1
    np.testing.assert_allclose(y.double().std(dim=(0, 2, 3)).numpy(), np.sqrt(var_ref / (var_ref + 1e-5)), rtol=1e-3)


@pytest.mark.parametrize("fmt,shape", [(torch.channels_last, (4, 3, 5, 6)), (torch.channels_last_3d, (2, 3, 2, 4, 5))])
def test_channels_last_in_channels_last_out(fmt: torch.memory_format, shape: tuple[int, ...]) -> None:
    x, w, b = _data(shape)
    xc = x.contiguous(memory_format=fmt).requires_grad_(True)
    y = batch_norm(xc, None, None, w, b, training=True)
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, xc, g)
    y_ref, _, _ = ref.forward(x.numpy(), w.numpy(), b.numpy())
    dx_ref, _, _ = ref.backward(g.numpy(), x.numpy(), w.numpy())
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx.numpy(), dx_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_our_backends_do_not_call_torch_batch_norm(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """The numba and torch back-ends compute everything themselves (the default back-end runs
    aten's kernels for small CPU tensors on purpose: see test_aten_direct_*)."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch's batch norm was called")

    monkeypatch.setattr(torch.nn.functional, "batch_norm", boom)
    monkeypatch.setattr(torch, "batch_norm", boom)
    monkeypatch.setattr(torch, "native_batch_norm", boom)
    x = torch.randn(6, 3, 4, requires_grad=True)
    with batchnorm.use_backend(backend):
        y = batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
        y.sum().backward()
        y_eval = batch_norm(x, torch.zeros(3), torch.ones(3), training=False)
    assert x.grad is not None
    torch.testing.assert_close(y_eval, x / (1 + 1e-5) ** 0.5)


def test_nonfinite_batch_leaves_running_stats_and_warns() -> None:
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    rm, rv = torch.full((3,), 0.5), torch.full((3,), 2.0)
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = batch_norm(x, rm, rv, training=True)
    assert torch.isnan(y[:, 1]).all()
    torch.testing.assert_close(rm, torch.full((3,), 0.5))
    torch.testing.assert_close(rv, torch.full((3,), 2.0))


def test_empty_batch_changes_nothing() -> None:
    x = torch.randn(0, 3, 4, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    rm, rv = torch.full((3,), 0.5), torch.full((3,), 2.0)
    y = batch_norm(x, rm, rv, w, None, training=True)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    torch.testing.assert_close(w.grad, torch.zeros(3))
    torch.testing.assert_close(rm, torch.full((3,), 0.5))
    torch.testing.assert_close(rv, torch.full((3,), 2.0))


def test_non_contiguous_input() -> None:
    base = torch.randn(8, 6, 5, dtype=torch.float64)
    x = base[::2, ::2]  # (4, 3, 5), strided view
    assert not x.is_contiguous()
    y = batch_norm(x, None, None, training=True)
    y_ref, _, _ = ref.forward(x.numpy())
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-12, atol=1e-12)
