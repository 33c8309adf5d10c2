"""Tests for batchnorm.tools.inspect_model and format_table.

PYTHONPATH=src python -m pytest -q tests/test_inspect.py
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm import BatchNorm2d, FrozenBatchNorm1d, find_redundant_biases, fold, recompute_statistics
from batchnorm.tools import format_table, inspect_model


def net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.2), nn.ReLU(),
        nn.BatchNorm2d(8, momentum=None), nn.Conv2d(8, 4, 3, padding=1, bias=False), BatchNorm2d(4, eps=1e-3),
        nn.Flatten(), nn.Linear(4 * 25, 5), FrozenBatchNorm1d(5),
    )  # fmt: skip


def test_conventions_health_bias_and_fold_columns() -> None:
    model = net().eval()
    with torch.no_grad():
        model[1].running_var[:2] = 0.0
        model[5].running_var[0] = 1e-4  # below eps=1e-3: tiny
        model[5].running_mean[1] = float("inf")
    reports = inspect_model(model)
    by = {r.name: r for r in reports}
    assert list(by) == ["1", "3", "5", "8"]
    assert (by["1"].momentum, by["1"].keras_momentum) == (0.2, pytest.approx(0.8))
    assert by["3"].momentum is None and by["3"].keras_momentum is None
    assert (by["1"].zero_var, by["5"].tiny_var, by["5"].nonfinite) == (2, 1, 1)
    assert not by["1"].healthy and by["3"].healthy
    assert by["5"].eps == 1e-3 and by["8"].kind == "FrozenBatchNorm1d"
    # redundant biases agree with the lint, foldability with fold()
    lint = {f.bn: (f.layer, f.parameters) for f in find_redundant_biases(model)}
    assert (
        {r.name: (r.redundant_bias, r.wasted_parameters) for r in reports if r.redundant_bias}
        == lint
        == {"1": ("0", 8), "8": ("7", 5)}
    )
    result = fold(model)
    assert {r.name for r in reports if r.foldable} == {bn for bn, _, _ in result.folded} == {"1", "8"}
    assert "NaN/inf" in by["5"].fold_note
    assert by["1"].mean_shift is None


def test_train_eval_discrepancy_against_numpy() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, eps=1e-5))
    x = torch.randn(64, 4) * 2 + 1
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model[1].running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
        h = model[0](x).double().numpy()
    model.train()
    (r,) = inspect_model(model, x)
    rm = model[1].running_mean.double().numpy()
    rv = model[1].running_var.double().numpy()
    shift = np.max(np.abs(h.mean(0) - rm) / np.sqrt(rv + 1e-5))
    ratio = (h.var(0) + 1e-5) / (rv + 1e-5)
    assert r.mean_shift == pytest.approx(shift, rel=1e-9)
    assert r.var_ratio == pytest.approx(np.max(np.maximum(ratio, 1 / ratio)), rel=1e-9)
    assert model.training and model[1].training  # flags restored
    assert not model[1]._forward_pre_hooks
    # after recomputing on the same data the discrepancy vanishes (up to the n/(n-1) factor)
    recompute_statistics(model, [x])
    (r,) = inspect_model(model, x)
    assert r.mean_shift < 1e-5 and r.var_ratio == pytest.approx(64 / 63, rel=1e-4)


def test_inspect_does_not_modify_the_model() -> None:
    model = net()
    before = copy.deepcopy(model.state_dict())
    inspect_model(model, torch.randn(2, 3, 5, 5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_format_table() -> None:
    model = net().eval()
    text = format_table(inspect_model(model, torch.randn(4, 3, 5, 5)))
    lines = text.splitlines()
    assert lines[0].split() == [
        "layer",
        "kind",
        "C",
        "momentum",
        "keras",
        "eps",
        "stats",
        "shift",
        "var",
        "x",
        "bias",
        "fold",
    ]
    row = lines[2].split()
    assert row[:6] == ["1", "BatchNorm2d", "8", "0.2", "0.8", "1e-05"] and row[-1] == "yes"
    assert lines[3].split()[3:5] == ["cumul.", "-"]
    # the bias cell names the layer and the size so that a layer named "0" does not read as a count
    bias = lines[0].index("bias")
    assert lines[2][bias:].split("  ")[0] == "0 [8 params]" and lines[3][bias:].split()[0] == "-"
    assert all(line == line.rstrip() for line in lines)
    # every column is explained under the table
    legend = {line.split(":")[0] for line in lines if not line.startswith(" ")}
    assert {"layer", "momentum", "stats", "shift", "bias", "fold"} <= legend
    for term in ("nonfinite", "zero-var", "tiny-var", "strip_redundant_bias", "fold()"):
        assert term in text
    assert "4 batch-norm layer(s); 3 foldable; 13 parameter(s) in redundant biases." in text
    assert "3: not foldable:" in text
    assert format_table([]) == "no batch-norm layers found"
    with pytest.raises(TypeError, match="nn.Module"):
        inspect_model(3)  # type: ignore[arg-type]


class _KeywordCall(nn.Module):
    """Calls its batch norm with the keyword, ``bn(input=h)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(input=self.lin(x))


def test_discrepancy_sees_keyword_calls() -> None:
    torch.manual_seed(0)
    model = _KeywordCall()
    positional = nn.Sequential(model.lin, model.bn)  # the same layers, called positionally
    x = torch.randn(32, 4) * 3 + 2
    (kw,) = inspect_model(model, x)
    (pos,) = inspect_model(positional, x)
    assert kw.mean_shift is not None and kw.mean_shift > 0.1  # fresh running stats vs shifted data
    assert (kw.mean_shift, kw.var_ratio) == (pos.mean_shift, pos.var_ratio)
