"""Ghost batch norm against an independent loop-over-chunks definition and NumPy statistics.

Run: PYTHONPATH=src python -m pytest -q tests/test_ghost.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchnorm
from batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, ghost_batch_norm


def _loop_reference(x, chunks, w, b, eps):
    """The definition: torch's own batch norm applied to each chunk separately (a Python loop)."""
    outs = []
    start = 0
    for n in chunks:
        outs.append(F.batch_norm(x[start : start + n], None, None, w, b, training=True, eps=eps))
        start += n
    return torch.cat(outs)


def _np_pooled(x):
    """Whole-batch mean and unbiased variance per channel, NumPy float64."""
    xt = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    return xt.mean(1), xt.var(1, ddof=1)


@pytest.mark.parametrize(
    "cls, shape, v, chunks",
    [
        (GhostBatchNorm1d, (12, 3), 4, [4, 4, 4]),
        (GhostBatchNorm1d, (10, 3), 4, [4, 4, 2]),  # last ghost batch smaller
        (GhostBatchNorm1d, (9, 3), 4, [4, 5]),  # a last ghost batch of 1 value is merged
        (GhostBatchNorm1d, (7, 3, 5), 3, [3, 3, 1]),  # 1 sample but 5 values: kept
        (GhostBatchNorm2d, (11, 2, 3, 2), 5, [5, 5, 1]),
        (GhostBatchNorm3d, (5, 2, 2, 2, 3), 2, [2, 2, 1]),
        (GhostBatchNorm2d, (6, 2, 2, 2), 16, [6]),  # v >= N: plain BN
    ],
)
def test_forward_gradients_and_running_stats_match_definition(cls, shape, v, chunks):
    gen = torch.Generator().manual_seed(3)
    c = shape[1]
    drift = torch.arange(shape[0], dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1))  # (N, 1, ...)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + drift  # ghost means differ
    gy = torch.randn(shape, generator=gen, dtype=torch.float64)
    m = cls(c, v, eps=1e-3, momentum=0.25).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 2.0, generator=gen)
        m.bias.uniform_(-1.0, 1.0, generator=gen)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    y = m(xa)
    y.backward(gy)
    ref = _loop_reference(xb, chunks, w, b, 1e-3)
    ref.backward(gy)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(m.weight.grad, w.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.bias.grad, b.grad, rtol=1e-10, atol=1e-10)
    # ONE running update per step, with the whole batch's mean and unbiased (pooled) variance
    mean, var = _np_pooled(x.numpy())
    np.testing.assert_allclose(m.running_mean.numpy(), 0.25 * mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m.running_var.numpy(), 0.75 + 0.25 * var, rtol=1e-12)
    assert int(m.num_batches_tracked) == 1


def test_running_stats_do_not_depend_on_virtual_batch_size_and_equal_torch_bn():
    # non-i.i.d. batch: the ghost means differ a lot, so the mean of ghost variances would be wrong
    x = torch.randn(24, 4) + torch.repeat_interleave(torch.arange(6.0) * 10, 4)[:, None]
    ref = torch.nn.BatchNorm1d(4)
    ref(x)
    for v in (2, 4, 5, 24):
        m = GhostBatchNorm1d(4, v)
        m(x)
        torch.testing.assert_close(m.running_mean, ref.running_mean)
        torch.testing.assert_close(m.running_var, ref.running_var)
    mean_of_ghost_vars = torch.stack([x[i : i + 4].var(0) for i in range(0, 24, 4)]).mean(0)
    assert (ref.running_var - (0.9 + 0.1 * mean_of_ghost_vars)).abs().min() > 1.0


def test_eval_is_plain_batchnorm_and_state_dict_matches_torch():
    m = GhostBatchNorm2d(3, 2)
    for _ in range(3):
        m(torch.randn(7, 3, 2, 2) * 2 + 1)
    ref = torch.nn.BatchNorm2d(3)
    ref.load_state_dict(m.state_dict())
    assert list(m.state_dict()) == list(ref.state_dict())
    m.eval()
    ref.eval()
    x = torch.randn(5, 3, 2, 2)
    torch.testing.assert_close(m(x), ref(x))
    # no running statistics: eval normalizes with the whole eval batch (no ghost batches)
    free = GhostBatchNorm1d(3, 2, track_running_stats=False).eval()
    x = torch.randn(8, 3)
    torch.testing.assert_close(free(x), F.batch_norm(x, None, None, training=True))


def test_functional_gradcheck_float64():
    x = torch.randn(7, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ghost_batch_norm(x, 3, None, None, w, b), (x, w, b))


def test_momentum_none_counts_steps_not_ghost_batches():
    m = GhostBatchNorm1d(2, 2, momentum=None)
    xs = [torch.randn(8, 2) + i for i in range(3)]
    for x in xs:
        m(x)
    assert int(m.num_batches_tracked) == 3
    torch.testing.assert_close(m.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))


def test_channels_last_and_half_precision():
    x = torch.randn(6, 3, 4, 4).to(memory_format=torch.channels_last)
    m = GhostBatchNorm2d(3, 4)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, _loop_reference(x, [4, 2], m.weight, m.bias, m.eps))
    yh = GhostBatchNorm2d(3, 4)(x.to(torch.bfloat16))
    assert yh.dtype == torch.bfloat16
    torch.testing.assert_close(yh.float(), y, rtol=0.02, atol=0.05)


