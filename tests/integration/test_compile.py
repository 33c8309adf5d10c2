"""torch.compile (default and fullgraph=True, from a cold start) equals eager, with 0 graph breaks.

Each check resets Dynamo, compiles a copy of the layer, runs 3 training steps (SGD between them)
and one eval step through the compiled layer first, then the same on an eager copy and on
torch's layer with the same state: outputs, input/parameter gradients and buffers must agree.

Run: .venv/bin/python -m pytest -q tests/integration/test_compile.py
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from ._cases import MATRIX, REPRESENTATIVES, Case, assert_steps_close, leaf_names, reference_steps, train_then_eval


def check_compile(case: Case, *, fullgraph: bool, grad: bool, backend: str = "inductor") -> None:
    """Compiled layer == eager layer (== torch's layer where it has one), 3 train steps + eval."""
    torch._dynamo.reset()
    fresh = case.build()
    compiled_owner = copy.deepcopy(fresh)
    compiled = torch.compile(compiled_owner, fullgraph=fullgraph, backend=backend)
    got = train_then_eval(compiled, compiled_owner, compiled_owner, case, grad=grad)  # compiled first: cold
    eager = copy.deepcopy(fresh)
    want = train_then_eval(eager, eager, eager, case, grad=grad)
    assert_steps_close(got, want, f"{case.name} compiled (fullgraph={fullgraph}) vs eager")
    ref = reference_steps(case, fresh, grad=grad)
    if ref is not None:
        assert_steps_close(leaf_names(got), ref, f"{case.name} compiled vs torch's layer")


def check_no_graph_break(case: Case, *, training: bool, grad: bool) -> None:
    """``torch._dynamo.explain`` finds one graph and no break in a training or eval call."""
    torch._dynamo.reset()
    m = case.build().train(training)
    x = case.inputs(1)[0].requires_grad_(grad)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        explained = torch._dynamo.explain(m)(x)
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, f"{case.name}: {explained.graph_break_count} graph breaks: {reasons}"
    assert explained.graph_count == 1, f"{case.name}: {explained.graph_count} graphs"


def check_no_recompile(case: Case) -> None:
    """Three training steps compile once: the step counter (momentum=None, renorm schedule)
    must not be read into Python, or every step is a new graph."""
    torch._dynamo.reset()
    frames: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        frames.append(1)
        return gm.forward

    m = case.build().train()
    compiled = torch.compile(m, backend=counting)
    for x in case.inputs(3):
        compiled(x.requires_grad_()).sum().backward()
    assert len(frames) == 1, f"{case.name}: {len(frames)} graphs compiled over 3 training steps (want 1)"


@pytest.mark.parametrize("case", REPRESENTATIVES, ids=lambda c: c.name)
def test_fullgraph_matches_eager(case: Case) -> None:
    check_compile(case, fullgraph=True, grad=True)


def test_default_compile_matches_eager() -> None:
    from ._cases import BY_NAME

    check_compile(BY_NAME["BatchNorm2d-mNone"], fullgraph=False, grad=True)


@pytest.mark.slow
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])
@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.name)
def test_compile_matrix(case: Case, fullgraph: bool, grad: bool) -> None:
    check_compile(case, fullgraph=fullgraph, grad=grad)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.name)
def test_explain_reports_no_graph_break(case: Case, training: bool, grad: bool) -> None:
    check_no_graph_break(case, training=training, grad=grad)


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.name)
def test_training_steps_do_not_recompile(case: Case) -> None:
    check_no_recompile(case)


COLD = textwrap.dedent(
    """
    import torch, batchnorm
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4))
    eager = __import__("copy").deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 6, 6)
    y = compiled(x)          # the very first call of the layer in this process
    y.sum().backward()
    model.eval()
    with torch.no_grad():
        z = compiled(x)
    torch.testing.assert_close(y, eager(x))
    eager.eval()
    torch.testing.assert_close(z, eager(x))
    torch.testing.assert_close(model[1].running_var, eager[1].running_var)
    print("OK")
    """
)


def test_cold_process_conv_bn_compiles() -> None:
    """In a fresh interpreter whose first use of the layer is the compiled call (train, then eval
    under no_grad), as a new user would write it."""
    r = subprocess.run(
        [sys.executable, "-W", "error", "-W", "ignore::DeprecationWarning", "-c", COLD],
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = (r.stderr.strip().splitlines() or [""])[-1]
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), f"exit {r.returncode}: {last}"
