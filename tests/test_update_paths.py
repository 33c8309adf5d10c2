"""The running-statistics rule on every path that can execute it.

One rule (momentum EMA with the unbiased batch variance, ``momentum=None`` as the cumulative
average, a batch with non-finite statistics written nowhere but counted in
``num_batches_skipped``), several implementations: the compiled host update behind the eager
path (after aten's kernel under the default back-end, after ours under ``numba``), its NumPy
form without numba, torch ops on the device (16-bit running buffers take it on CPU), the
operator under ``vmap`` with stacked buffers, the ``native`` back-end, and the code Inductor
makes under ``torch.compile``. Each is checked against a float64 NumPy model of the rule, batch
by batch.

Run: PYTHONPATH=src python -m pytest -q tests/test_update_paths.py
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

import batchnorm
from batchnorm.ops import update as bn_ops

C = 3


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    good = [torch.randn(6, C, generator=gen) * 2 + 1, torch.randn(9, C, generator=gen) - 3]
    bad = torch.randn(6, C, generator=gen)
    bad[2, 1] = float("nan")
    return [good[0], bad, good[1]]


def _model(batches: list[torch.Tensor], momentum: float | None) -> dict[str, np.ndarray | int]:
    """The rule in float64 NumPy: skip non-finite batches, EMA (or cumulative) otherwise."""
    rm, rv, tracked, skipped = np.zeros(C), np.ones(C), 0, 0
    for x in batches:
        a = x.double().numpy()
        mean, var = a.mean(0), a.var(0, ddof=1)
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            skipped += 1
            continue
        f = momentum if momentum is not None else 1.0 / (tracked + 1)
        rm, rv, tracked = (1 - f) * rm + f * mean, (1 - f) * rv + f * var, tracked + 1
    return {"running_mean": rm, "running_var": rv, "tracked": tracked, "skipped": skipped}


def _check(got: dict[str, torch.Tensor], want: dict[str, np.ndarray | int], rtol: float) -> None:
    np.testing.assert_allclose(got["running_mean"].double().numpy(), want["running_mean"], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(got["running_var"].double().numpy(), want["running_var"], rtol=rtol, atol=rtol)
    assert int(got["tracked"]) == want["tracked"]
    assert int(got["skipped"]) == want["skipped"]


def _run_layer(
    layer: torch.nn.Module, batches: list[torch.Tensor], dtype: torch.dtype, call: Callable | None = None
) -> dict[str, torch.Tensor]:
    """``batches`` through ``layer`` in training (forward and backward); ``call``: how to call it."""
    layer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped batch warns once (on CPU)
        for x in batches:
            (layer if call is None else call)(x.to(dtype).requires_grad_()).sum().backward()
    return {
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
        "tracked": layer.num_batches_tracked,
        "skipped": layer.num_batches_skipped,
    }


def _eager(backend: str) -> Callable[[float | None], dict[str, torch.Tensor]]:
    def run(momentum: float | None) -> dict[str, torch.Tensor]:
        with batchnorm.use_backend(backend):
            return _run_layer(batchnorm.BatchNorm1d(C, momentum=momentum), _batches(), torch.float32)

    return run


def _without_numba(momentum: float | None) -> dict[str, torch.Tensor]:
    saved = dict(bn_ops._HOST)
    bn_ops._HOST["kernels"] = None  # as without numba: the NumPy form
    try:
        return _eager("auto")(momentum)
    finally:
        bn_ops._HOST.clear()
        bn_ops._HOST.update(saved)


def _compiled(momentum: float | None) -> dict[str, torch.Tensor]:
    """The layer under ``torch.compile`` (fullgraph): Inductor compiles the update with the step."""
    layer = batchnorm.BatchNorm1d(C, momentum=momentum)
    torch._dynamo.reset()
    return _run_layer(layer, _batches(), torch.float32, torch.compile(layer, fullgraph=True))


def _half_buffers(momentum: float | None) -> dict[str, torch.Tensor]:
    layer = batchnorm.BatchNorm1d(C, momentum=momentum).double()
    layer.running_mean = layer.running_mean.to(torch.bfloat16)
    layer.running_var = layer.running_var.to(torch.bfloat16)
    return _run_layer(layer, _batches(), torch.float64)


def _vmap_stacked(momentum: float | None) -> dict[str, torch.Tensor]:
    """Two copies of the layer under vmap, stacked buffers: copy 0 sees the batches, copy 1 their
    negation (the same variance, the mean negated); copy 0 is returned."""
    models = [batchnorm.BatchNorm1d(C, momentum=momentum) for _ in range(2)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def step(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x in _batches():
            vmap(step)(params, buffers, torch.stack([x, -x]))
    torch.testing.assert_close(buffers["running_mean"][1], -buffers["running_mean"][0])
    return {
        "running_mean": buffers["running_mean"][0],
        "running_var": buffers["running_var"][0],
        "tracked": buffers["num_batches_tracked"][0],
        "skipped": buffers["num_batches_skipped"][0],
    }


PATHS = {
    "eager-aten": (_eager("auto"), 1e-6),
    "eager-numba": (_eager("numba"), 1e-6),
    "eager-torch-ops": (_eager("torch"), 1e-6),
    "native": (_eager("native"), 1e-6),
    "host-numpy": (_without_numba, 1e-6),
    "device-16-bit-buffers": (_half_buffers, 1e-2),
    "dispatcher-vmap": (_vmap_stacked, 1e-6),
    "torch-compile": (_compiled, 1e-6),
}


@pytest.mark.parametrize("momentum", [0.3, None], ids=["m0.3", "cumulative"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_update_rule(path: str, momentum: float | None) -> None:
    run, rtol = PATHS[path]
    _check(run(momentum), _model(_batches(), momentum), rtol)


def test_host_update_is_the_compiled_kernel() -> None:
    """The eager path's update is the compiled one when numba is there (the NumPy form is the
    fallback that host-numpy above checks)."""
    _eager("auto")(0.1)
    kernels = bn_ops._HOST.get("kernels")
    assert kernels is not None and kernels.__name__.endswith("cpu_small")


def _cuda_style_eval(x, weight, bias, mean, var, momentum, eps):  # noqa: ANN001, ANN202
    """aten's eval kernel as CUDA computes it, in float32: ``(x - mean) * (invstd * weight) + bias``
    (the CPU kernel forms ``x * alpha + beta`` instead, which loses a folded residual)."""
    scale = torch.rsqrt(var + eps) * (1.0 if weight is None else weight)
    y = (x - mean) * scale + (0.0 if bias is None else bias)
    return y, x.new_empty(0), x.new_empty(0)


def _eval_far_from_zero() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mean = torch.full((4,), 100.0, dtype=torch.float64) + 3e-6  # 100 is exact in float32, 3e-6 is lost
    var = torch.ones(4, dtype=torch.float64)
    x = (mean.float() + torch.randn(64, 4, generator=gen)).float()
    return x, mean, var


def test_native_eval_folds_the_float64_mean_residual(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eval on aten's kernel with a float64 mean and float32 input: the mean's float32 rounding
    residual is folded into the bias, so with CUDA's formula the output matches float64 to
    float32 precision (without the fold the error is residual / std = 3e-6 here). The kernel is
    modelled in float32 on CPU; tests/test_kernels_native.py runs the real one on a GPU."""
    from batchnorm._kernels import native

    monkeypatch.setattr(native._aten, "_native_batch_norm_legit_no_training", _cuda_style_eval)
    x, mean, var = _eval_far_from_zero()
    y = native.eval_forward(x, mean, var, None, None, 0.0)
    torch.testing.assert_close(y.double(), (x.double() - mean) / var.sqrt(), rtol=0, atol=5e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_native_eval_folds_the_residual_on_cuda() -> None:
    from batchnorm._kernels import native

    x, mean, var = (t.cuda() for t in _eval_far_from_zero())
    y = native.eval_forward(x, mean, var, None, None, 0.0)
    torch.testing.assert_close(y.double(), (x.double() - mean) / var.sqrt(), rtol=0, atol=5e-7)
