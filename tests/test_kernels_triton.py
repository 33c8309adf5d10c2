"""The Triton back-end against NumPy float64, run on CPU tensors in Triton's interpreter.

Run: .venv/bin/python -m pytest -q tests/test_kernels_triton.py
(the fixture sets TRITON_INTERPRET=1 before the kernels are created; tests marked ``gpu`` run
the compiled kernels and skip without CUDA).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import reference
from batchnorm._kernels import dispatch, torch_ops

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# max |error| relative to the largest reference magnitude, per input dtype
TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CL = torch.channels_last
CASES = [  # (shape, memory format): odd C, N = 1 with spatial > 1, 2D, NCL, NCHW, CL, CL-3d
    ((13, 5), torch.contiguous_format),
    ((1, 3, 17), torch.contiguous_format),
    ((3, 5, 7, 9), torch.contiguous_format),
    ((3, 5, 7, 9), CL),
    ((2, 3, 2, 3, 5), torch.channels_last_3d),
]
IDS = [f"{'x'.join(map(str, s))}-{str(f).split('.')[-1]}" for s, f in CASES]


@pytest.fixture(scope="module")
def tb() -> Iterator[ModuleType]:
    """``triton_bn`` created under the interpreter (TRITON_INTERPRET=1 while it is imported)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = importlib.import_module("batchnorm._kernels.triton_bn")
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    if not mod.INTERPRETED:
        pytest.skip("triton_bn was imported earlier without TRITON_INTERPRET=1")
    yield mod


def _data(shape, fmt, dtype, loc=0.5, scale=2.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale + loc).to(dtype).contiguous(memory_format=fmt)
    c = shape[1]
    w = torch.randn(c, dtype=torch.float64).to(dtype)
    b = torch.randn(c, dtype=torch.float64).to(dtype)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    return x, w, b, g


def _close(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype, what: str) -> None:
    want = np.asarray(want, dtype=np.float64)
    err = np.abs(got.detach().double().numpy() - want).max()
    bound = TOL[dtype] * max(1.0, np.abs(want).max())
    assert err <= bound, f"{what}: max |error| {err:.3g} > {bound:.3g}"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_train_backward_eval_match_reference(tb, case, dtype):
    shape, fmt = case
    x, w, b, g = _data(shape, fmt, dtype)
    y, mean, var = tb.train_forward(x, w, b, 1e-5)
    y_ref, mu_ref, var_ref = reference.forward(_np(x), _np(w), _np(b), 1e-5)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert mean.dtype == torch.float64 and var.dtype == torch_ops.acc_dtype(dtype)
    _close(y, y_ref, dtype, "y")
    _close(mean, mu_ref, dtype, "mean")
    _close(var, var_ref, dtype, "var")
    invstd = torch.rsqrt(var + 1e-5)
    dx, dw, db = tb.backward(g, x, mean, invstd, w)
    dx_ref, dw_ref, db_ref = reference.backward(_np(g), _np(x), _np(w), 1e-5)
    assert dx.stride() == x.stride() and dw.dtype == torch_ops.acc_dtype(dtype)
    _close(dx, dx_ref, dtype, "dx")
    _close(dw, dw_ref, dtype, "dgamma")
    _close(db, db_ref, dtype, "dbeta")
    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64) + 0.5
    ye = tb.eval_forward(x, rm, rv, w, b, 1e-5)
    _close(ye, reference.eval_forward(_np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-5), dtype, "eval y")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=IDS[2:4])
