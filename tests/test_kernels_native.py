"""The "native" back-end (torch's aten batch-norm kernels) against NumPy float64.

Run: .venv/bin/python -m pytest -q tests/test_kernels_native.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import reference
from batchnorm._kernels import dispatch, native, torch_ops

# max |error| relative to the largest reference magnitude, per input dtype
TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CL = torch.channels_last
CASES = [  # (shape, memory format): odd C, N = 1 with spatial > 1, 2D, NCL, NCHW, CL, CL-3d
    ((13, 5), torch.contiguous_format),
    ((1, 3, 17), torch.contiguous_format),
    ((3, 5, 7, 9), torch.contiguous_format),
    ((3, 5, 7, 9), CL),
    ((1, 7, 4, 5), CL),
    ((2, 3, 2, 3, 5), torch.channels_last_3d),
]
IDS = [f"{'x'.join(map(str, s))}-{str(f).split('.')[-1]}" for s, f in CASES]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def _data(shape, fmt, dtype, loc=0.5, scale=2.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale + loc).to(dtype).contiguous(memory_format=fmt)
    c = shape[1]
    w = torch.randn(c, dtype=torch.float64).to(dtype)
    b = torch.randn(c, dtype=torch.float64).to(dtype)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    return x, w, b, g


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _close(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype, what: str) -> None:
    want = np.asarray(want, dtype=np.float64)
    err = np.abs(_np(got) - want).max()
    bound = TOL[dtype] * max(1.0, np.abs(want).max())
    assert err <= bound, f"{what}: max |error| {err:.3g} > {bound:.3g}"


def _rel(got: torch.Tensor, want: np.ndarray) -> float:
    return float(np.max(np.abs(_np(got) - want) / np.abs(want)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_reference(case, dtype):
    shape, fmt = case
    x, w, b, g = _data(shape, fmt, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert native.supports(x)

    y, mean, var = native.train_forward(x, w, b, 1e-5)
    y_ref, mu_ref, var_ref = reference.forward(_np(x), _np(w), _np(b), 1e-5)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    assert mean.dtype == torch.float64 and var.dtype == acc
    _close(y, y_ref, dtype, "y")
    _close(mean, mu_ref, acc, "mean")
    _close(var, var_ref, acc, "var")

    dx, dw, db = native.backward(g, x, mean, torch.rsqrt(var + 1e-5), w)
    dx_ref, dw_ref, db_ref = reference.backward(_np(g), _np(x), _np(w), 1e-5)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=fmt)
    assert dw.dtype == acc and db.dtype == acc
    _close(dx, dx_ref, dtype, "dx")
    _close(dw, dw_ref, acc, "dweight")
    _close(db, db_ref, acc, "dbias")

    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64) + 0.5
    ye = native.eval_forward(x, rm, rv, w, b, 1e-5)
    assert ye.dtype == dtype and ye.is_contiguous(memory_format=fmt)
    _close(ye, reference.eval_forward(_np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-5), dtype, "eval y")

    mean2, var2 = native.batch_stats(x)
    assert mean2.dtype == torch.float64 and var2.dtype == acc
    _close(mean2, mu_ref, acc, "batch_stats mean")
    _close(var2, var_ref, acc, "batch_stats var")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_affine_and_other_centers(dtype):
    """weight/bias None; a backward around a mean and invstd that are not x's (as BN+activation
    passes them) is the formula with those values."""
    x, _, _, g = _data((4, 3, 5), torch.contiguous_format, dtype)
    y, mean, var = native.train_forward(x, None, None, 1e-3)
    _close(y, reference.forward(_np(x), None, None, 1e-3)[0], dtype, "y")
    center = torch.tensor([0.3, -1.0, 2.0], dtype=dtype)
    invstd = torch.tensor([0.5, -2.0, 1.5], dtype=dtype)
    weight = torch.tensor([1.5, 0.25, -1.0], dtype=dtype)
    dx, dw, db = native.backward(g, x, center, invstd, weight)
    want = torch_ops.backward(g.double(), x.double(), center.double(), invstd.double(), weight.double())
    for got, ref, what in zip((dx, dw, db), want, ("dx", "dweight", "dbias")):
        _close(got, _np(ref), dtype, what)


def test_one_value_per_channel_has_zero_variance():
    """m = 1 (N = 1, no spatial dims): var 0, y = bias (aten's unbiased update would be 0/0)."""
    x = torch.randn(1, 4)
    b = torch.randn(4)
    y, mean, var = native.train_forward(x, None, b, 1e-5)
    assert torch.equal(var, torch.zeros(4))
    torch.testing.assert_close(mean, x[0].double())
    torch.testing.assert_close(y, b[None], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Precision of the variance: read from the running-variance update, not from invstd


@pytest.mark.parametrize("spread", [1.0, 3e-3, 1e-5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variance_relative_error_at_every_scale(spread, dtype):
    """var >> eps, var ~ eps and var << eps (eps = 1e-5, var = spread^2 in 1..1e-10): the biased
    variance is within 8 units of rounding of the float64 reference, relatively, in every case.
    Recovering it from invstd (1 / invstd^2 - eps) loses eps / var times that, shown alongside."""
    eps = 1e-5
    x = (torch.randn(16, 4, 8, dtype=torch.float64) * spread).to(dtype)
    _, mean, var = native.train_forward(x, None, None, eps)
    var_ref = reference.moments(_np(x))[1]
    bound = 8 * UNIT[dtype]
    assert _rel(var, var_ref) <= bound
    if dtype == torch.float32 and spread == 1e-5:  # var 1e-10 << eps: invstd has lost it
        invstd = torch.rsqrt(torch.from_numpy(var_ref).float() + eps)  # correctly rounded
        recovered = 1.0 / invstd.double() ** 2 - eps
        assert _rel(recovered, var_ref) > 100 * bound


# ---------------------------------------------------------------------------------------------
# Ill-conditioned input: mean 1e4, std 1e-2 (kappa = |mean| / std = 1e6) in float32


def _large_mean(fmt):
    x = (torch.randn(8, 3, 6, 6, dtype=torch.float64) * 1e-2 + 1e4).float().contiguous(memory_format=fmt)
    w = torch.tensor([0.5, 1.0, 2.0])
    b = torch.tensor([0.0, 1.0, -1.0])
    g = torch.randn(8, 3, 6, 6).contiguous(memory_format=fmt)
    return x, w, b, g


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_large_mean_small_spread_is_exact_on_cpu(fmt):
    """CPU inputs with kappa > KAPPA_MAX run centred (torch_ops): statistics, output and
    gradients as precise as float32 allows at O(1) magnitudes."""
    x, w, b, g = _large_mean(fmt)
    y, mean, var = native.train_forward(x, w, b, 1e-8)
    y_ref, mu_ref, var_ref = reference.forward(_np(x), _np(w), _np(b), 1e-8)
    assert np.max(np.abs(_np(y) - y_ref)) < 1e-4
    assert y.is_contiguous(memory_format=fmt)
    np.testing.assert_allclose(_np(mean), mu_ref, rtol=1e-12)
    np.testing.assert_allclose(_np(var), var_ref, rtol=1e-5)
    dx, dw, db = native.backward(g, x, mean, torch.rsqrt(var + 1e-8), w)
    dx_ref, dw_ref, db_ref = reference.backward(_np(g), _np(x), _np(w), 1e-8)
    assert np.max(np.abs(_np(dx) - dx_ref)) / np.max(np.abs(dx_ref)) < 1e-4
    assert np.max(np.abs(_np(dw) - dw_ref)) / np.max(np.abs(dw_ref)) < 1e-4
    assert np.max(np.abs(_np(db) - db_ref)) < 1e-4
    ye = native.eval_forward(x, torch.from_numpy(mu_ref), torch.from_numpy(var_ref), w, b, 1e-8)
    assert np.max(np.abs(_np(ye) - y_ref)) < 1e-4
    m2, v2 = native.batch_stats(x)
    np.testing.assert_allclose(_np(m2), mu_ref, rtol=1e-12)
    np.testing.assert_allclose(_np(v2), var_ref, rtol=1e-5)


def test_kernels_alone_lose_kappa_times_rounding(monkeypatch):
    """Without the CPU check (as on CUDA, where nothing is read back) the aten kernels' error at
    kappa = 1e6 is far above float32 precision but within the documented kappa * u * |weight|
    (times a small constant): what the check exists for."""
    monkeypatch.setitem(native.KAPPA_MAX, torch.float32, float("inf"))
    x, w, b, _ = _large_mean(torch.contiguous_format)
    y, _, _ = native.train_forward(x, w, b, 1e-8)
    y_ref, mu_ref, var_ref = reference.forward(_np(x), _np(w), _np(b), 1e-8)
    kappa = np.max(np.abs(mu_ref) / np.sqrt(var_ref))
    err = np.max(np.abs(_np(y) - y_ref))
    assert 1e-4 < err < 4 * kappa * UNIT[torch.float32] * float(w.abs().max())


def test_moderate_kappa_stays_on_the_kernels_within_the_bound(monkeypatch):
    """kappa just below KAPPA_MAX (float32: 2^7) runs on the aten kernels (torch_ops is not
    called), with an output error within KAPPA_MAX * u = 2^-17 of |weight|."""
    calls = []
    monkeypatch.setattr(torch_ops, "train_forward", lambda *a: calls.append(a))
    monkeypatch.setattr(torch_ops, "backward", lambda *a: calls.append(a))
    kappa = 100.0
    x = (torch.randn(64, 3, 16, dtype=torch.float64) + kappa).float()
    w = torch.tensor([0.5, 1.0, 2.0])
    g = torch.randn(64, 3, 16)
    y, mean, var = native.train_forward(x, w, None, 1e-5)
    y_ref, mu_ref, var_ref = reference.forward(_np(x), _np(w), None, 1e-5)
    assert np.max(np.abs(mu_ref) / np.sqrt(var_ref)) < native.KAPPA_MAX[torch.float32]
    assert np.max(np.abs(_np(y) - y_ref)) <= 2.0**-17 * 2.0
    dx, dw, _ = native.backward(g, x, mean, torch.rsqrt(var + 1e-5), w)
    dx_ref, dw_ref, _ = reference.backward(_np(g), _np(x), _np(w), 1e-5)
    assert np.max(np.abs(_np(dx) - dx_ref)) <= 2.0**-17 * np.max(np.abs(dx_ref))
    assert np.max(np.abs(_np(dw) - dw_ref)) <= 2.0**-17 * np.max(np.abs(dw_ref))
    assert calls == []


def test_eval_folds_the_float64_mean_residual_into_the_bias():
    """(x - mean32) * s + bias' equals (x - mean64) * s + bias for a float64 mean whose float32
    rounding is off by far more than the spread (checked in float64)."""
    mean = torch.tensor([1e4 + 1.0 / 3.0, -2.5e3 + 1e-4, 7.0], dtype=torch.float64)
    var = torch.tensor([1e-4, 4e-6, 2.0], dtype=torch.float64)
    weight = torch.tensor([0.5, -2.0, 1.0])
    bias = torch.tensor([1.0, 0.0, -3.0])
    x = (mean[None] + torch.randn(5, 3, dtype=torch.float64) * var.sqrt()[None]).float().double()
    scale = weight.double() / torch.sqrt(var + 1e-5)
    want = (x - mean) * scale + bias.double()
    for w, b in ((weight, bias), (None, None)):
        folded = native.fold_mean_residual(mean, var, w, b, 1e-5, torch.float32)
        assert folded.dtype == torch.float32
        s = scale if w is not None else 1.0 / torch.sqrt(var + 1e-5)
        got = (x - mean.float().double()) * s + folded.double()
        ref = (x - mean) * s + (bias.double() if b is not None else 0.0)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)
        assert np.max(np.abs(((x - mean.float().double()) * s).numpy() - ((x - mean) * s).numpy())) > 1e-2
    del want


# ---------------------------------------------------------------------------------------------
# Dispatch and the layers under use_backend("native")


def test_use_backend_native_dispatch():
    x = torch.randn(4, 3, 5, 6)
    with batchnorm.use_backend("native"):
        assert dispatch.backend_for(x) is native
        assert dispatch.backend_for(x.to(memory_format=CL)) is native
        assert dispatch.backend_for(x.to(torch.bfloat16)) is native
        assert dispatch.backend_for(x[:, :, ::2]) is torch_ops  # strided: not supported
        assert dispatch.backend_for(x.to(torch.int64)) is torch_ops
    assert "native" in dispatch.BACKENDS


def test_auto_sends_small_16bit_cpu_tensors_to_native():
    """The measured CPU rule (dispatch docstring): small float16/bfloat16 -> native; small
    float32/float64 stay on the numba kernels; large tensors are not native's."""
    small = torch.randn(8, 4, 5, 5)
    big = torch.randn(dispatch.AUTO_MIN_NUMEL // 16, 4, 2, 2)
    with batchnorm.use_backend("auto"):
        for dtype in dispatch.AUTO_NATIVE:
            assert dispatch.backend_for(small.to(dtype)) is native
            assert dispatch.backend_for(small.to(dtype).to(memory_format=CL)) is native
            assert dispatch.backend_for(big.to(dtype)) is not native
        assert dispatch.backend_for(small) is not native
        assert dispatch.backend_for(small.double()) is not native
        assert dispatch.backend_for(small.to(torch.bfloat16)[:, :, ::2]) is torch_ops


def test_supports():
    assert native.supports(torch.randn(2, 3))
    assert native.supports(torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d))
    assert not native.supports(torch.randn(3))
    assert not native.supports(torch.randn(0, 3))
    assert not native.supports(torch.randn(2, 3).t())
    assert not native.supports(torch.randn(2, 3, dtype=torch.complex64))
    assert not native.supports("x")  # type: ignore[arg-type]


def _layer_cases():
    return [
        (batchnorm.BatchNorm1d, (16, 5), torch.contiguous_format, torch.float32),
        (batchnorm.BatchNorm1d, (1, 3, 17), torch.contiguous_format, torch.float64),
        (batchnorm.BatchNorm2d, (3, 5, 7, 9), CL, torch.float32),
        (batchnorm.BatchNorm2d, (2, 3, 4, 5), torch.contiguous_format, torch.bfloat16),
        (batchnorm.BatchNorm3d, (2, 3, 2, 3, 5), torch.channels_last_3d, torch.float32),
    ]


@pytest.mark.parametrize(("cls", "shape", "fmt", "dtype"), _layer_cases())
def test_layers_under_native_equal_reference(cls, shape, fmt, dtype):
    """Two training steps (output, all gradients, running statistics) and eval, against NumPy."""
    c = shape[1]
    layer = cls(c, momentum=0.3).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, c))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, c))
    rm, rv = np.zeros(c), np.ones(c)
    with batchnorm.use_backend("native"):
        for step in range(2):
            x, _, _, g = _data(shape, fmt, dtype, loc=float(step))
            x.requires_grad_()
            layer.weight.grad = layer.bias.grad = None
            y = layer(x)
            y.backward(g)
            y_ref, _, _ = reference.forward(_np(x), _np(layer.weight), _np(layer.bias), layer.eps)
            dx_ref, dw_ref, db_ref = reference.backward(_np(g), _np(x), _np(layer.weight), layer.eps)
            assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
            _close(y, y_ref, dtype, "y")
            _close(x.grad, dx_ref, dtype, "dx")
            _close(layer.weight.grad, dw_ref, dtype, "dweight")
            _close(layer.bias.grad, db_ref, dtype, "dbias")
            rm, rv = reference.running_update(rm, rv, _np(x), momentum=0.3)
            _close(layer.running_mean, rm, dtype, "running_mean")
            _close(layer.running_var, rv, dtype, "running_var")
        layer.eval()
        x, _, _, _ = _data(shape, fmt, dtype)
        with torch.no_grad():
            ye = layer(x)
    want = reference.eval_forward(
        _np(x), _np(layer.running_mean), _np(layer.running_var), _np(layer.weight), _np(layer.bias), layer.eps
    )
    _close(ye, want, dtype, "eval y")


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_bn_act_under_native_equals_torch_ops(activation):
    """BatchNormAct's backward by inversion calls the kernels' backward around (bias, 1/weight)."""
    x, _, _, g = _data((6, 4, 5, 5), CL, torch.float32)
    results = []
    for backend in ("native", "torch"):
        torch.manual_seed(1)
        layer = batchnorm.BatchNormAct2d(4, activation=activation)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 1.0, -1.5, 2.0]))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        xi = x.clone().requires_grad_()
        with batchnorm.use_backend(backend):
            layer(xi).backward(g)
        results.append((xi.grad, layer.weight.grad, layer.bias.grad, layer.running_var))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_sends_cuda_tensors_to_native():
    x = torch.randn(8, 4, 5, 5, device="cuda")
    with batchnorm.use_backend("auto"):
        assert dispatch.backend_for(x) is native
        assert dispatch.backend_for(x.to(torch.bfloat16)) is native
        layer = batchnorm.BatchNorm2d(4).cuda()
        y = layer(x)
    y_ref, _, _ = reference.forward(_np(x.cpu()), None, None, layer.eps)
    _close(y.cpu(), y_ref, torch.float32, "y")
