"""Kernels and dispatch: numba CPU back-end and the pure-torch fallback, against NumPy float64.

Run: PYTHONPATH=src python -m pytest -q tests/test_kernels_cpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import functional as BF
from batchnorm import reference
from batchnorm._kernels import cpu, cpu_kernels, cpu_plan, cpu_runtime, cpu_small, dispatch, native, torch_ops

BACKENDS = ["torch", "numba", "auto"]  # auto: these small CASES run on cpu_small

# (shape, memory format) covering both kernel layouts and both ncs task splits (C=3: within-channel
# units; C=16: one task per channel, fused).
CASES = [
    ((16, 5), torch.contiguous_format),
    ((4, 3, 7), torch.contiguous_format),
    ((3, 3, 5, 6), torch.contiguous_format),
    ((2, 16, 3, 5), torch.contiguous_format),
    ((3, 3, 5, 6), torch.channels_last),
    ((2, 16, 3, 5), torch.channels_last),
    ((2, 3, 2, 3, 4), torch.contiguous_format),
    ((2, 3, 2, 3, 4), torch.channels_last_3d),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{str(f).split('.')[-1]}" for s, f in CASES]

# max |error| allowed relative to the largest reference magnitude, per input dtype
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ---------------------------------------------------------------------------------------------
# NumPy float64 reference (textbook formulas)


def _to_mc(x: np.ndarray) -> np.ndarray:
    """(N, C, *) -> (M, C)."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def ref_train(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float):
    """y, mean, biased var, x_hat for a float64 array x (N, C, *)."""
    xm = _to_mc(x)  # (M, C)
    mean = xm.mean(axis=0)
    var = ((xm - mean) ** 2).mean(axis=0)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x_hat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return x_hat * w.reshape(shape) + b.reshape(shape), mean, var, x_hat


def ref_backward(g: np.ndarray, x_hat: np.ndarray, var: np.ndarray, w: np.ndarray, eps: float):
    """dx, dgamma, dbeta (float64) for upstream gradient g."""
    shape = (1, -1) + (1,) * (g.ndim - 2)
    m = g.size // g.shape[1]
    db = _to_mc(g).sum(axis=0)
    dw = _to_mc(g * x_hat).sum(axis=0)
    k = (w / np.sqrt(var + eps)).reshape(shape)
    dx = k * (g - db.reshape(shape) / m - x_hat * dw.reshape(shape) / m)
    return dx, dw, db


def ref_eval(x: np.ndarray, mean: np.ndarray, var: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * w.reshape(shape) + b.reshape(shape)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy().copy()


def assert_near(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, what: str) -> None:
    """max |actual - expected| <= TOL[dtype] * max(1, max |expected|)."""
    err = float(np.max(np.abs(f64(actual) - expected)))
    scale = max(1.0, float(np.max(np.abs(expected))))
    assert err <= TOL[dtype] * scale, f"{what}: max |err| {err:.3e} > {TOL[dtype] * scale:.3e}"


def make_input(shape, fmt, dtype, loc=1.5, spread=2.0) -> torch.Tensor:
    x = (torch.randn(shape, dtype=torch.float64) * spread + loc).to(dtype)
    return x.contiguous(memory_format=fmt)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    with batchnorm.use_backend(request.param):
        yield request.param


# ---------------------------------------------------------------------------------------------
# Functional layer (training forward + backward + running stats, then eval) on both back-ends


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("shape", "fmt"), CASES, ids=CASE_IDS)
def test_functional_matches_reference(backend, shape, fmt, dtype):
    c = shape[1]
    x = make_input(shape, fmt, dtype).requires_grad_()
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).to(dtype).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    rm = torch.randn(c, dtype=dtype)
    rv = torch.rand(c, dtype=dtype) + 0.5
    rm0, rv0 = f64(rm), f64(rv)
    eps, momentum = 1e-3, 0.3
    want = {"torch": torch_ops, "numba": cpu}.get(backend)
    if backend == "auto":
        want = cpu_small if dtype in (torch.float32, torch.float64) else native
    assert dispatch.backend_for(x) is want

    y = batchnorm.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=eps)
    y.backward(g)

    ey, mean, var, x_hat = ref_train(f64(x), f64(w), f64(b), eps)
    dx, dw, db = ref_backward(f64(g), x_hat, var, f64(w), eps)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=fmt)
    assert_near(y, ey, dtype, "y")
    assert_near(x.grad, dx, dtype, "dx")
    assert_near(w.grad, dw, dtype, "dweight")
    assert_near(b.grad, db, dtype, "dbias")
    m = x.numel() // c
    assert_near(rm, (1 - momentum) * rm0 + momentum * mean, dtype, "running_mean")
    assert_near(rv, (1 - momentum) * rv0 + momentum * var * m / (m - 1), dtype, "running_var")

    with torch.no_grad():
        ye = batchnorm.batch_norm(x, rm, rv, w, b, training=False, eps=eps)
    assert ye.is_contiguous(memory_format=fmt)
    assert_near(ye, ref_eval(f64(x), f64(rm), f64(rv), f64(w), f64(b), eps), dtype, "eval y")


@pytest.mark.parametrize("kern", [cpu, cpu_small], ids=["cpu", "cpu_small"])
@pytest.mark.parametrize(("shape", "fmt"), CASES, ids=CASE_IDS)
def test_kernels_direct_no_affine(kern, shape, fmt):
    """numba kernels called directly, weight/bias None, float64: all outputs of the API."""
    x = make_input(shape, fmt, torch.float64)
    g = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt)
    c = shape[1]
    ones, zeros = np.ones(c), np.zeros(c)
    y, mean, var = kern.train_forward(x, None, None, 1e-5)
    ey, emean, evar, x_hat = ref_train(f64(x), ones, zeros, 1e-5)
    assert mean.dtype == var.dtype == torch.float64
    assert_near(y, ey, torch.float64, "y")
    assert_near(mean, emean, torch.float64, "mean")
    assert_near(var, evar, torch.float64, "var")
    dx, dw, db = kern.backward(g, x, mean, torch.rsqrt(var + 1e-5), None)
    edx, edw, edb = ref_backward(f64(g), x_hat, evar, ones, 1e-5)
    assert_near(dx, edx, torch.float64, "dx")
    assert_near(dw, edw, torch.float64, "sum g*x_hat")
    assert_near(db, edb, torch.float64, "sum g")
    assert dx.stride() == x.stride()
    ye = kern.eval_forward(x, mean, var, None, None, 1e-5)
    assert_near(ye, ey, torch.float64, "eval y")
    assert ye.stride() == x.stride()


