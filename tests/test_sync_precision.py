"""The synchronized path keeps the numerical stability policy (mean 1e4, std 1e-2 in float32).

Runs ``sync_batch_norm`` (the code path that communicates) in this process on a gloo group of
one rank, against float64 batch norm written out here, and against our non-synchronized
float32 layer, which meets the same bar.

Run: PYTHONPATH=src python -m pytest -q tests/test_sync_precision.py
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import batchnorm
from batchnorm._kernels import dispatch

# the synchronized path runs the back-end's kernels (numba on CPU, torch ops elsewhere): both
_NO_NUMBA = pytest.mark.skipif(dispatch._numba() is None, reason="no numba")
BACKENDS = ["torch", pytest.param("numba", marks=_NO_NUMBA), pytest.param("auto", marks=_NO_NUMBA)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with dispatch.use_backend(request.param):
        yield request.param


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _reference(x64: torch.Tensor, eps: float) -> torch.Tensor:
    dims = [0, *range(2, x64.dim())]
    mean = x64.mean(dims, keepdim=True)
    var = x64.var(dims, unbiased=False, keepdim=True)
    return (x64 - mean) / torch.sqrt(var + eps)


def test_sync_path_large_mean_small_spread_float32(one_rank_group, backend):
    x = (1e4 + 1e-2 * torch.randn(64, 3, 8)).float()
    x64 = x.double().requires_grad_()
    want = _reference(x64, 1e-5)
    g = torch.randn_like(x)
    (want_dx,) = torch.autograd.grad((want * g.double()).sum(), x64)

    xs = x.clone().requires_grad_()
    y = batchnorm.sync_batch_norm(xs, None, None, eps=1e-5)
    (y * g).sum().backward()
    xp = x.clone().requires_grad_()
    y_plain = batchnorm.batch_norm(xp, None, None, training=True, eps=1e-5)
    (y_plain * g).sum().backward()

    # the non-synchronized layer reaches ~1e-6; before the fix the sync path was off by 3e-2
    # in the output (the global mean was rounded to float32: ulp 1e-3 at 1e4, 10% of the std)
    assert (y_plain.double() - want).abs().max() < 1e-5
    assert (y.double() - want).abs().max() < 1e-5
    scale = want_dx.abs().max()
    assert (xp.grad.double() - want_dx).abs().max() / scale < 1e-5
    assert (xs.grad.double() - want_dx).abs().max() / scale < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_sync_path_matches_float64_batchnorm(one_rank_group, backend, channels_last):
    x64 = (torch.randn(5, 4, 3, 2, dtype=torch.float64) * 3 + 2).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64).requires_grad_()
    rm = torch.zeros(4, dtype=torch.float64)
    rv = torch.ones(4, dtype=torch.float64)
    x_in = x64.detach().to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x_in.requires_grad_()
    y = batchnorm.sync_batch_norm(x_in, rm, rv, w, b, momentum=0.25, eps=1e-3)
    want = _reference(x64, 1e-3) * w[None, :, None, None] + b[None, :, None, None]
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * g).sum(), (x64, w, b))
    got_grads = torch.autograd.grad((y * g).sum(), (x_in, w, b))
    for got, exp in zip(got_grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)
    dims = (0, 2, 3)
    torch.testing.assert_close(rm, 0.25 * x64.detach().mean(dims), rtol=0, atol=1e-12)
    torch.testing.assert_close(rv, 0.75 + 0.25 * x64.detach().var(dims, unbiased=True), rtol=0, atol=1e-12)


def test_sync_bias_gradient_keeps_the_bias_dtype_without_weight(one_rank_group):
    x = torch.randn(32, 2, 64, 64).half()
    b = torch.zeros(2, requires_grad=True)
    batchnorm.sync_batch_norm(x.requires_grad_(), None, None, None, b).float().sum().backward()
    torch.testing.assert_close(b.grad, torch.full((2,), 32.0 * 64 * 64), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_sync_path_nonfinite_input_warns_once_and_keeps_running_stats(one_rank_group, bad):
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    x[1, 1, 2] = bad
    rm = torch.zeros(3, dtype=torch.float64)
    rv = torch.ones(3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = batchnorm.sync_batch_norm(x, rm, rv)
    # only our own warning: the float64 merge must not leak NumPy's "invalid value" warnings
    assert [str(w.message).split(":")[0] for w in caught] == ["sync_batch_norm"]
    assert "not finite" in str(caught[0].message)
    assert torch.equal(rm, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(rv, torch.ones(3, dtype=torch.float64))
    assert torch.isnan(y[:, 1]).all()
    assert torch.isfinite(y[:, [0, 2]]).all()