def test_large_mean_small_spread_float32():
    x32 = (1e4 + 1e-2 * torch.randn(32, 2, dtype=torch.float64)).float()
    x64 = x32.double()  # the same float32 values, in float64 for the reference
    m = GhostBatchNorm1d(2, 8)
    y = m(x32)
    ref = _loop_reference(x64, [8, 8, 8, 8], None, None, m.eps)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5)  # measured 1.4e-7
    torch.testing.assert_close(m.running_var.double(), 0.9 + 0.1 * x64.var(0), rtol=1e-6, atol=1e-8)


def test_nonfinite_and_empty_batches_change_nothing():
    m = GhostBatchNorm1d(2, 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="not finite"):
        m(torch.tensor([[float("inf"), 1.0], [2.0, 3.0], [1.0, 1.0]]))
    assert m(torch.empty(0, 2)).shape == (0, 2)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="virtual_batch_size to be a positive int"):
        GhostBatchNorm1d(3, 0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        GhostBatchNorm1d(3, 4)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="4D"):
        GhostBatchNorm2d(3, 4)(torch.randn(4, 3))
    # ghost batches of one value per channel: refused, not a silent constant output
    with pytest.raises(ValueError, match=r"each ghost batch.*virtual_batch_size=1.*\(4, 3\)"):
        GhostBatchNorm1d(3, 1)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="each ghost batch"):
        ghost_batch_norm(torch.randn(4, 3), 1)
    y = GhostBatchNorm1d(3, 1)(torch.randn(4, 3, 2))  # one sample of 2 values: fine
    torch.testing.assert_close(y.abs(), torch.ones_like(y), rtol=0, atol=1e-3)


def test_one_vectorized_pass_op_count_does_not_grow_with_ghost_batches():
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    # 2 vs 16 ghost batches, then 2 vs 16 ghost batches plus a smaller last one
    for n in (8, 64, 11, 67):
        x = torch.randn(n, 3, 2, requires_grad=True)
        m = GhostBatchNorm1d(3, 4)
        with Count() as c:
            m(x).sum().backward()
        counts.append(c.n)
    assert counts[0] == counts[1] and counts[2] == counts[3], counts


@pytest.mark.parametrize("backend", ["auto", "torch", "numba", "native"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_backend_matches_definition(channels_last, backend):
    """Ghost batches run on the kernels of the chosen back-end (folded into k*C channels): every
    back-end gives the definition's output, gradients and pooled running statistics, in both
    memory formats, with 5 ghost batches of 4 and a tail of 3."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(23, 3, 2, 3, generator=gen, dtype=torch.float64) * 2 + 1  # 5 ghost batches of 4, tail of 3
    x = x + torch.arange(23, dtype=torch.float64).reshape(-1, 1, 1, 1) / 4  # ghost means differ
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    weight = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    m = GhostBatchNorm2d(3, 4, momentum=1.0).double()
    with torch.no_grad():
        m.weight.copy_(weight)
    xa = x.clone().requires_grad_()
    with batchnorm.use_backend(backend):
        y = m(xa)
        y.backward(gy)
    w = m.weight.detach().clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ref = _loop_reference(xb, [4, 4, 4, 4, 4, 3], w, None, m.eps)
    ref.backward(gy)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(m.weight.grad, w.grad, rtol=1e-10, atol=1e-10)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    mean, var = _np_pooled(x.numpy())
    np.testing.assert_allclose(m.running_mean.numpy(), mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m.running_var.numpy(), var, rtol=1e-12)


def test_outlier_shift_and_large_mean_float32():
    """Data far from zero (mean 1e4, std 1e-2) with each ghost batch's first samples 5 sigma
    away: float32 statistics still match float64 ones (the kernels centre before squaring)."""
    gen = torch.Generator().manual_seed(7)
    x64 = 1e4 + 1e-2 * torch.randn(64, 3, generator=gen, dtype=torch.float64)
    x64.view(8, 8, 3)[:, :4] += 5e-2  # the first 4 samples of every ghost batch of 8: +5 sigma
    x32 = x64.float()
    x64 = x32.double()  # the same float32 values
    m = GhostBatchNorm1d(3, 8, momentum=1.0)
    y = m(x32)
    ref = _loop_reference(x64, [8] * 8, None, None, m.eps)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-5)
    # the exact mean, rounded to float32 once
    torch.testing.assert_close(m.running_mean, x64.mean(0).float(), rtol=0, atol=0)
    torch.testing.assert_close(m.running_var.double(), x64.var(0), rtol=2e-5, atol=0)


def test_double_backward_float64():
    x = torch.randn(10, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: ghost_batch_norm(x, 4, None, None, w, b), (x, w, b))


def test_large_input_parallel_kernels_match_torch_backend():
    """A folded batch large enough for the parallel CPU kernels gives the torch back-end's numbers."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 600, generator=gen) * 3 + 2  # 8 ghost batches of 64: (64, 4800) folded
    g = torch.randn(x.shape, generator=gen)
    outs = []
    for backend in ("auto", "torch"):
        xa = x.clone().requires_grad_()
        m = GhostBatchNorm1d(600, 64)
        with batchnorm.use_backend(backend):
            y = m(xa)
            y.backward(g)
        outs.append((y.detach(), xa.grad, m.weight.grad, m.running_mean, m.running_var))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
