"""torch's own fusion and quantization tools on models built with our layers.

Run: pytest -q tests/test_torch_fusers.py

Eager mode (``fuse_modules``, ``fuse_modules_qat``) sees our BatchNorm*d directly: the result
must equal, bit for bit, what torch gives for the same model built with torch's layers. Graph
mode (fx) matches exact types and does not trace into ``torch.nn``-only leaves, so it takes the
model after ``convert(model, to="torch")``; the documented route is tested too.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.ao.quantization import fuse_modules, fuse_modules_qat

import batchnorm

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*quantize_per_tensor.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*quantize_per_channel.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*fx graph mode quantization.*:DeprecationWarning"),
]

# (first layer, our BN, torch's BN, input shape, with ReLU)
CASES = [
    (lambda: nn.Conv1d(3, 6, 3), batchnorm.BatchNorm1d, (5, 3, 9), True),
    (lambda: nn.Conv2d(3, 6, 3), batchnorm.BatchNorm2d, (5, 3, 7, 7), True),
    (lambda: nn.Conv2d(3, 6, 3), batchnorm.BatchNorm2d, (5, 3, 7, 7), False),
    (lambda: nn.Conv3d(3, 6, 2), batchnorm.BatchNorm3d, (4, 3, 4, 4, 4), True),
    (lambda: nn.Linear(7, 6), batchnorm.BatchNorm1d, (9, 7), False),
    (lambda: nn.ConvTranspose2d(3, 6, 3), batchnorm.BatchNorm2d, (5, 3, 5, 5), False),
]


def _trained(first: nn.Module, bn: type[nn.Module], shape: tuple[int, ...], relu: bool) -> nn.Sequential:
    """``first -> bn (-> ReLU)`` after three training steps, so the running statistics are not the init."""
    layers = [first, bn(6)] + ([nn.ReLU()] if relu else [])
    model = nn.Sequential(*layers)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    for step in range(3):
        model(torch.randn(shape) * (1 + step) + step)
    return model


@pytest.mark.parametrize(("make_first", "bn", "shape", "relu"), CASES)
def test_fuse_modules_eval_matches_torch_layers(make_first, bn, shape, relu) -> None:
    torch.manual_seed(0)
    ours = _trained(make_first(), bn, shape, relu).eval()
    theirs = batchnorm.convert(ours, to="torch")
    assert type(theirs[1]).__module__.startswith("torch.nn")
    names = [[str(i) for i in range(len(ours))]]
    fused_ours = fuse_modules(ours, names)
    fused_theirs = fuse_modules(theirs, names)
    assert type(fused_ours[0]) is type(fused_theirs[0])
    assert all(isinstance(m, nn.Identity) for m in list(fused_ours)[1:])
    for a, b in zip(fused_ours.state_dict().values(), fused_theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(shape)
    torch.testing.assert_close(fused_ours(x), ours(x), rtol=1e-5, atol=1e-5)
    assert isinstance(ours[1], bn)  # the original is untouched (fuse_modules copies by default)


@pytest.mark.parametrize(
    ("dims", "bn", "shape"), [(2, batchnorm.BatchNorm2d, (4, 6, 5, 5)), (3, batchnorm.BatchNorm3d, (2, 6, 3, 3, 3))]
)
def test_fuse_modules_bn_relu(dims: int, bn: type[nn.Module], shape: tuple[int, ...]) -> None:
    """``(BatchNorm, ReLU)`` becomes torch's ``BNReLU2d``/``3d`` carrying our layer's state."""
    torch.manual_seed(0)
    model = nn.Sequential(bn(6), nn.ReLU())
    model(torch.randn(shape))
    model.eval()
    fused = fuse_modules(model, [["0", "1"]])
    expected = {2: torch.ao.nn.intrinsic.BNReLU2d, 3: torch.ao.nn.intrinsic.BNReLU3d}[dims]
    assert type(fused[0]) is expected
    x = torch.randn(shape)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-6, atol=1e-6)


def test_fuse_modules_qat_then_quantize() -> None:
    """``fuse_modules_qat`` makes torch's ``ConvBnReLU2d``; QAT then quantizes it as for torch's layers."""
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qat_qconfig, prepare_qat

    torch.manual_seed(0)
    ours = _trained(nn.Conv2d(3, 6, 3), batchnorm.BatchNorm2d, (5, 3, 7, 7), True)
    fused = fuse_modules_qat(ours, [["0", "1", "2"]])
    assert type(fused[0]) is torch.ao.nn.intrinsic.ConvBnReLU2d
    bn = fused[0][1]
    assert type(bn) is nn.BatchNorm2d
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(ours[1], name))
    model = nn.Sequential(QuantStub(), fused, DeQuantStub())
    model.qconfig = get_default_qat_qconfig("x86")
    model = prepare_qat(model)
    assert type(model[1][0]) is torch.ao.nn.intrinsic.qat.ConvBnReLU2d
    for _ in range(2):
        model(torch.randn(5, 3, 7, 7))
    quantized = convert(model.eval())
    assert type(quantized[1][0]).__name__ == "ConvReLU2d"
    assert quantized(torch.randn(2, 3, 7, 7)).shape == (2, 6, 5, 5)


def test_modes_must_agree_as_for_torch() -> None:
    """torch refuses to fuse a conv and a BN in different modes; so it does for ours."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), batchnorm.BatchNorm2d(6))
    model[0].eval()
    with pytest.raises(AssertionError, match="same mode"):
        fuse_modules(model, [["0", "1"]])


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_registered_at_construction_not_at_import(tmp_path) -> None:
    """Importing batchnorm changes nothing in torch; building (or unpickling) a layer registers."""
    saved = tmp_path / "model.pt"
    code = f"""
        import torch
        from torch.ao.quantization import fuser_method_mappings as f
        import batchnorm
        ours = lambda: any(getattr(t, "__module__", "").startswith("batchnorm")
                           for k in f._DEFAULT_OP_LIST_TO_FUSER_METHOD for t in k)
        print(ours())
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4)).eval()
        print(ours())
        torch.save(model, {str(saved)!r})
    """
    assert _run(code).split() == ["False", "True"]
    load = f"""
        import torch
        from torch.ao.quantization import fuse_modules
        import batchnorm
        model = torch.load({str(saved)!r}, weights_only=False)
        print(type(fuse_modules(model, [["0", "1"]])[1]).__name__)
    """
    assert _run(load) == "Identity"


