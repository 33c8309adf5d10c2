"""torch.export.export in train and eval: the exported program equals eager (outputs, gradients,
buffer updates over 3 calls) and holds an operator of the ``batchnorm`` namespace per layer.

Run: .venv/bin/python -m pytest -q tests/integration/test_export.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from ._cases import BY_NAME, CASES, Case, assert_steps_close, run_steps


def _export(m: torch.nn.Module, x: torch.Tensor, grad: bool, **kwargs) -> torch.export.ExportedProgram:
    with torch.enable_grad() if grad else torch.no_grad():
        return torch.export.export(m, (x,), **kwargs)


def batchnorm_nodes(ep: torch.export.ExportedProgram) -> list[str]:
    """Targets of the graph's calls into the ``torch.ops.batchnorm`` namespace."""
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("batchnorm.")]


def check_export(case: Case, *, training: bool, grad: bool) -> None:
    """ep.module() == eager over 3 calls: outputs, gradients and the buffers it mutates."""
    fresh = case.build().train(training)
    xs = case.inputs()
    ep = _export(copy.deepcopy(fresh), xs[0], grad)
    gm = ep.module()
    got = run_steps(gm, gm, xs, grad=grad)
    eager = copy.deepcopy(fresh)
    want = run_steps(eager, eager, xs, grad=grad)
    assert_steps_close(got, want, f"{case.name} exported ({'train' if training else 'eval'}) vs eager")


def check_export_op(case: Case, *, training: bool) -> None:
    """One layer -> at least one ``batchnorm.*`` node; two layers -> at least two."""
    m = case.build().train(training)
    x = case.inputs(1)[0]
    ep = _export(copy.deepcopy(m), x, grad=False)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert batchnorm_nodes(ep), f"{case.name}: no batchnorm.* operator in the exported graph: {targets}"
    two = torch.nn.Sequential(copy.deepcopy(m), torch.nn.Tanh(), copy.deepcopy(m))
    ep2 = _export(two, x, grad=False)
    assert len(batchnorm_nodes(ep2)) >= 2, f"{case.name}: two layers gave {batchnorm_nodes(ep2)}"


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_exported_program_matches_eager(case: Case, training: bool, grad: bool) -> None:
    check_export(case, training=training, grad=grad)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_graph_has_a_batchnorm_operator_per_layer(case: Case, training: bool) -> None:
    check_export_op(case, training=training)


@pytest.mark.parametrize("name", ["BatchNorm2d", "GhostBatchNorm2d", "BatchNormAct2d"])
def test_dynamic_batch_and_pt2_round_trip(name: str, tmp_path) -> None:
    """Export with a symbolic batch size, save to a .pt2 file, load, run on another N."""
    case = BY_NAME[name]
    fresh = case.build().train()
    x = case.inputs(1)[0]
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = _export(copy.deepcopy(fresh), x, grad=False, dynamic_shapes={"input": {0: batch}})
    path = tmp_path / "layer.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    x9 = torch.randn((9,) + tuple(x.shape[1:])) * 2 + 0.5
    eager = copy.deepcopy(fresh)
    torch.testing.assert_close(loaded(x9), eager(x9), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dict(loaded.named_buffers())["running_var"], eager.running_var, rtol=1e-5, atol=1e-5)
