"""BatchNormAct: fused BN + invertible activation that saves only its output.

Run: PYTHONPATH=src python -m pytest -q tests/test_act.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from batchnorm.functional_act import GAMMA_GUARD, batch_norm_act

ACTS = [("leaky_relu", 0.1, 1.0), ("elu", 0.01, 0.7), ("identity", 0.01, 1.0)]


@pytest.fixture(params=["torch", "numba", "auto"])  # auto: small tensors run on cpu_small
def backend(request) -> str:
    with batchnorm.use_backend(request.param):
        yield request.param


def torch_act(y: torch.Tensor, activation: str, slope: float, alpha: float) -> torch.Tensor:
    if activation == "leaky_relu":
        return F.leaky_relu(y, slope)
    if activation == "elu":
        return F.elu(y, alpha)
    return y


def reference(x, w, b, activation, slope, alpha, eps=1e-5):
    """torch's own batch_norm followed by torch's activation (differentiable)."""
    y = F.batch_norm(x, None, None, w, b, training=True, eps=eps)
    return torch_act(y, activation, slope, alpha)


@pytest.mark.parametrize(("activation", "slope", "alpha"), ACTS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_gradcheck_float64(backend, activation, slope, alpha, fmt):
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    w = torch.tensor([0.7, -1.3, 2.0, 0.4], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, activation, slope, alpha)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize(("activation", "slope", "alpha"), ACTS)
@pytest.mark.parametrize(
    ("shape", "fmt"),
    [
        ((16, 5), torch.contiguous_format),
        ((4, 5, 6), torch.contiguous_format),
        ((3, 5, 4, 4), torch.channels_last),
        ((2, 5, 2, 3, 3), torch.contiguous_format),
        ((2, 3, 8, 9), torch.contiguous_format),  # long rows: the (N, C, S) kernels
    ],
)
def test_matches_bn_then_activation(backend, activation, slope, alpha, shape, fmt):
    """Output and all gradients equal torch BN followed by the activation (float64)."""
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).contiguous(memory_format=fmt)
    c = shape[1]
    w = torch.linspace(-2.0, 2.0, c, dtype=torch.float64) + 0.05
    b = torch.linspace(-0.5, 0.5, c, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    outs = []
    for fn in (
        lambda x, w, b: batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, activation, slope, alpha),
        lambda x, w, b: reference(x, w, b, activation, slope, alpha),
    ):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        z = fn(xs, ws, bs)
        z.backward(g)
        outs.append((z, xs.grad, ws.grad, bs.grad))
    for ours, theirs, name in zip(outs[0], outs[1], ("z", "dx", "dweight", "dbias")):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-9, msg=name)
    assert outs[0][0].stride() == outs[1][0].stride()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_large_input_multithreaded_path(fmt):
    """A tensor above the kernels' small-work threshold (all threads) under the auto back-end."""
    from batchnorm._kernels import cpu, cpu_runtime

    shape = (4, 8, 64, 64)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).contiguous(memory_format=fmt)
    assert x.numel() >= max(cpu_runtime.SMALL_WORK, cpu.AUTO_MIN_NUMEL)
    w = torch.linspace(-1.5, 1.5, 8, dtype=torch.float64) + 0.01
    b = torch.linspace(-0.3, 0.3, 8, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    outs = []
    for fn in (
        lambda x, w, b: batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, "leaky_relu", 0.05, 1.0),
        lambda x, w, b: reference(x, w, b, "leaky_relu", 0.05, 1.0),
    ):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        z = fn(xs, ws, bs)
        z.backward(g)
        outs.append((z, xs.grad, ws.grad, bs.grad))
    for ours, theirs in zip(*outs):
        torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("gamma0", [0.0, 1e-7, -1e-6])
def test_tiny_gamma_falls_back_to_exact_gradients(backend, gamma0):
    """|gamma| below the guard: x_hat is not recomputed from z, and gradients stay exact."""
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    w = torch.tensor([gamma0, 1.0, -0.5], dtype=torch.float64)
    b = torch.tensor([0.3, 0.0, 0.1], dtype=torch.float64)
    assert abs(gamma0) < GAMMA_GUARD
    g = torch.randn(6, 3, 4, dtype=torch.float64)
    grads = []
    for fn in (
        lambda x, w, b: batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, "leaky_relu", 0.01, 1.0),
        lambda x, w, b: reference(x, w, b, "leaky_relu", 0.01, 1.0),
    ):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        fn(xs, ws, bs).backward(g)
        grads.append((xs.grad, ws.grad, bs.grad))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-9)
    assert grads[0][1][0].abs() > 1e-3  # dgamma of the gamma ~ 0 channel is not lost


