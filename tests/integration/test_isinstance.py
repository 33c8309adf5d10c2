"""Our classes are torch's classes to code that looks for BN by type; state_dicts load both ways.

Run: .venv/bin/python -m pytest -q tests/integration/test_isinstance.py
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm

from ._cases import CASES, Case

TORCH_CLASS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_batchnorm_is_torch_batchnorm(dim: int) -> None:
    ours = getattr(batchnorm, f"BatchNorm{dim}d")(3)
    assert isinstance(ours, TORCH_CLASS[dim]), f"{type(ours).__mro__} lacks {TORCH_CLASS[dim]}"
    assert isinstance(ours, _BatchNorm)
    others = [c for d, c in TORCH_CLASS.items() if d != dim]
    assert not any(isinstance(ours, c) for c in others), f"BatchNorm{dim}d is also {others}"


def test_type_based_tools_find_every_layer() -> None:
    """What fvcore's update_bn_stats does: find BN layers by isinstance; after convert, ours."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.BatchNorm3d(2))
    converted = batchnorm.convert(model)
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    found = [type(m).__module__ for m in converted.modules() if isinstance(m, kinds)]
    assert len(found) == 3 and all(mod.startswith("batchnorm") for mod in found), found


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_bn_act_is_not_a_plain_torch_batchnorm(dim: int) -> None:
    """Tools that fold nn.BatchNorm*d into a conv would silently drop the activation."""
    assert not isinstance(getattr(batchnorm, f"BatchNormAct{dim}d")(3), TORCH_CLASS[dim])


def _torch_twin(case: Case, ours: nn.Module) -> nn.Module:
    dim = {2: 1, 3: 1, 4: 2, 5: 3}[len(case.shape)]
    return TORCH_CLASS[dim](3, momentum=getattr(ours, "momentum", 0.1))


@pytest.mark.parametrize("case", [c for c in CASES if c.kind != "renorm"], ids=lambda c: c.name)
def test_state_dict_loads_both_ways(case: Case) -> None:
    """Same keys as torch's BatchNorm*d; strict load each way; then the eval outputs agree.
    (BatchRenorm stores running_std, not running_var: not interchangeable by design.)"""
    ours = case.build()
    theirs = _torch_twin(case, ours)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    back = case.make()
    back.load_state_dict(theirs.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = case.inputs(1)[0]
    theirs.eval()
    back.eval()
    want = theirs(x)
    if case.kind == "act":
        want = torch.nn.functional.leaky_relu(want, back.negative_slope)
    with torch.no_grad():
        torch.testing.assert_close(back(x), want.detach(), rtol=1e-5, atol=1e-5)