@pytest.mark.parametrize("kern", [cpu, cpu_small], ids=["cpu", "cpu_small"])
@pytest.mark.parametrize("grad", ["nchw", "channels_last", "expanded"], ids=["nchw-grad", "cl-grad", "expanded-grad"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_backward_grad_layout_differs_from_input(kern, grad, fmt):
    """A grad laid out unlike the input (another memory format, or a stride-0 broadcast as
    ``y.sum().backward()`` makes) is handled, not misread."""
    x = make_input((2, 4, 3, 5), fmt, torch.float64)
    g = torch.randn(2, 4, 3, 5, dtype=torch.float64)  # NCHW
    if grad == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    elif grad == "expanded":
        g = torch.tensor(0.7, dtype=torch.float64).expand(2, 4, 3, 5)
    y, mean, var = kern.train_forward(x, None, None, 1e-5)
    dx, _, _ = kern.backward(g, x, mean, torch.rsqrt(var + 1e-5), None)
    _, _, evar, x_hat = ref_train(f64(x), np.ones(4), np.zeros(4), 1e-5)
    assert_near(dx, ref_backward(f64(g), x_hat, evar, np.ones(4), 1e-5)[0], torch.float64, "dx")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cpu_small_float32_affine_large_mean(fmt):
    """cpu_small in float32 with weight and bias at mean 1e4 / std 1e-2: statistics, output and
    gradients as precise as float32 storage allows (x - mean is formed in float64)."""
    x = make_input((6, 3, 4, 5), fmt, torch.float32, loc=1e4, spread=1e-2)
    w = torch.tensor([0.5, 1.0, -2.0])
    b = torch.tensor([0.0, 1.0, -1.0])
    g = torch.randn(6, 3, 4, 5).contiguous(memory_format=fmt)
    y, mean, var = cpu_small.train_forward(x, w, b, 1e-8)
    ey, emean, evar, x_hat = ref_train(f64(x), f64(w), f64(b), 1e-8)
    assert mean.dtype == torch.float64 and var.dtype == torch.float32 and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=fmt)
    np.testing.assert_allclose(f64(mean), emean, rtol=1e-14)
    np.testing.assert_allclose(f64(var), evar, rtol=1e-6)
    assert np.max(np.abs(f64(y) - ey)) < 1e-5
    dx, dw, db = cpu_small.backward(g, x, mean, torch.rsqrt(var.double() + 1e-8), w)
    edx, edw, edb = ref_backward(f64(g), x_hat, evar, f64(w), 1e-8)
    assert dw.dtype == db.dtype == torch.float32
    assert np.max(np.abs(f64(dx) - edx)) / np.max(np.abs(edx)) < 1e-5
    np.testing.assert_allclose(f64(dw), edw, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(f64(db), edb, rtol=1e-6, atol=1e-5)


def test_cpu_small_refuses_what_it_cannot_take():
    """Called directly with a tensor outside its scope, cpu_small says what it expected."""
    for bad in (
        torch.randn(4, 3, 6, 6)[:, :, ::2],  # strided
        torch.randn(4, 3, 5, dtype=torch.bfloat16),  # 16-bit
        torch.randn(8, 4, 64, 64),  # not small
    ):
        assert not cpu_small.supports(bad)
        with pytest.raises(ValueError, match="small contiguous or channels-last"):
            cpu_small.train_forward(bad, None, None, 1e-5)
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="expected grad_y of shape"):
        cpu_small.backward(torch.randn(4, 3), x, torch.zeros(3), torch.ones(3), None)


# ---------------------------------------------------------------------------------------------
# Numerical stability: mean 1e4, std 1e-2 in float32


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_large_mean_small_spread_float32(backend, fmt):
    shape = (8, 3, 6, 6)
    x = make_input(shape, fmt, torch.float32, loc=1e4, spread=1e-2).requires_grad_()
    w = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    b = torch.tensor([0.0, 1.0, -1.0], requires_grad=True)
    g = torch.randn(shape).contiguous(memory_format=fmt)
    rm = torch.zeros(3)
    rv = torch.ones(3)
    y = batchnorm.batch_norm(x, rm, rv, w, b, training=True, momentum=1.0, eps=1e-8)
    y.backward(g)
    xd = f64(x)
    ey, mean, var, x_hat = ref_train(xd, f64(w), f64(b), 1e-8)
    dx, dw, db = ref_backward(f64(g), x_hat, var, f64(w), 1e-8)
    m = x.numel() // 3
    # the variance (~1e-4) is recovered to float32 precision: no cancellation against 1e8
    np.testing.assert_allclose(f64(rv), var * m / (m - 1), rtol=1e-5)
    np.testing.assert_allclose(f64(rm), mean, rtol=1e-7)
    # outputs and gradients as precise as float32 allows at O(1) magnitudes
    assert np.max(np.abs(f64(y) - ey)) < 1e-4
    assert np.max(np.abs(f64(x.grad) - dx)) / np.max(np.abs(dx)) < 1e-4
    assert np.max(np.abs(f64(w.grad) - dw)) / np.max(np.abs(dw)) < 1e-4
    assert np.max(np.abs(f64(b.grad) - db)) < 1e-4


# ---------------------------------------------------------------------------------------------
# Modules against torch.nn.BatchNorm*d on both back-ends


@pytest.mark.parametrize(
    ("ours", "theirs", "shape", "fmt"),
    [
        (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (32, 6), torch.contiguous_format),
        (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (4, 6, 9), torch.contiguous_format),
        (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, (4, 6, 5, 5), torch.contiguous_format),
        (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, (4, 6, 5, 5), torch.channels_last),
        (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d, (2, 6, 3, 4, 4), torch.contiguous_format),
    ],
)
def test_module_matches_torch(backend, ours, theirs, shape, fmt):
    c = shape[1]
    a = ours(c, momentum=0.2)
    t = theirs(c, momentum=0.2)
    with torch.no_grad():
        for m in (a, t):
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-1.0, 1.0, c))
    for step in range(2):
        x = make_input(shape, fmt, torch.float32, loc=float(step))
        xa = x.clone().requires_grad_()
        xt = x.clone().requires_grad_()
        ya = a(xa)
        yt = t(xt)
        g = torch.randn_like(yt)
        ya.backward(g)
        yt.backward(g)
        torch.testing.assert_close(ya, yt, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xa.grad, xt.grad, atol=1e-5, rtol=1e-5)
        assert ya.stride() == yt.stride()
    torch.testing.assert_close(a.weight.grad, t.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(a.bias.grad, t.bias.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(a.running_mean, t.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.running_var, t.running_var, atol=1e-6, rtol=1e-5)
    assert int(a.num_batches_tracked) == int(t.num_batches_tracked) == 2
    a.eval()
    t.eval()
    x = make_input(shape, fmt, torch.float32)
    torch.testing.assert_close(a(x), t(x), atol=1e-5, rtol=1e-5)


def test_nonfinite_batch_leaves_running_stats(backend):
    x = torch.randn(4, 3, 5)
    x[1, 2, 3] = float("nan")
    rm = torch.zeros(3)
    rv = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = batchnorm.batch_norm(x, rm, rv, training=True)
    assert torch.isnan(y[:, 2]).all()
    assert torch.isfinite(y[:, :2]).all()
    assert torch.equal(rm, torch.zeros(3))
    assert torch.equal(rv, torch.ones(3))


def test_huge_finite_statistics_still_update(backend):
    """Finite statistics whose sum overflows (variances near float32's max, a mean near
    float64's) are finite: the running statistics take them, and no warning is given."""
    x = torch.zeros(4, 64, 5)
    x[::2] = 6.3e18  # per-channel variance 9.9e36 (sum of squares 2e38 < 3.4e38): the 64 sum to inf
    rm, rv = torch.zeros(64), torch.ones(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batchnorm.batch_norm(x, rm, rv, training=True, momentum=1.0)
    m = 20
    np.testing.assert_allclose(f64(rm), np.full(64, 3.15e18), rtol=1e-6)
    np.testing.assert_allclose(f64(rv), np.full(64, 3.15e18**2 * m / (m - 1)), rtol=1e-5)
    assert BF._checks.finite(torch.full((3,), 1e308, dtype=torch.float64))
    assert not BF._checks.finite(torch.tensor([1.0, float("inf")]), torch.zeros(2))
    assert not BF._checks.finite(torch.zeros(2), torch.tensor([float("nan"), 0.0]))


# ---------------------------------------------------------------------------------------------
# Dispatch, supports(), invariances and the compile/caching policy


def test_numba_backends_provide_the_whole_api():
    """dispatch hands out cpu or cpu_small for any call the layers make: both export every
    function of the back-end contract, and the re-exported ones are torch_ops' own."""
    for mod in (cpu, cpu_small):
        missing = [n for n in dispatch.BACKEND_API if not callable(getattr(mod, n, None))]
        assert not missing, (mod.__name__, missing)
        assert set(dispatch.BACKEND_API) <= set(mod.__all__)
    for name in ("batch_stats", "backward_sums", "backward_apply"):
        assert getattr(cpu_small, name) is getattr(torch_ops, name)


def test_supports_and_dispatch():
    x = torch.randn(4, 3, 5, 5)
    big = torch.randn(8, 4, 64, 64)
    assert big.numel() >= cpu.AUTO_MIN_NUMEL > x.numel()
    with batchnorm.use_backend("numba"):
        assert cpu.supports(x)
        assert cpu.supports(x.to(memory_format=torch.channels_last))
        assert cpu.supports(x.to(torch.bfloat16))
        assert cpu.supports(torch.randn(5, 7, 3).transpose(1, 2))  # C innermost: "mc" layout
        sliced = x[:, :, ::2]
        assert not cpu.supports(sliced)
        assert not cpu.supports(torch.empty(0, 3, 4))
        assert not cpu.supports(torch.randn(4, 3, dtype=torch.complex64))
        assert not cpu.supports(torch.randn(4, 3, device="meta"))
        assert not cpu.supports(torch.randn(5))
        assert dispatch.backend_for(sliced) is torch_ops
        assert dispatch.backend_for(x) is cpu
    with batchnorm.use_backend("auto"):
        assert dispatch.backend_for(big) is cpu
        assert dispatch.backend_for(big.to(memory_format=torch.channels_last)) is cpu
        assert dispatch.backend_for(x) is cpu_small  # small: one serial call beats a launch
        assert dispatch.backend_for(x.to(memory_format=torch.channels_last)) is cpu_small
        assert dispatch.backend_for(x.double()) is cpu_small
        assert dispatch.backend_for(x.to(torch.bfloat16)) is native  # 16-bit small: aten kernels
        assert dispatch.backend_for(x[:, :, ::2]) is torch_ops
        assert dispatch.backend_for(big[:, :, ::2]) is torch_ops
    with batchnorm.use_backend("torch"):
        assert dispatch.backend_for(x) is torch_ops
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        cpu.train_forward(sliced, None, None, 1e-5)


def test_unsupported_layout_falls_back_with_same_result():
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)[:, :, ::2]
    with batchnorm.use_backend("numba"):
        y = batchnorm.batch_norm(x, None, None, training=True)
    ey, _, _, _ = ref_train(f64(x), np.ones(3), np.zeros(3), 1e-5)
    assert_near(y, ey, torch.float64, "y")


@pytest.mark.parametrize(
    ("shape", "fmt"),
    [
        ((2, 3, 160, 160), torch.contiguous_format),  # ncs, within-channel units
        ((4, 16, 48, 48), torch.contiguous_format),  # ncs
        ((256, 16, 6, 6), torch.contiguous_format),  # short rows: (N, C*S) row kernels
        ((8, 24, 32, 32), torch.channels_last),  # mc
    ],
)
def test_parallel_paths_match_reference_and_thread_count(shape, fmt):
    """Tensors above the small-work threshold run the multi-threaded kernels: they match the
    float64 reference, and 1 vs all threads changes rounding only."""
    x = make_input(shape, fmt, torch.float32)
    g = torch.randn(shape).contiguous(memory_format=fmt)
    before = cpu_runtime.threads()  # (starts numba's pool with the back-end's threading layer)
    results = []
    try:
        for n in sorted({1, before}):
            numba.set_num_threads(n)
            y, mean, var = cpu.train_forward(x, None, None, 1e-5)
            dx, dw, db = cpu.backward(g, x, mean, torch.rsqrt(var + 1e-5), None)
            results.append((y, mean, var, dx, dw, db))
    finally:
        numba.set_num_threads(before)
    assert x.numel() >= cpu_runtime.SMALL_WORK
    c = shape[1]
    ey, emean, evar, x_hat = ref_train(f64(x), np.ones(c), np.zeros(c), 1e-5)
    edx, edw, edb = ref_backward(f64(g), x_hat, evar, np.ones(c), 1e-5)
    for got in results:
        for t, e, name in zip(got, (ey, emean, evar, edx, edw, edb), ("y", "mean", "var", "dx", "dw", "db")):
            assert_near(t, e, torch.float32, name)


def test_launch_threads_follow_torch_set_num_threads():
    """torch.set_num_threads(k) caps our kernels' threads too (torchrun sets 1 per process);
    numba's own count is restored after each launch."""
    seen: list[int] = []

    def probe() -> None:  # stands in for a compiled kernel: records the launch's thread count
        seen.append(numba.get_num_threads())

    cpu_runtime.threads()  # start numba's pool with the back-end's layer
    torch_before, numba_before = torch.get_num_threads(), numba.get_num_threads()
    try:
        torch.set_num_threads(1)
        cpu_runtime.launch(probe, ())
        torch.set_num_threads(max(2, numba_before))
        cpu_runtime.launch(probe, ())
        cpu_runtime.launch(probe, (), small=True)
    finally:
        torch.set_num_threads(torch_before)
    assert seen == [1, numba_before, 1]
    assert numba.get_num_threads() == numba_before


def test_shift_invariance_of_statistics():
    """var(x + c) == var(x) and y(x + c) == y(x) for a large shift c (no cancellation)."""
    x = torch.randn(6, 4, 7, 7, dtype=torch.float64)
    y0, m0, v0 = cpu.train_forward(x, None, None, 1e-5)
    y1, m1, v1 = cpu.train_forward(x + 1e6, None, None, 1e-5)
    torch.testing.assert_close(v1, v0, rtol=1e-9, atol=0)
    torch.testing.assert_close(m1 - 1e6, m0, rtol=0, atol=1e-9)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-8)


def test_jit_falls_back_without_cache(monkeypatch):
    """When numba finds no writable cache location, kernels compile uncached instead of failing."""
    calls = []

    def fake_njit(**options):
        calls.append(options["cache"])
        if options["cache"]:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x'")
        return lambda f: ("compiled", f)

    monkeypatch.setattr(cpu_runtime.numba, "njit", fake_njit)

    def f():
        return 1

    assert cpu_runtime.jit(f, parallel=True) == ("compiled", f)
    assert calls == [True, False]


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout's batchnorm."""
    src = Path(batchnorm.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_import_does_not_compile(tmp_path):
    """Importing the back-end builds no kernel (compilation waits for the first call)."""
    code = (
        "import numba\n"
        "from batchnorm._kernels import cpu, cpu_kernels as k, cpu_plan, cpu_runtime as rt\n"
        "assert k.KERNELS.compiled == {}, k.KERNELS.compiled\n"
        "assert not isinstance(k._sum_dev, numba.core.registry.CPUDispatcher)\n"
        "assert rt._state == {}, rt._state\n"
        "print('ok')\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_concurrent_calls_from_threads(tmp_path):
    """Kernel launches from several Python threads are serialized (numba's workqueue layer
    aborts the process on concurrent launches), in a subprocess so a failure cannot kill pytest."""
    code = (
        "import threading, torch\n"
        "from batchnorm._kernels import cpu\n"
        "x = torch.randn(8, 4, 16, 16)\n"
        "ref = cpu.train_forward(x, None, None, 1e-5)[0]\n"
        "bad = []\n"
        "def work():\n"
        "    for _ in range(30):\n"
        "        y = cpu.train_forward(x, None, None, 1e-5)[0]\n"
        "        bad.append(not torch.equal(y, ref))\n"
        "ts = [threading.Thread(target=work) for _ in range(3)]\n"
        "[t.start() for t in ts]\n"
        "[t.join() for t in ts]\n"
        "print('ok' if not any(bad) else 'mismatch')\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cpu_small_first_calls_from_threads():
    """Threads whose first calls of the small-tensor kernels race all succeed (the lazy jit of
    the kernels and their helpers is serialized), in a fresh interpreter where nothing is
    created yet; every layer's output and running statistics equal a sequential run's."""
    code = (
        "import threading, torch, batchnorm\n"
        "from batchnorm._kernels import cpu_small\n"
        "assert cpu_small._compiled == {}\n"
        "layers = [batchnorm.BatchNorm1d(4) for _ in range(4)]\n"
        "xs = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]\n"
        "bar, errs, ys = threading.Barrier(4), [], [None] * 4\n"
        "def run(i):\n"
        "    bar.wait()\n"
        "    try:\n"
        "        ys[i] = layers[i](xs[i])\n"
        "    except Exception as e:\n"
        "        errs.append(repr(e)[:200])\n"
        "ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]\n"
        "[t.start() for t in ts]\n"
        "[t.join() for t in ts]\n"
        "assert not errs, errs\n"
        "for i in range(4):\n"
        "    ref = torch.nn.BatchNorm1d(4)\n"
        "    assert torch.allclose(ys[i], ref(xs[i]), atol=1e-6)\n"
        "    assert torch.allclose(layers[i].running_var, ref.running_var, atol=1e-6)\n"
        "print('ok')\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_cpu_small_eval_with_zero_variance_and_eps_is_silent():
    """eps = 0 is allowed in eval: a zero running variance gives inf scale as in torch_ops,
    without a NumPy warning that only this path would raise."""
    x = torch.randn(4, 3, 5)
    rv = torch.tensor([0.0, 1.0, -1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = cpu_small.eval_forward(x, torch.zeros(3), rv, None, None, 0.0)
        with batchnorm.use_backend("torch"):
            yt = batchnorm.batch_norm(x, torch.zeros(3), rv, training=False, eps=0.0)
    assert torch.allclose(y[:, 1], yt[:, 1], atol=1e-6)
    assert torch.isinf(y[:, 0]).all() and torch.isinf(yt[:, 0]).all()
    assert torch.isnan(y[:, 2]).all() and torch.isnan(yt[:, 2]).all()


@pytest.mark.parametrize(
    ("shape", "fmt"),
    [
        ((4, 16, 48, 48), torch.contiguous_format),  # ncs
        ((256, 16, 6, 6), torch.contiguous_format),  # short rows: (N, C*S) row kernels
        ((8, 24, 32, 32), torch.channels_last),  # mc
    ],
)
def test_serial_kernels_match_reference(monkeypatch, shape, fmt):
    """The kernels compiled without ``parallel`` (what a forked child of an OpenMP parent runs)
    are separate dispatchers, under their own cache names, and match the float64 reference."""
    x = make_input(shape, fmt, torch.float32)
    g = torch.randn(shape).contiguous(memory_format=fmt)
    monkeypatch.setitem(cpu_runtime._fork_state, "serial", True)
    assert cpu_runtime.threads() == 1
    y, mean, var = cpu.train_forward(x, None, None, 1e-5)
    dx, dw, db = cpu.backward(g, x, mean, torch.rsqrt(var + 1e-5), None)
    serial = {k: v for k, v in cpu_kernels.KERNELS.compiled.items() if k.endswith("@serial")}
    assert serial
    for kern in serial.values():
        assert kern.py_func.__qualname__.endswith("_serial")
        assert not kern.targetoptions.get("parallel")
    c = shape[1]
    ey, emean, evar, x_hat = ref_train(f64(x), np.ones(c), np.zeros(c), 1e-5)
    edx, edw, edb = ref_backward(f64(g), x_hat, evar, np.ones(c), 1e-5)
    names = ("y", "mean", "var", "dx", "dw", "db")
    for t, e, name in zip((y, mean, var, dx, dw, db), (ey, emean, evar, edx, edw, edb), names):
        assert_near(t, e, torch.float32, name)


_FORK_SCRIPT = """
import json, multiprocessing as mp, sys
import numba, torch
import torch.nn.functional as F
import batchnorm
from batchnorm._kernels import cpu_runtime


def check():
    # our BN (training forward + backward, numba back-end, parallel kernels) vs torch in float64
    torch.manual_seed(0)
    x = torch.randn(8, 16, 48, 48)
    assert x.numel() >= cpu_runtime.SMALL_WORK
    g = torch.randn_like(x)
    xo = x.clone().requires_grad_()
    y = batchnorm.batch_norm(xo, None, None, training=True)
    y.backward(g)
    x64 = x.double().requires_grad_()
    ref = F.batch_norm(x64, None, None, training=True)
    ref.backward(g.double())
    errs = [y.double() - ref, xo.grad.double() - x64.grad]
    # BN + leaky ReLU, whose backward runs the fused kernels of cpu_act
    xa = x.clone().requires_grad_()
    z = batchnorm.batch_norm_act(xa, None, None, training=True, activation="leaky_relu")
    z.backward(g)
    xa64 = x.double().requires_grad_()
    zref = F.leaky_relu(F.batch_norm(xa64, None, None, training=True), 0.01)
    zref.backward(g.double())
    errs += [z.double() - zref, xa.grad.double() - xa64.grad]
    return max(float(e.abs().max()) for e in errs)


def child(q):
    # GNU OpenMP's pool does not survive fork: a parallel torch op here hangs with more than
    # one thread (torch's own behaviour, after any parallel op in the parent). Under our OpenMP
    # layer the fork handler has set one thread; otherwise do what DataLoader workers do.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    y = torch.randn(1500, 1500)
    float((y @ y).sum() + (y * 2).sum())
    q.put((check(), cpu_runtime.serial(), threads))


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor(check())


if __name__ == "__main__":
    torch.set_num_threads(2)  # so that the child's torch op would go parallel
    with batchnorm.use_backend("numba"):
        parent_err = check()
        layer = numba.threading_layer()
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        p.join(240)
        if p.is_alive():
            p.kill()
            sys.exit("forked child hung")
        child_err, child_serial, child_threads = q.get(timeout=10) if p.exitcode == 0 else (None, None, None)
        loader = torch.utils.data.DataLoader(
            Data(), batch_size=None, num_workers=2, multiprocessing_context=ctx, timeout=240
        )
        loader_err = [float(e) for e in loader]
        print(json.dumps(dict(layer=layer, parent=parent_err, exitcode=p.exitcode, child=child_err,
                              child_serial=child_serial, child_threads=child_threads, loader=loader_err, parent_serial=cpu_runtime.serial())))
"""


@pytest.mark.parametrize("layer", [None, "workqueue"])
def test_fork_after_kernel_launch(tmp_path, layer):
    """A process forked after a kernel launch (multiprocessing 'fork', DataLoader workers) runs
    our BN correctly and neither hangs nor is killed, under the default threading layer and a
    user-set one (which wins). Under numba's GNU OpenMP layer, numba would terminate the child
    at its first parallel launch: the child must run the serial kernels. In a subprocess with a
    timeout, so a hang fails the test instead of hanging the run."""
    src = Path(batchnorm.__file__).resolve().parents[1]
    script = tmp_path / "fork_check.py"
    script.write_text(_FORK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env["PYTHONPATH"] = str(src)
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    expected = layer if layer is not None else ("omp" if cpu_runtime.omp_usable() else "workqueue")
    assert res["layer"] == expected
    assert res["exitcode"] == 0, out.stderr[-3000:]
    assert res["child_serial"] is (expected == "omp")
    assert res["child_threads"] == (1 if expected == "omp" else 2)
    assert res["parent_serial"] is False
    assert len(res["loader"]) == 4
    for err in [res["parent"], res["child"], *res["loader"]]:
        assert err < 1e-4


def test_module_default_cpu_path_is_numba():
    m = batchnorm.BatchNorm2d(3)
    x = torch.randn(8, 3, 80, 80)
    with batchnorm.use_backend("auto"):
        assert dispatch.backend_for(x) is cpu
        y = m(x)
    with batchnorm.use_backend("torch"):
        m2 = batchnorm.BatchNorm2d(3)
        y2 = m2(x)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.running_var, m2.running_var, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# 16-bit inputs run natively (16-bit loads widened to float32 in registers, outputs rounded once)

HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
"""Half the spacing of 16-bit values in [1, 2): one rounding of an exact result is within this
relative error."""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("shape", "fmt"),
    [
        ((2, 3, 96, 96), torch.contiguous_format),  # ncs, within-channel units, parallel
        ((4, 16, 12, 12), torch.contiguous_format),  # ncs, fused per-channel forward
        ((64, 24, 5, 5), torch.contiguous_format),  # short rows: (N, C*S) row kernels
        ((8, 24, 16, 16), torch.channels_last),  # mc
    ],
)
def test_half_kernels_round_the_float64_result_once(dtype, shape, fmt, monkeypatch):
    """y and dx of bfloat16/float16 inputs equal the float64 reference (of the same 16-bit input
    values) rounded once to the dtype: within one rounding (half an ulp) plus float32 noise; the
    statistics and dgamma/dbeta are float32-accurate; dtype and memory format are kept."""
    c = shape[1]
    x = make_input(shape, fmt, dtype)
    monkeypatch.setattr(cpu_runtime, "threads", lambda: 2)  # work split as on 2 threads (fusion: C >= 8)
    if shape == (4, 16, 12, 12):
        assert cpu._fuse_ncs(4, 16, 144, 2)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    w = torch.rand(c) + 0.5
    b = torch.randn(c)
    y, mean, var = cpu.train_forward(x, w, b, 1e-5)
    dx, dw, db = cpu.backward(g, x, mean, torch.rsqrt(var.double() + 1e-5), w)
    ev = cpu.eval_forward(x, mean, var, w, b, 1e-5)
    ey, emean, evar, x_hat = ref_train(f64(x), f64(w), f64(b), 1e-5)
    edx, edw, edb = ref_backward(f64(g), x_hat, evar, f64(w), 1e-5)
    for t in (y, dx, ev):
        assert t.dtype == dtype
        assert t.is_contiguous(memory_format=fmt)
    for t, e, name in ((y, ey, "y"), (ev, ey, "eval"), (dx, edx, "dx")):
        err = np.abs(f64(t) - e)
        bound = HALF_ULP[dtype] * np.abs(e) + 1e-5 * np.max(np.abs(e))
        assert np.all(err <= bound), f"{name}: worst excess {np.max(err - bound):.3e}"
    np.testing.assert_allclose(f64(mean), emean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f64(var), evar, rtol=1e-5)
    for t, e, name in ((dw, edw, "dgamma"), (db, edb, "dbeta")):
        assert np.max(np.abs(f64(t) - e)) <= 1e-5 * np.max(np.abs(e)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_half_kernels_propagate_nan_and_inf(dtype, fmt):
    """A NaN or inf in one channel makes that channel's statistics and outputs non-finite (NaN
    stays NaN through the 16-bit rounding); the other channels are unaffected."""
    shape = (4, 3, 8, 8)
    x = make_input(shape, torch.contiguous_format, dtype)
    x[1, 0, 2, 3] = float("nan")
    x[2, 2, 0, 0] = float("inf")
    x = x.contiguous(memory_format=fmt)
    y, mean, var = cpu.train_forward(x, None, None, 1e-5)
    assert torch.isnan(y[:, 0]).all()
    assert not torch.isfinite(mean[2])
    assert not torch.isfinite(y[:, 2]).any()
    ey, emean, evar, _ = ref_train(f64(x[:, 1:2]), np.ones(1), np.zeros(1), 1e-5)
    err = np.abs(f64(y[:, 1:2]) - ey)
    assert np.all(err <= HALF_ULP[dtype] * np.abs(ey) + 1e-5 * np.max(np.abs(ey)))


def test_half_kernels_read_16bit_storage_without_float32_copies(monkeypatch):
    """The 16-bit path never casts to float32 (the old path did, costing more than the kernels)."""

    def refuse(x):
        raise AssertionError("float32 copy made")

    monkeypatch.setattr(cpu_plan, "as_native", refuse)
    x = make_input((2, 3, 8, 8), torch.contiguous_format, torch.bfloat16)
    y, mean, var = cpu.train_forward(x, None, None, 1e-5)
    cpu.backward(x, x, mean, torch.rsqrt(var.double() + 1e-5), None)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (2, 3, 96, 96), (3, 2, 130, 70)])
def test_ncs_statistics_large_mean_and_outlier_first_values(shape):
    """The (N, C, S) statistics (units of long rows, float32 sums around each unit's first value,
    then around its float32-rounded mean) keep float32 precision for mean 1e4 / std 1e-2, also
    when every row starts with a 6-sigma outlier (the worst shift for the first pass)."""
    x = make_input(shape, torch.contiguous_format, torch.float32, loc=1e4, spread=1e-2)
    x[:, :, 0, 0] = 1e4 + 6e-2
    assert cpu_plan.plan(x, "ncs")[0] == "ncs"
    y, mean, var = cpu.train_forward(x, None, None, 1e-8)
    ey, emean, evar, _ = ref_train(f64(x), np.ones(shape[1]), np.zeros(shape[1]), 1e-8)
    np.testing.assert_allclose(f64(mean), emean, rtol=1e-9)
    np.testing.assert_allclose(f64(var), evar, rtol=2e-6)
    assert np.max(np.abs(f64(y) - ey)) < 1e-4


def test_fused_and_unfused_ncs_forward_agree_with_reference(monkeypatch):
    """The per-channel fused training forward (channel in L2) and the two-kernel path give the
    reference result; forcing the unfused path changes rounding only."""
    shape = (4, 16, 40, 40)
    x = make_input(shape, torch.contiguous_format, torch.float32)
    w = torch.rand(16) + 0.5
    b = torch.randn(16)
    monkeypatch.setattr(cpu_runtime, "threads", lambda: 2)  # work split as on 2 threads (fusion: C >= 8)
    assert cpu._fuse_ncs(4, 16, 1600, 4)
    fused = cpu.train_forward(x, w, b, 1e-5)
    monkeypatch.setattr(cpu, "_FUSE_BYTES", 0)
    assert not cpu._fuse_ncs(4, 16, 1600, 4)
    unfused = cpu.train_forward(x, w, b, 1e-5)
    ey, emean, evar, _ = ref_train(f64(x), f64(w), f64(b), 1e-5)
    for got in (fused, unfused):
        for t, e, name in zip(got, (ey, emean, evar), ("y", "mean", "var")):
            assert_near(t, e, torch.float32, name)


def test_float16_without_hardware_conversion_goes_to_torch_ops(monkeypatch):
    """On a CPU without F16C (numba could not link the float16 conversions) float16 inputs are
    not claimed by the kernels: dispatch uses torch_ops, and a direct call says why."""
    x = make_input((4, 3, 8, 8), torch.contiguous_format, torch.float16)
    assert cpu_plan.float16_native()  # this test machine (x86 with F16C), see the bench notes
    with batchnorm.use_backend("numba"):  # (every size goes to the kernels if supported)
        assert cpu.supports(x)
        monkeypatch.setitem(cpu_plan._features, "f16", False)
        assert not cpu.supports(x)
        assert cpu.supports(x.to(torch.bfloat16))
        assert dispatch.backend_for(x) is torch_ops
        y = batchnorm.batch_norm(x, None, None, None, None, training=True)
    ey, _, _, _ = ref_train(f64(x), np.ones(3), np.zeros(3), 1e-5)
    assert_near(y, ey, torch.float16, "y")
    with pytest.raises(ValueError, match="F16C"):
        cpu.train_forward(x, None, None, 1e-5)


# ---------------------------------------------------------------------------------------------
# Split entry points (SyncBatchNorm): batch_stats, backward_sums, backward_apply on both
# back-ends, against the NumPy float64 reference

SPLIT_CASES = [*CASES, ((2, 3, 9, 9), torch.contiguous_format), ((3, 2, 4, 100), torch.contiguous_format)]
SPLIT_IDS = [f"{'x'.join(map(str, s))}-{str(f).split('.')[-1]}" for s, f in SPLIT_CASES]
SPLIT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["torch_ops", "cpu"])
def module(request):
    """The back-end module itself; "numba" so that the kernels run at every size."""
    with batchnorm.use_backend("numba"):
        yield torch_ops if request.param == "torch_ops" else cpu


def _ref_sums(g: np.ndarray, x: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum g, sum g * (x - mean), sum |g * (x - mean)|) per channel in float64."""
    gm = _to_mc(g)  # (M, C)
    prod = gm * (_to_mc(x) - mean)
    return gm.sum(axis=0), prod.sum(axis=0), np.abs(prod).sum(axis=0)


@pytest.mark.parametrize("dtype", SPLIT_DTYPES)
@pytest.mark.parametrize(("shape", "fmt"), SPLIT_CASES, ids=SPLIT_IDS)
def test_batch_stats_matches_reference(module, shape, fmt, dtype, monkeypatch):
    x = make_input(shape, fmt, dtype)
    if module is cpu:
        y, mean_fused, var_fused = cpu.train_forward(x, None, None, 1e-5)

        def no_output(*args, **kwargs):
            raise AssertionError("batch_stats allocated an output")

        monkeypatch.setattr(cpu_runtime, "empty_like", no_output)
    mean, var = module.batch_stats(x)
    emean, evar = reference.moments(f64(x))
    assert mean.dtype == torch.float64
    assert var.dtype == torch_ops.acc_dtype(dtype)
    # the inputs are exact in float64; the statistics are accumulated in float32 or better
    tol = torch.float64 if dtype == torch.float64 else torch.float32
    assert_near(mean, emean, tol, "mean")
    assert_near(var, evar, tol, "var")
    if module is cpu:  # the same statistics pass as the training forward
        torch.testing.assert_close(mean, mean_fused, rtol=1e-15, atol=0.0)
        torch.testing.assert_close(var, var_fused, rtol=1e-6 if dtype != torch.float64 else 1e-15, atol=0.0)


@pytest.mark.parametrize("dtype", SPLIT_DTYPES)
@pytest.mark.parametrize(("shape", "fmt"), SPLIT_CASES, ids=SPLIT_IDS)
def test_backward_split_matches_reference(module, shape, fmt, dtype):
    """sums around a given mean; dx from given global means; composed, they are the BN backward."""
    c = shape[1]
    x = make_input(shape, fmt, dtype)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype)
    eps = 1e-3
    xd, gd, wd = f64(x), f64(g), f64(w)
    emean, evar = reference.moments(xd)
    inv = 1.0 / np.sqrt(evar + eps)
    tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]  # float32 accumulation

    # 1) sums around a mean that is not the batch mean (a global mean of several ranks)
    given = emean + 0.3 * np.sqrt(evar) * np.linspace(-1.0, 1.0, c)
    sum_g, sum_gxc = module.backward_sums(g, x, torch.from_numpy(given))
    assert sum_g.dtype == sum_gxc.dtype == torch.float64
    e_g, e_gxc, e_abs = _ref_sums(gd, xd, given)
    e_gabs = np.abs(_to_mc(gd)).sum(axis=0)
    assert np.all(np.abs(f64(sum_g) - e_g) <= tol * np.maximum(e_gabs, 1.0)), "sum g"
    assert np.all(np.abs(f64(sum_gxc) - e_gxc) <= tol * np.maximum(e_abs, 1.0)), "sum g*(x - mean)"

    # 2) apply with arbitrary per-channel means (not from this batch)
    mg = np.linspace(-0.5, 0.7, c)
    mgx = np.linspace(0.9, -0.4, c)
    dx = module.backward_apply(
        g, x, torch.from_numpy(given), torch.from_numpy(inv), w, torch.from_numpy(mg), torch.from_numpy(mgx)
    )
    assert dx.dtype == dtype
    if module is cpu:
        assert dx.stride() == x.stride()
    shp = (1, -1) + (1,) * (len(shape) - 2)
    x_hat = (xd - given.reshape(shp)) * inv.reshape(shp)
    edx = (wd * inv).reshape(shp) * (gd - mg.reshape(shp) - x_hat * mgx.reshape(shp))
    assert_near(dx, edx, dtype, "dx (given means)")

    # 3) composed with the batch's own mean: the BN backward of batchnorm.reference
    m = x.numel() // c
    sum_g, sum_gxc = module.backward_sums(g, x, torch.from_numpy(emean))
    invstd = torch.from_numpy(inv)
    dx = module.backward_apply(g, x, torch.from_numpy(emean), invstd, w, sum_g / m, sum_gxc * invstd / m)
    rdx, rdw, rdb = reference.backward(gd, xd, wd, eps)
    assert_near(dx, rdx, dtype, "dx")
    assert_near(sum_gxc * invstd, rdw, torch.float32 if dtype != torch.float64 else dtype, "dgamma")
    assert_near(sum_g, rdb, torch.float32 if dtype != torch.float64 else dtype, "dbeta")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_split_entry_points_large_mean_small_spread_float32(module, fmt):
    """mean 1e4, std 1e-2 in float32: statistics, sums and dx keep the spread's precision."""
    shape = (8, 3, 9, 9)
    x = make_input(shape, fmt, torch.float32, loc=1e4, spread=1e-2)
    g = torch.randn(shape).contiguous(memory_format=fmt)
    w = torch.tensor([0.5, 1.0, 2.0])
    eps = 1e-8
    xd, gd = f64(x), f64(g)
    emean, evar = reference.moments(xd)
    mean, var = module.batch_stats(x)
    np.testing.assert_allclose(f64(mean), emean, rtol=1e-9)  # float64 mean: no float32 rounding
    np.testing.assert_allclose(f64(var), evar, rtol=1e-5)
    # around a float64 mean that float32 cannot represent (a global mean of other ranks)
    given = emean + 3.3e-5
    sum_g, sum_gxc = module.backward_sums(g, x, torch.from_numpy(given))
    e_g, e_gxc, e_abs = _ref_sums(gd, xd, given)
    assert np.all(np.abs(f64(sum_gxc) - e_gxc) <= 1e-5 * e_abs), (f64(sum_gxc), e_gxc)
    np.testing.assert_allclose(f64(sum_g), e_g, rtol=1e-5)
    m = x.numel() // 3
    inv = torch.from_numpy(1.0 / np.sqrt(evar + eps))
    sum_g, sum_gxc = module.backward_sums(g, x, torch.from_numpy(emean))
    dx = module.backward_apply(g, x, torch.from_numpy(emean), inv, w, sum_g / m, sum_gxc * inv / m)
    rdx, _, _ = reference.backward(gd, xd, f64(w), eps)
    assert np.max(np.abs(f64(dx) - rdx)) / np.max(np.abs(rdx)) < 1e-4


def test_split_entry_points_grad_layout_differs_from_input():
    """cpu.backward_sums/backward_apply with an NCHW grad for a channels_last input."""
    x = make_input((2, 4, 3, 5), torch.channels_last, torch.float64)
    g = torch.randn(2, 4, 3, 5, dtype=torch.float64)  # NCHW
    emean, evar = reference.moments(f64(x))
    sum_g, sum_gxc = cpu.backward_sums(g, x, torch.from_numpy(emean))
    e_g, e_gxc, _ = _ref_sums(f64(g), f64(x), emean)
    assert_near(sum_g, e_g, torch.float64, "sum g")
    assert_near(sum_gxc, e_gxc, torch.float64, "sum g*(x - mean)")
    inv = torch.from_numpy(1.0 / np.sqrt(evar + 1e-5))
    dx = cpu.backward_apply(g, x, torch.from_numpy(emean), inv, None, sum_g / 30, sum_gxc * inv / 30)
    assert_near(dx, reference.backward(f64(g), f64(x), None, 1e-5)[0], torch.float64, "dx")
    with pytest.raises(ValueError, match="grad_y of shape"):
        cpu.backward_sums(g[:1], x, torch.from_numpy(emean))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_and_unfused_ncs_backward_agree_with_reference(monkeypatch, dtype):
    """The per-channel fused backward (g and x of a channel in L2) gives the two-kernel path's
    results bit for bit (same units, same order of operations), and the reference's."""
    shape = (4, 16, 32, 64)  # rows of 2048 values: >= 4 KiB for every dtype tested
    x = make_input(shape, torch.contiguous_format, dtype, loc=3.0)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    w = torch.rand(16, dtype=torch.float64) + 0.5
    monkeypatch.setattr(cpu_runtime, "threads", lambda: 2)  # work split as on 2 threads (fusion: C >= 8)
    _, mean, var = cpu.train_forward(x, None, None, 1e-5)
    invstd = torch.rsqrt(var.double() + 1e-5)
    mean32 = mean.to(torch.float32)  # a rounded mean: both paths refine it from x
    assert cpu._fuse_bwd_ncs(4, 16, 2048, x.element_size())
    assert not cpu._fuse_bwd_ncs(4, 16, 196, 4)  # short rows (14x14): the two-kernel path
    fused = cpu.backward(g, x, mean32, invstd, w)
    monkeypatch.setattr(cpu, "_FUSE_BWD_BYTES", 0)
    assert not cpu._fuse_bwd_ncs(4, 16, 2048, x.element_size())
    unfused = cpu.backward(g, x, mean32, invstd, w)
    for a, b in zip(fused, unfused):
        assert torch.equal(a, b)
    _, _, evar, x_hat = ref_train(f64(x), np.ones(16), np.zeros(16), 1e-5)
    dx, dw, db = ref_backward(f64(g), x_hat, evar, f64(w), 1e-5)
    tol = dtype if dtype == torch.float64 else torch.float32
    assert_near(fused[0], dx, dtype, "dx")
    assert_near(fused[1], dw, tol, "dgamma")
    assert_near(fused[2], db, tol, "dbeta")