def _saved_bytes(fn, *args) -> tuple[int, list[torch.Tensor]]:
    """Bytes of the distinct storages autograd saves while running fn(*args)."""
    seen: dict[int, int] = {}
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), packed + [out]


def test_saves_only_the_output(backend):
    x = torch.randn(8, 16, 8, 8, requires_grad=True)
    bn = torch.nn.BatchNorm2d(16)
    act = batchnorm.BatchNormAct2d(16, "leaky_relu")
    theirs, _ = _saved_bytes(lambda t: F.leaky_relu(bn(t), 0.01), x)
    ours, packed = _saved_bytes(act, x)
    z = packed[-1]
    big = [t for t in packed[:-1] if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == z.data_ptr()  # the output itself, not x
    assert ours <= 0.55 * theirs, (ours, theirs)


def test_module_matches_bn_plus_leaky_and_loads_torch_checkpoint(backend):
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm2d(6, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 6))
        bn.bias.copy_(torch.linspace(-1, 1, 6))
    ours = batchnorm.BatchNormAct2d(6, "leaky_relu", negative_slope=0.02, momentum=0.3)
    ours.load_state_dict(bn.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(bn.state_dict())
    for _ in range(3):
        x = torch.randn(4, 6, 5, 5) * 2 + 1
        xa = x.clone().requires_grad_()
        xt = x.clone().requires_grad_()
        za = ours(xa)
        zt = F.leaky_relu(bn(xt), 0.02)
        g = torch.randn_like(zt)
        za.backward(g)
        zt.backward(g)
        torch.testing.assert_close(za, zt, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xa.grad, xt.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, bn.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, bn.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, bn.running_var, atol=1e-6, rtol=1e-5)
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    ours.eval()
    bn.eval()
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(ours(x), F.leaky_relu(bn(x), 0.02), atol=1e-5, rtol=1e-5)
    # and back: our checkpoint into a plain torch BN
    bn2 = torch.nn.BatchNorm2d(6)
    bn2.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(bn2.running_var, ours.running_var)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype):
    x = torch.randn(4, 3, 6, 6).to(dtype)
    w = torch.tensor([1.0, -0.7, 1.5]).to(dtype)
    b = torch.tensor([0.1, 0.0, -0.2]).to(dtype)
    g = torch.randn(4, 3, 6, 6).to(dtype)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    z = batch_norm_act(xs, None, None, ws, bs, True, 0.1, 1e-5, "leaky_relu", 0.01, 1.0)
    z.backward(g)
    xr, wr, br = (t.float().requires_grad_() for t in (x, w, b))
    zr = reference(xr, wr, br, "leaky_relu", 0.01, 1.0)
    zr.backward(g.float())
    assert z.dtype == xs.grad.dtype == ws.grad.dtype == dtype
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    for ours, theirs in ((z, zr), (xs.grad, xr.grad), (ws.grad, wr.grad), (bs.grad, br.grad)):
        scale = max(1.0, theirs.abs().max().item())
        assert (ours.float() - theirs).abs().max().item() <= tol * scale


def test_validation_messages():
    with pytest.raises(ValueError, match="relu.*not supported.*cannot be recomputed"):
        batchnorm.BatchNormAct2d(4, "relu")
    with pytest.raises(ValueError, match="negative_slope > 0"):
        batchnorm.BatchNormAct2d(4, "leaky_relu", negative_slope=0.0)
    with pytest.raises(ValueError, match="alpha > 0"):
        batchnorm.BatchNormAct1d(4, "elu", alpha=-1.0)
    with pytest.raises(ValueError, match="expected activation in"):
        batchnorm.BatchNormAct3d(4, "gelu")
    with pytest.raises(ValueError, match="expected 4D"):
        batchnorm.BatchNormAct2d(4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="relu"):
        batch_norm_act(torch.randn(4, 3), None, None, training=True, activation="relu")


def test_nonfinite_batch_keeps_running_stats():
    m = batchnorm.BatchNormAct1d(3)
    x = torch.randn(8, 3)
    x[0, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match="not finite"):
        m(x)
    assert torch.equal(m.running_mean, torch.zeros(3))
    assert torch.equal(m.running_var, torch.ones(3))
    assert int(m.num_batches_tracked) == 0


def test_eval_and_untracked_modes():
    m = batchnorm.BatchNormAct3d(2, "elu", alpha=0.5, track_running_stats=False)
    x = torch.randn(3, 2, 2, 3, 3)
    m.eval()  # no running stats: batch statistics, as torch
    torch.testing.assert_close(
        m(x), F.elu(F.batch_norm(x, None, None, m.weight, m.bias, True), 0.5), atol=1e-5, rtol=1e-5
    )
    assert "activation=elu, alpha=0.5" in repr(m)