def test_half_dtypes_accumulate_in_float32(tb, case, dtype):
    shape, fmt = case
    x, w, b, g = _data(shape, fmt, dtype)
    y, mean, var = tb.train_forward(x, w, b, 1e-5)
    y_ref, mu_ref, var_ref = reference.forward(_np(x), _np(w), _np(b), 1e-5)
    assert y.dtype == dtype and var.dtype == torch.float32 and y.stride() == x.stride()
    _close(y, y_ref, dtype, "y")
    _close(mean, mu_ref, torch.float32, "mean")  # the statistics themselves are float32-exact
    _close(var, var_ref, torch.float32, "var")
    dx, dw, db = tb.backward(g, x, mean, torch.rsqrt(var + 1e-5), w)
    dx_ref, dw_ref, db_ref = reference.backward(_np(g), _np(x), _np(w), 1e-5)
    _close(dx, dx_ref, dtype, "dx")
    _close(dw, dw_ref, torch.float32, "dgamma")
    _close(db, db_ref, torch.float32, "dbeta")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_large_mean_small_spread_float32(tb, fmt):
    """mean 1e4, std 1e-2 in float32: a naive float32 E[x^2] - E[x]^2 cancels to nothing."""
    x, w, b, g = _data((4, 3, 10, 13), fmt, torch.float32, loc=1e4, scale=1e-2)
    y, mean, var = tb.train_forward(x, w, b, 1e-8)
    y_ref, mu_ref, var_ref = reference.forward(_np(x), _np(w), _np(b), 1e-8)
    np.testing.assert_allclose(_np(var), var_ref, rtol=1e-4)
    np.testing.assert_allclose(_np(mean), mu_ref, rtol=0, atol=1e-7)
    _close(y, y_ref, torch.float32, "y")  # |y| ~ 1: needs x - mean to the spread's precision
    dx, dw, db = tb.backward(g, x, mean, torch.rsqrt(var + 1e-8), w)
    dx_ref, dw_ref, _ = reference.backward(_np(g), _np(x), _np(w), 1e-8)
    np.testing.assert_allclose(_np(dw), dw_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_np(dx), dx_ref, rtol=0, atol=1e-3 * np.abs(dx_ref).max())
    # a mean rounded to float32 (off by ~5e-4, 5% of the spread) is re-centered from x's sums
    dx32, dw32, _ = tb.backward(g, x, mean.float(), torch.rsqrt(var + 1e-8), w)
    np.testing.assert_allclose(_np(dw32), dw_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_np(dx32), dx_ref, rtol=0, atol=1e-3 * np.abs(dx_ref).max())


def test_split_reduction_merges_exactly(tb, monkeypatch):
    """C = 2 over 3 * 1000 values: the rows are split across programs and Chan-merged."""
    plan = importlib.import_module("batchnorm._kernels.triton_plan")  # imported by tb, under the interpreter
    monkeypatch.setitem(plan.TARGET_PROGRAMS, "cpu", 16)
    x, w, b, g = _data((3, 2, 40, 25), torch.contiguous_format, torch.float64, loc=3.0)
    assert plan.reduce_plan(plan.Geo(x, "ncs"), x.device)[2] > 1
    y, mean, var = tb.train_forward(x, w, b, 1e-5)
    y_ref, mu_ref, var_ref = reference.forward(_np(x), _np(w), _np(b), 1e-5)
    _close(mean, mu_ref, torch.float64, "mean")
    _close(var, var_ref, torch.float64, "var")
    dx, dw, db = tb.backward(g, x, mean, torch.rsqrt(var + 1e-5), w)
    dx_ref, dw_ref, db_ref = reference.backward(_np(g), _np(x), _np(w), 1e-5)
    _close(dx, dx_ref, torch.float64, "dx")
    _close(dw, dw_ref, torch.float64, "dgamma")


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_batch_stats_and_split_backward(tb, case):
    shape, fmt = case
    x, w, _, g = _data(shape, fmt, torch.float64)
    mean, var = tb.batch_stats(x)
    mu_ref, var_ref = reference.moments(_np(x))
    _close(mean, mu_ref, torch.float64, "mean")
    _close(var, var_ref, torch.float64, "var")
    other = torch.randn(shape[1], dtype=torch.float64)  # any centre, not the batch mean
    sg, sgx = tb.backward_sums(g, x, other)
    axes = (0, *range(2, len(shape)))
    xc = _np(x) - _np(other).reshape(1, -1, *([1] * (len(shape) - 2)))
    assert sg.dtype == torch.float64 and sgx.dtype == torch.float64
    _close(sg, _np(g).sum(axis=axes), torch.float64, "sum g")
    _close(sgx, (_np(g) * xc).sum(axis=axes), torch.float64, "sum g (x - mean)")
    invstd = torch.rsqrt(var + 1e-5)
    m = x.numel() // shape[1]
    s_g, s_gx = tb.backward_sums(g, x, mean)
    dx = tb.backward_apply(g, x, mean, invstd, w, s_g / m, s_gx * invstd / m)
    _close(dx, reference.backward(_np(g), _np(x), _np(w), 1e-5)[0], torch.float64, "dx")


