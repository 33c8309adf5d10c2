"""The compiled eager step (`batchnorm._kernels.step_ext`) against its Python form, bit for bit,
and the layers with it against the layers without it.

The two forms of the step (`batchnorm.ops.bn.aten_step_py` and the C++ ``train_step``) share
one contract: (y, save_mean, save_invstd, code) with the running statistics and
num_batches_tracked changed only for an accepted batch. Both run aten's kernel, so every output
must be identical, not merely close. The compiled form is built here when a compiler is
available (and skipped, saying why, when not); the rest of the suite runs whichever form the
installation has.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import batchnorm
from batchnorm._kernels import native, step_ext
from batchnorm._kernels.dispatch import host_kernels
from batchnorm.ops import aten_step as bn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ext() -> ModuleType:
    module = step_ext.load()
    if module is None and os.environ.get("BATCHNORM_EXT", "1") != "0":
        try:
            step_ext.build()
        except (RuntimeError, OSError, ImportError) as err:
            pytest.skip(f"the C++ eager step cannot be compiled here: {str(err).splitlines()[0]}")
        module = step_ext.load()
    if module is None:
        pytest.skip(step_ext.status())
    return module


def _state(c: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.5, torch.tensor(3)


def _input(shape: tuple[int, ...], dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    if kind == "nan":
        x[0, 1] = float("nan")
    elif kind == "inf":
        x[-1, 0] = float("inf")
    elif kind == "ill":  # |mean| / std = 1e6: beyond aten's precision in float32 and float64's limit
        x = 1e4 + 1e-2 * x if dtype == torch.float32 else 1e12 + 1e-2 * x
    elif kind == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


CASES = [
    ((8, 16), "plain"),
    ((5, 3, 7), "plain"),
    ((2, 3, 4, 4), "plain"),
    ((2, 3, 4, 4), "channels_last"),
    ((2, 3, 2, 2, 2), "plain"),
    ((8, 4), "nan"),
    ((8, 4), "inf"),
    ((8, 4), "ill"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("shape", "kind"), CASES, ids=[f"{'x'.join(map(str, s))}-{k}" for s, k in CASES])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
@pytest.mark.parametrize("mode", ["update", "recompute", "no-stats"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_train_step_forms_agree_bit_for_bit(
    ext: ModuleType,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    kind: str,
    momentum: float | None,
    mode: str,
    affine: bool,
) -> None:
    c = shape[1]
    outs = []
    for step in (ext.train_step, bn.aten_step_py):
        x = _input(shape, dtype, kind, 0).requires_grad_()
        g = torch.Generator().manual_seed(1)
        w = (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_() if affine else None
        b = torch.randn(c, generator=g, dtype=dtype).requires_grad_() if affine else None
        rm, rv, nbt = _state(c, dtype, 2)
        stats = mode != "no-stats"
        y, save_mean, save_invstd, code = step(
            x, w, b, rm if stats else None, rv if stats else None, nbt,
            -1.0 if momentum is None else momentum, 1e-5, native.KAPPA_MAX[dtype], mode == "update",
        )  # fmt: skip
        grads: tuple[torch.Tensor | None, ...] = ()
        if code in (bn.OK, bn.NOT_FINITE):
            y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape))  # aten's backward runs
            grads = (x.grad, None if w is None else w.grad, None if b is None else b.grad)
        outs.append((code, y, save_mean, save_invstd, rm, rv, nbt, grads))
    (code, *tensors), (code_py, *tensors_py) = outs
    assert code == code_py
    expected = {"plain": bn.OK, "channels_last": bn.OK, "nan": bn.NOT_FINITE, "inf": bn.NOT_FINITE}
    assert code == expected.get(kind, bn.ILL_CONDITIONED)
    for a, b_ in zip(tensors, tensors_py, strict=True):
        if isinstance(a, tuple):
            for ga, gb in zip(a, b_, strict=True):
                assert (ga is None) == (gb is None)
                if ga is not None:
                    torch.testing.assert_close(ga, gb, rtol=0, atol=0, equal_nan=True)
        else:
            torch.testing.assert_close(a, b_, rtol=0, atol=0, equal_nan=True)
    rm, rv, nbt = tensors[3], tensors[4], tensors[5]
    rm0, rv0, _ = _state(c, dtype, 2)
    changed = mode == "update" and code == bn.OK
    assert int(nbt) == (4 if changed else 3)
    assert torch.equal(rm, rm0) != changed and torch.equal(rv, rv0) != changed


@pytest.mark.parametrize(
    "case", ["float16", "mixed weight", "mixed running", "empty", "1d", "strided running", "transposed input"]
)
def test_train_step_declines_what_it_does_not_take(ext: ModuleType, case: str) -> None:
    """Both forms answer UNSUPPORTED and change nothing; the layer then runs the kernel contract."""
    x = torch.randn(6, 4)
    w, b = torch.ones(4), torch.zeros(4)
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(0)
    if case == "float16":
        x = x.half()
    elif case == "mixed weight":
        w = w.double()
    elif case == "mixed running":
        rm, rv = rm.double(), rv.double()
    elif case == "empty":
        x = x[:0]
    elif case == "1d":
        x = x[0]
    elif case == "strided running":
        rm, rv = torch.zeros(8)[::2], torch.ones(8)[::2]
    elif case == "transposed input":
        x = torch.randn(3, 4, 6).transpose(0, 2)[:, :4]
    for step in (ext.train_step, bn.aten_step_py):
        if case == "strided running" and step is bn.aten_step_py:
            continue  # the Python form restores through NumPy, which writes any strides
        before = (rm.clone(), rv.clone(), nbt.clone())
        *_, code = step(x, w, b, rm, rv, nbt, 0.1, 1e-5, native.KAPPA_MAX.get(x.dtype, 0.0), True)
        assert code == bn.UNSUPPORTED
        assert all(torch.equal(s, t) for s, t in zip((rm, rv, nbt), before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "case",
    [
        "plain", "nan stats", "zero var eps 0", "zero mean and var eps 0", "ill", "grad stats", "mixed", "inf mean", "inf var",
        "negative var", "at the bound", "above the bound", "many channels, one ill", "many channels, one nan",
    ],
)  # fmt: skip
def test_eval_step_forms_agree(ext: ModuleType, dtype: torch.dtype, case: str) -> None:
    c = 37 if case.startswith("many") else 5  # not a multiple of a vector width: the loop's tail counts
    x = torch.randn(6, c, 3, dtype=dtype)
    mean, var = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.1
    w, b = torch.rand(c, dtype=dtype), torch.randn(c, dtype=dtype)
    eps = 1e-5
    kappa = native.KAPPA_MAX[dtype]
    if case == "nan stats":
        mean[2] = float("nan")
    elif case == "zero var eps 0":
        var[1], eps = 0.0, 0.0
    elif case == "zero mean and var eps 0":  # var + eps = 0 refused by itself (mean^2 > 0 is not)
        mean[1], var[1], eps = 0.0, 0.0, 0.0
    elif case == "inf mean":
        mean[4] = -float("inf")
    elif case == "inf var":
        var[0] = float("inf")
    elif case == "negative var":
        var[3] = -1.0
    elif case in ("at the bound", "above the bound"):  # |mean| = kappa * sqrt(var + eps), exactly
        var[2], eps = 1.0, 0.0
        mean[2] = kappa * (1.0 if case == "at the bound" else 1.0 + 2.0**-20)
    elif case == "many channels, one ill":
        mean[-1] = 2 * kappa * float(var[-1].sqrt())
    elif case == "many channels, one nan":
        var[-1] = float("nan")
    elif case == "ill":
        mean = mean + (1e5 if dtype == torch.float32 else 1e12)
    elif case == "grad stats":
        mean.requires_grad_()
    elif case == "mixed":
        w = w.to(torch.float64 if dtype == torch.float32 else torch.float32)
    compiled = ext.eval_step(x, w, b, mean, var, eps, kappa)
    python = bn.eval_aten(x, mean, var, w, b, eps)
    assert (compiled is None) == (python is None) == (case not in ("plain", "at the bound"))
    if compiled is not None:
        torch.testing.assert_close(compiled, python, rtol=0, atol=0)


def _run_layer(layer: torch.nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for x in xs:
        x = x.clone().requires_grad_()
        layer.train()
        y = layer(x)
        y.pow(2).sum().backward()
        layer.eval()
        with torch.no_grad():
            out += [y.detach(), x.grad, layer(x)]
    return out + [t.detach().clone() for t in (*layer.parameters(), *layer.buffers())]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_layer_with_and_without_the_compiled_step(
    ext: ModuleType, momentum: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five steps of a BatchNorm2d, one of them a non-finite batch: same outputs, gradients and state."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 5, 5, generator=g) for _ in range(5)]
    xs[2][1, 1, 2, 2] = float("nan")
    results = []
    for module in (ext, None):
        monkeypatch.setitem(bn.EXT, "module", module)
        torch.manual_seed(0)
        layer = batchnorm.BatchNorm2d(3, momentum=momentum)
        with pytest.warns(RuntimeWarning, match="not finite"):
            results.append(_run_layer(layer, xs))
        assert int(layer.num_batches_tracked) == 4 and int(layer.num_batches_skipped) == 1
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_refused_batch_keeps_the_backward_working(ext: ModuleType) -> None:
    """The undo writes memory, not a tensor: aten's node, which holds the running statistics,
    still runs its backward (a version bump would make it raise)."""
    layer = batchnorm.BatchNorm1d(4)
    x = torch.randn(8, 4)
    x[0, 0] = float("inf")
    x.requires_grad_()
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = layer(x)
    y.sum().backward()
    assert x.grad is not None
    assert torch.equal(layer.running_mean, torch.zeros(4)) and torch.equal(layer.running_var, torch.ones(4))


def test_counter_version_bumps_like_add(ext: ModuleType) -> None:
    layer = batchnorm.BatchNorm1d(4)
    v = layer.num_batches_tracked._version
    layer(torch.randn(8, 4))
    assert int(layer.num_batches_tracked) == 1 and layer.num_batches_tracked._version == v + 1


def test_loader_never_compiles_and_says_why(tmp_path: Path) -> None:
    code = (
        "from batchnorm._kernels import step_ext\n"
        "print(step_ext.load() is None, step_ext.status())\n"
        "import batchnorm, torch\n"
        "batchnorm.BatchNorm1d(3)(torch.randn(4, 3))\n"
        f"print(sorted(p.name for p in __import__('pathlib').Path(r'{tmp_path}').rglob('*')))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "BATCHNORM_EXT"}  # the suite may run without it
    env.update(PYTHONPATH=str(ROOT / "src"), BATCHNORM_EXT_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].startswith("True not built (run `batchnorm build-ext`")
    assert out.splitlines()[1] == "[]"  # nothing compiled on a layer call
    env["BATCHNORM_EXT"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "True disabled by BATCHNORM_EXT=0"


def test_cli_build_ext_status(ext: ModuleType) -> None:
    from batchnorm.cli import main

    assert main(["build-ext", "--status"]) == 0


def test_cli_build_ext_without_a_compiler_is_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "BATCHNORM_EXT_DIR": str(tmp_path),
        "CXX": str(tmp_path / "no-such-compiler"),
    }
    r = subprocess.run(
        [sys.executable, "-m", "batchnorm", "build-ext"], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("batchnorm: error: could not compile the C++ eager step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_python_form_checks_at_the_bound(dtype: torch.dtype) -> None:
    """The Python form's channel checks (numba) on exact bounds, against the rule written out:
    ill-conditioned strictly above ``|mean| * invstd = kappa`` (eval: ``|mean| = kappa *
    sqrt(var + eps)``), not finite for NaN/inf anywhere or ``var + eps <= 0``; 37 channels
    (a loop tail)."""
    kernels = host_kernels()
    if kernels is None:
        pytest.skip("numba is not installed")
    kappa, c = native.KAPPA_MAX[dtype], 37
    inv = torch.full((c,), 0.5, dtype=dtype)
    var = torch.full((c,), 3.75, dtype=dtype)  # var + eps = 4 with eps = 0.25: sqrt 2
    for k in (0, 17, c - 1):
        for scale, want in ((1.0, kernels.UPDATED), (1.0 + 2.0**-20, kernels.ILL_CONDITIONED)):
            mean = torch.zeros(c, dtype=dtype)
            mean[k] = -2 * kappa * scale  # |mean| * 0.5 = kappa * scale; |mean| = kappa * sqrt(4) * scale
            assert kernels.check_statistics(mean.numpy(), inv.numpy(), kappa) == want
            assert kernels.check_fixed_statistics(mean.numpy(), var.numpy(), 0.25, kappa) == want
        for bad in (math.nan, math.inf, -math.inf):
            mean, bad_inv, bad_var = torch.zeros(c, dtype=dtype), inv.clone(), var.clone()
            mean[k] = bad
            assert kernels.check_statistics(mean.numpy(), inv.numpy(), kappa) == kernels.NOT_FINITE
            assert kernels.check_fixed_statistics(mean.numpy(), var.numpy(), 0.25, kappa) == kernels.NOT_FINITE
            bad_inv[k], bad_var[k] = bad, bad
            zero = torch.zeros(c, dtype=dtype)
            assert kernels.check_statistics(zero.numpy(), bad_inv.numpy(), kappa) == kernels.NOT_FINITE
            assert kernels.check_fixed_statistics(zero.numpy(), bad_var.numpy(), 0.25, kappa) == kernels.NOT_FINITE
        refused = var.clone()
        refused[k] = -0.25  # var + eps = 0
        zero = torch.zeros(c, dtype=dtype)
        assert kernels.check_fixed_statistics(zero.numpy(), refused.numpy(), 0.25, kappa) == kernels.NOT_FINITE
