"""Batch renorm against the paper's Algorithm 1 written here in NumPy float64, and against BN.

Run: PYTHONPATH=src python -m pytest -q tests/test_renorm.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, batch_renorm, renorm_limits


def _np_renorm(x, w, b, mu, sigma, eps, r_max, d_max, gy):
    """Ioffe 2017 Alg. 1 forward and its backward (paper's gradient formulas), float64.

    x, gy: (N, C, *); w, b, mu, sigma: (C,). Returns y, dx, dw, db, mu_B, sigma_B.
    """
    c = x.shape[1]
    xt = np.moveaxis(x, 1, 0).reshape(c, -1)  # (C, m)
    gt = np.moveaxis(gy, 1, 0).reshape(c, -1)  # (C, m)
    m = xt.shape[1]
    mu_b = xt.mean(1)
    sig_b = np.sqrt(((xt - mu_b[:, None]) ** 2).mean(1) + eps)
    r = np.clip(sig_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
    xh = (xt - mu_b[:, None]) / sig_b[:, None] * r[:, None] + d[:, None]
    y = w[:, None] * xh + b[:, None]
    gxh = gt * w[:, None]
    g_sig = (gxh * (xt - mu_b[:, None]) * (-r / sig_b**2)[:, None]).sum(1)
    g_mu = (gxh * (-r / sig_b)[:, None]).sum(1)
    dx = gxh * (r / sig_b)[:, None] + g_sig[:, None] * (xt - mu_b[:, None]) / (m * sig_b[:, None]) + g_mu[:, None] / m
    dw = (gt * xh).sum(1)
    db = gt.sum(1)

    def back(t):
        return np.moveaxis(t.reshape(c, x.shape[0], *x.shape[2:]), 0, 1)

    return back(y), back(dx), dw, db, mu_b, sig_b


def test_schedule_matches_paper_piecewise_linear():
    for t in [0, 1, 4999, 5000, 5001, 12000, 22500, 25000, 30000, 39999, 40000, 10**6]:
        r, d = renorm_limits(t)
        assert r == pytest.approx(np.interp(t, [5000, 40000], [1.0, 3.0]), abs=1e-12)
        assert d == pytest.approx(np.interp(t, [5000, 25000], [0.0, 5.0]), abs=1e-12)
    # scaled schedule for a short run, and a zero-length ramp jumps at once
    assert renorm_limits(50, 3, 5, 10, 90, 50) == pytest.approx((1 + 2 * 40 / 80, 5.0))
    assert renorm_limits(11, 2, 1, 10, 10, 10) == (2.0, 1.0)
    assert renorm_limits(10, 2, 1, 10, 10, 10) == (1.0, 0.0)


@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 4), (4, 3, 2, 3), (3, 3, 2, 2, 2)])
def test_forward_backward_match_algorithm1_with_clipping(shape):
    gen = torch.Generator().manual_seed(1)
    c = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_()
    # running stats chosen so that r and d clip on some channels and not on others
    mu = torch.tensor([0.5, 3.0, -2.0], dtype=torch.float64)
    sigma = torch.tensor([2.0, 0.5, 10.0], dtype=torch.float64)
    rm, rs = mu.clone(), sigma.clone()
    gy = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps, r_max, d_max = 1e-3, 1.5, 0.7
    y = batch_renorm(x, rm, rs, w, b, training=True, momentum=0.2, eps=eps, r_max=r_max, d_max=d_max)
    y.backward(gy)
    ry, rdx, rdw, rdb, mu_b, sig_b = _np_renorm(
        x.detach().numpy(),
        w.detach().numpy(),
        b.detach().numpy(),
        mu.numpy(),
        sigma.numpy(),
        eps,
        r_max,
        d_max,
        gy.numpy(),
    )
    r_raw = sig_b / sigma.numpy()
    d_raw = (mu_b - mu.numpy()) / sigma.numpy()
    assert (r_raw > r_max).any() or (r_raw < 1 / r_max).any()  # clipping is exercised
    assert (np.abs(d_raw) > d_max).any()
    torch.testing.assert_close(y, torch.from_numpy(ry), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, torch.from_numpy(rdx), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(w.grad, torch.from_numpy(rdw), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b.grad, torch.from_numpy(rdb), rtol=1e-10, atol=1e-10)
    # moving mean and moving *std* (of the biased variance + eps), PyTorch momentum convention
    torch.testing.assert_close(rm, torch.from_numpy(0.8 * mu.numpy() + 0.2 * mu_b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rs, torch.from_numpy(0.8 * sigma.numpy() + 0.2 * sig_b), rtol=1e-12, atol=1e-12)


def test_equals_batchnorm_during_warmup_then_departs():
    torch.manual_seed(2)
    ours = BatchRenorm2d(3, momentum=0.1, warmup_steps=3, r_max_steps=4, d_max_steps=4).double()
    ref = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    sig = np.ones(3)
    for step in range(6):
        x = torch.randn(4, 3, 3, 3, dtype=torch.float64) * (1 + step) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        gy = torch.randn_like(x)
        ya, yb = ours(xa), ref(xb)
        ya.backward(gy)
        yb.backward(gy)
        same = torch.allclose(ya, yb, rtol=1e-10, atol=1e-10)
        if step <= 3:  # r_max_t = 1, d_max_t = 0: exactly BN
            assert ours.limits(step) == (1.0, 0.0)
            assert same
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-10)
        else:  # the batches drift away from the moving statistics: r and d now matter
            assert not same
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        sig = 0.9 * sig + 0.1 * np.sqrt(x.numpy().transpose(1, 0, 2, 3).reshape(3, -1).var(1) + ours.eps)
        np.testing.assert_allclose(ours.running_std.numpy(), sig, rtol=1e-12)
        for m in (ours, ref, xa, xb):
            m.grad = None
        ours.zero_grad()
        ref.zero_grad()
    assert int(ours.num_batches_tracked) == 6


def test_eval_is_affine_map_with_moving_std_and_running_var_property():
    m = BatchRenorm1d(3, eps=1e-2)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        m.running_std.copy_(torch.tensor([2.0, 0.5, 1.5]))
        m.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        m.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    m.eval()
    x = torch.randn(7, 3)
    w, b = m.weight.detach().numpy(), m.bias.detach().numpy()
    want = (x.numpy() - m.running_mean.numpy()) / m.running_std.numpy() * w + b
    y = m(x)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    # running_var is derived so that torch's BN eval formula gives the same map
    torch.testing.assert_close(
        torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps), y
    )
    assert "running_var" not in m.state_dict()
    assert int(m.num_batches_tracked) == 0  # eval does not advance the schedule


def test_step_counter_in_state_dict_carries_schedule():
    a = BatchRenorm1d(2, warmup_steps=1, r_max_steps=5, d_max_steps=3)
    for _ in range(3):
        a(torch.randn(8, 2))
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_std", "num_batches_tracked"}
    b = BatchRenorm1d(2, warmup_steps=1, r_max_steps=5, d_max_steps=3)
    b.load_state_dict(sd)
    assert int(b.num_batches_tracked) == 3
    assert b.limits() == a.limits() == pytest.approx((1 + 2 * 2 / 4, 5 * 2 / 2))
    b.reset_running_stats()
    assert b.limits() == (1.0, 0.0)


def test_nonfinite_and_empty_batches_change_nothing():
    m = BatchRenorm1d(2)
    m(torch.randn(4, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="not finite"):
        m(torch.tensor([[float("nan"), 1.0], [2.0, 3.0]]))
    y = m(torch.empty(0, 2))
    assert y.shape == (0, 2)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_momentum_none_is_cumulative_average():
    m = BatchRenorm1d(2, momentum=None, eps=1e-5)
    xs = [torch.randn(6, 2, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    m.double()
    for x in xs:
        m(x)
    mus = np.stack([x.numpy().mean(0) for x in xs])
    sig = np.stack([np.sqrt(x.numpy().var(0) + 1e-5) for x in xs])
    np.testing.assert_allclose(m.running_mean.numpy(), mus.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.running_std.numpy(), sig.mean(0), rtol=1e-12)


def test_from_batchnorm_keeps_inference():
    bn = torch.nn.BatchNorm2d(3)
    for _ in range(3):
        bn(torch.randn(4, 3, 2, 2) * 3 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    rn = BatchRenorm2d.from_batchnorm(bn, warmup_steps=0, r_max_steps=10, d_max_steps=10)
    x = torch.randn(5, 3, 2, 2)
    torch.testing.assert_close(rn(x), bn(x), rtol=1e-5, atol=1e-5)
    assert rn.momentum == 0.01 and not rn.training


def test_large_mean_small_spread_float32():
    m = BatchRenorm1d(1)
    x = (1e4 + 1e-2 * torch.randn(64, 1, dtype=torch.float64)).float().double()  # float32 values
    m(x.float())
    sig_b = np.sqrt(x.numpy().var() + 1e-5)
    # the 0.99 * 1 part dominates running_std: compare the batch's contribution on its own
    # (float32 running_std: half an ulp at 1.0 is 3e-4 of sig_b after this subtraction)
    np.testing.assert_allclose((m.running_std.item() - 0.99) / 0.01, sig_b, rtol=1e-3)
    # after the warm-up, with r and d active, the output keeps the spread's digits
    m = BatchRenorm1d(1, warmup_steps=0, r_max_steps=1, d_max_steps=1)
    with torch.no_grad():
        m.running_mean.fill_(1e4)
        m.running_std.fill_(0.02)
        m.num_batches_tracked.fill_(3)
    y = m(x.float()).double()
    mu, sig = x.mean(0), torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    r = (sig / 0.02).clamp(1 / 3, 3)
    d = ((mu - 1e4) / 0.02).clamp(-5, 5)
    torch.testing.assert_close(y, (x - mu) / sig * r + d, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r_max": 0.5}, "r_max >= 1"),
        ({"d_max": -1.0}, "d_max >= 0"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 10, "r_max_steps": 5}, "r_max_steps and d_max_steps >= warmup_steps"),
        ({"momentum": 1.5}, "momentum in"),
        ({"eps": 0.0}, "eps must be positive"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchRenorm1d(3, **kwargs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="4D"):
        BatchRenorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        BatchRenorm3d(3)(torch.randn(2, 4, 1, 1, 2))
