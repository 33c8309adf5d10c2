"""Output memory pool of the CPU kernels: memory is reused only when no tensor can see it.

Run: PYTHONPATH=src python -m pytest -q tests/test_outpool.py
"""

from __future__ import annotations

import gc

import pytest
import torch

import batchnorm
from batchnorm._kernels import cpu, outpool


@pytest.fixture(autouse=True)
def small_pool(monkeypatch):
    """Pool outputs from 64 KiB up (small test tensors), on an empty pool; emptied afterwards."""
    monkeypatch.setattr(outpool, "MIN_BYTES", 1 << 16)
    monkeypatch.setattr(outpool, "_buffers", [])
    yield
    outpool.release()


def _x(fmt=torch.contiguous_format, dtype=torch.float32):
    return torch.randn(8, 16, 16, 16, dtype=dtype).contiguous(memory_format=fmt)  # 128 KiB float32


def test_memory_is_reused_only_after_every_user_is_gone():
    x = _x()
    y1, _, _ = cpu.train_forward(x, None, None, 1e-5)
    y2, _, _ = cpu.train_forward(x, None, None, 1e-5)
    assert y1.data_ptr() != y2.data_ptr()  # y1 alive: a new buffer
    p1 = y1.data_ptr()
    view = y1[1:3]
    del y1
    y3, _, _ = cpu.train_forward(x, None, None, 1e-5)
    assert y3.data_ptr() != p1  # a view still uses the memory
    arr = view.numpy()
    del view
    y4, _, _ = cpu.train_forward(x, None, None, 1e-5)
    assert y4.data_ptr() != p1  # a numpy array still uses it
    del arr
    gc.collect()
    y5, _, _ = cpu.train_forward(x, None, None, 1e-5)
    assert y5.data_ptr() == p1  # nobody: reused
    torch.testing.assert_close(y5, cpu.train_forward(x.clone(), None, None, 1e-5)[0], rtol=0, atol=0)


def test_tensor_saved_for_backward_is_never_overwritten():
    """y saved by autograd (y * y) and dropped by the user keeps its memory until backward."""
    x = _x().requires_grad_()
    y = batchnorm.batch_norm(x, None, None, None, None, training=True)
    loss = (y * y).sum()
    saved = y.detach().clone()
    ptr = y.data_ptr()
    del y
    others = [cpu.train_forward(_x() * 3, None, None, 1e-5)[0] for _ in range(3)]
    assert all(o.data_ptr() != ptr for o in others)
    loss.backward()
    # d/dx sum(y^2) through BN, with y the saved (untouched) output
    x2 = x.detach().clone().requires_grad_()
    y2 = torch.nn.functional.batch_norm(x2, None, None, training=True)
    torch.testing.assert_close(y2.detach(), saved, rtol=1e-5, atol=1e-5)
    (y2 * y2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [
        (torch.contiguous_format, torch.float32),
        (torch.channels_last, torch.float32),
        (torch.channels_last, torch.bfloat16),
    ],
)
def test_pooled_outputs_are_plain_tensors_in_place_ops_allowed(fmt, dtype):
    """Same shape, strides, dtype as x; not a view (so an in-place ReLU after BN works)."""
    x = _x(fmt, dtype).requires_grad_()
    y = batchnorm.batch_norm(x, None, None, None, None, training=True)
    assert y._base is None
    assert y.dtype == dtype
    assert y.stride() == x.stride()
    z = torch.relu_(y)
    z.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_idle_memory_is_bounded_and_released(monkeypatch):
    monkeypatch.setattr(outpool, "KEEP_BYTES", 3 * 128 * 1024)
    x = _x()
    ys = [cpu.train_forward(x, None, None, 1e-5)[0] for _ in range(6)]
    assert outpool.idle_bytes() == 0
    del ys
    gc.collect()
    y = cpu.train_forward(x, None, None, 1e-5)[0]  # trims the idle buffers to KEEP_BYTES
    assert outpool.idle_bytes() == 3 * 128 * 1024
    assert len(outpool._buffers) == 4  # y's and 3 idle
    del y
    outpool.release()
    assert outpool.idle_bytes() == 0


def test_default_threshold_pools_cache_resident_outputs(monkeypatch):
    """With the default MIN_BYTES (1 MiB) a 1.6 MB output comes from the pool, a 0.5 MB one
    does not; pooled y and dx equal the NumPy float64 reference while an earlier output lives."""
    monkeypatch.setattr(outpool, "MIN_BYTES", 1 << 20)
    from batchnorm import reference

    x = torch.randn(128, 64, 7, 7)  # 1.6 MB float32 (S = 49: the row kernels)
    g = torch.randn_like(x)
    y1, mean, var = cpu.train_forward(x, None, None, 1e-5)
    y1_copy = y1.clone()
    y2, _, _ = cpu.train_forward(x, None, None, 1e-5)
    assert len(outpool._buffers) == 2  # y1 alive: y2 got a second pool buffer
    dx, _, _ = cpu.backward(g, x, mean, torch.rsqrt(var.double() + 1e-5), None)
    ref_y = torch.from_numpy(reference.forward(x.double().numpy(), None, None, 1e-5)[0])
    torch.testing.assert_close(y2.double(), ref_y, rtol=0, atol=1e-5)
    torch.testing.assert_close(y1, y1_copy, rtol=0, atol=0)  # not overwritten
    ref_dx = torch.from_numpy(reference.backward(g.double().numpy(), x.double().numpy(), None, 1e-5)[0])
    torch.testing.assert_close(dx.double(), ref_dx, rtol=0, atol=1e-5)
    small = torch.randn(32, 64, 8, 8)  # 0.5 MB: below the threshold
    n_before = len(outpool._buffers)
    cpu.train_forward(small, None, None, 1e-5)
    assert len(outpool._buffers) == n_before


@pytest.mark.parametrize("nbytes_extra", [0, 4, 12, 100])
def test_pool_buffers_start_page_aligned(nbytes_extra):
    """numpy aligns large buffers to 16 bytes only; pool outputs start on a page (so every
    64-byte vector store stays within one cache line), reused buffers too."""
    x = torch.empty((1 << 20) + 128, dtype=torch.uint8)[: (1 << 20) + nbytes_extra]
    assert x.numel() >= outpool.MIN_BYTES
    outs = [outpool.empty_like(x, torch.uint8) for _ in range(3)]
    for out in outs:
        assert out.data_ptr() % outpool._ALIGN == 0
        assert out.numel() == x.numel()
        assert out.untyped_storage().nbytes() == x.numel()
    ptrs = {out.data_ptr() for out in outs}
    assert len(ptrs) == 3  # in use at the same time: three buffers
    del outs
    gc.collect()
    again = outpool.empty_like(x, torch.uint8)
    assert again.data_ptr() in ptrs and again.data_ptr() % outpool._ALIGN == 0