# -- graph mode: exact types and torch.nn leaves, so the documented route converts first ------


def test_fx_fuse_after_convert_equals_our_fold() -> None:
    """``torch.fx.experimental.optimization.fuse`` on the converted model == ``batchnorm.fold``."""
    from torch.fx.experimental.optimization import fuse

    torch.manual_seed(0)
    model = _trained(nn.Conv2d(3, 6, 3), batchnorm.BatchNorm2d, (5, 3, 7, 7), True).eval()
    fused = fuse(batchnorm.convert(model, to="torch"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    folded = batchnorm.fold(model).model
    x = torch.randn(4, 3, 7, 7)
    torch.testing.assert_close(fused(x), folded(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_prepare_qat_fx_after_convert_makes_conv_bn_relu() -> None:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    torch.manual_seed(0)
    model = _trained(nn.Conv2d(3, 6, 3), batchnorm.BatchNorm2d, (5, 3, 7, 7), True)
    x = torch.randn(5, 3, 7, 7)
    prepared = prepare_qat_fx(batchnorm.convert(model, to="torch"), get_default_qat_qconfig_mapping("x86"), (x,))
    kinds = {type(m).__name__ for m in prepared.modules()}
    assert "ConvBnReLU2d" in kinds
    prepared(x)
    quantized = convert_fx(prepared.eval())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in quantized.modules())
    assert quantized(x).shape == (5, 6, 5, 5)