def _bits(mask: torch.Tensor, z: torch.Tensor) -> np.ndarray:
    """The mask's bits in z's memory order."""
    words = mask.numpy().view(np.uint32)
    bits = ((words[:, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(-1)
    return bits[: z.numel()].astype(bool)


def _memory_order(z: torch.Tensor) -> np.ndarray:
    """z's values in memory order (dense tensors)."""
    order = sorted(range(z.dim()), key=lambda d: -z.stride(d))
    return z.permute(order).reshape(-1).detach().double().numpy()


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[IDS[1], IDS[3]])
@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "add-relu"])
def test_bn_relu_and_add_relu(tb, case, with_residual):
    shape, fmt = case
    x, w, b, g = _data(shape, fmt, torch.float32)
    res = torch.randn(shape).contiguous(memory_format=fmt) if with_residual else None
    z, mean, var, mask = tb.train_forward_act(x, w, b, 1e-5, "relu", residual=res)
    y_ref, _, _ = reference.forward(_np(x), _np(w), _np(b), 1e-5)
    pre = y_ref + (_np(res) if with_residual else 0.0)
    _close(z, np.maximum(pre, 0.0), torch.float32, "z")
    assert mask.dtype == torch.int32 and mask.numel() == -(-x.numel() // 32)
    assert np.array_equal(_bits(mask, z), _memory_order(z) > 0)
    dx, dw, db, dres = tb.backward_relu(g, x, mean, torch.rsqrt(var + 1e-5), w, mask, residual_grad=with_residual)
    dy = _np(g) * (pre > 0)
    dx_ref, dw_ref, db_ref = reference.backward(dy, _np(x), _np(w), 1e-5)
    _close(dx, dx_ref, torch.float32, "dx")
    _close(dw, dw_ref, torch.float32, "dgamma")
    _close(db, db_ref, torch.float32, "dbeta")
    if with_residual:
        _close(dres, dy, torch.float32, "dresidual")
    else:
        assert dres is None
    ze = tb.eval_forward_act(x, mean, var, w, b, 1e-5, "relu", residual=res)
    _close(ze, np.maximum(pre, 0.0), torch.float32, "eval z")


@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "identity"])
@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=IDS[2:4])
def test_bn_act_backward_by_inversion(tb, case, activation):
    shape, fmt = case
    x, w, b, g = _data(shape, fmt, torch.float64)
    w = w.abs() + 0.5  # invertible gamma
    z, mean, var, mask = tb.train_forward_act(x, w, b, 1e-5, activation, negative_slope=0.1, alpha=0.7)
    assert mask is None
    y_ref, _, _ = reference.forward(_np(x), _np(w), _np(b), 1e-5)
    if activation == "leaky_relu":
        z_ref, slope = np.where(y_ref >= 0, y_ref, 0.1 * y_ref), np.where(y_ref > 0, 1.0, 0.1)
    elif activation == "elu":
        z_ref, slope = np.where(y_ref > 0, y_ref, 0.7 * np.expm1(y_ref)), np.where(y_ref > 0, 1.0, 0.7 * np.exp(y_ref))
    else:
        z_ref, slope = y_ref, np.ones_like(y_ref)
    np.testing.assert_allclose(_np(z), z_ref, rtol=1e-12, atol=1e-12)
    dx, dw, db = tb.backward_act(g, z, w, b, torch.rsqrt(var + 1e-5), activation, 0.1, 0.7)
    dx_ref, dw_ref, db_ref = reference.backward(_np(g) * slope, _np(x), _np(w), 1e-5)
    np.testing.assert_allclose(_np(dx), dx_ref, rtol=0, atol=1e-9 * np.abs(dx_ref).max())
    np.testing.assert_allclose(_np(dw), dw_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(_np(db), db_ref, rtol=1e-9, atol=1e-9)


def test_bad_arguments_raise(tb):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="activation"):
        tb.train_forward_act(x, None, None, 1e-5, "gelu")
    with pytest.raises(ValueError, match="residual needs activation 'relu'"):
        tb.train_forward_act(x, None, None, 1e-5, "elu", residual=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected shape"):
        tb.backward(torch.randn(2, 3, 5), x, torch.zeros(3, dtype=torch.float64), torch.ones(3), None)
    with pytest.raises(ValueError, match="int32 mask"):
        tb.backward_relu(x, x, torch.zeros(3, dtype=torch.float64), torch.ones(3), None, torch.zeros(3))
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        tb.train_forward(torch.randn(4, 3, 5).transpose(0, 2).transpose(1, 2), None, None, 1e-5)
    assert not tb.supports(torch.randn(0, 3)) and not tb.supports(torch.randn(4, 3).int())


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_use_backend_triton_batchnorm2d_equals_torch(tb, fmt):
    """The public switch: our BatchNorm2d through the Triton kernels equals torch's layer."""
    ours, theirs = batchnorm.BatchNorm2d(5), torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    x = (torch.randn(3, 5, 6, 7) * 2 + 1).contiguous(memory_format=fmt)
    g = torch.randn(3, 5, 6, 7)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with batchnorm.use_backend("triton"):
        assert dispatch.backend_for(x) is tb
        ya = ours(xa)
        ya.backward(g)
    yb = theirs(xb)
    yb.backward(g)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ya.is_contiguous(memory_format=fmt)
    ours.eval()
    theirs.eval()
    with batchnorm.use_backend("triton"), torch.no_grad():
        ye = ours(x)
    torch.testing.assert_close(ye, theirs(x), rtol=1e-5, atol=1e-5)


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_cpu_without_interpreter_raises_clearly_and_import_is_lazy():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import sys, torch, batchnorm\n"
        "assert 'triton' not in sys.modules, 'import batchnorm imported triton'\n"
        "try:\n"
        "    with batchnorm.use_backend('triton'):\n"
        "        batchnorm.BatchNorm2d(3)(torch.randn(2, 3, 4, 4))\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    out = _python(code, env)
    assert out.returncode == 0, out.stderr
    assert "RAISED" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_gpu_compiled_kernels_match_torch(dtype, fmt):
    """On CUDA (compiled, not interpreted): training fwd/bwd and BN+add+ReLU vs torch in float64."""
    tbc = importlib.import_module("batchnorm._kernels.triton_bn")
    if tbc.INTERPRETED:
        pytest.skip("triton_bn was created for the interpreter in this process")
    x = (torch.randn(8, 64, 28, 28, device="cuda") * 3 + 2).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn_like(x)
    res = torch.randn_like(x)
    w = torch.rand(64, device="cuda") + 0.5
    b = torch.randn(64, device="cuda")
    z, mean, var, mask = tbc.train_forward_act(x, w, b, 1e-5, "relu", residual=res)
    x64 = x.double().requires_grad_()
    y64 = torch.nn.functional.batch_norm(x64, None, None, w.double(), b.double(), True, 0.0, 1e-5)
    z64 = torch.relu(y64 + res.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(z.double(), z64, rtol=tol, atol=tol)
    dx, dw, db, dres = tbc.backward_relu(g, x, mean, torch.rsqrt(var + 1e-5), w, mask, residual_grad=True)
    z64.backward(g.double())
    torch.testing.assert_close(dx.double(), x64.grad, rtol=tol, atol=tol * 10)
