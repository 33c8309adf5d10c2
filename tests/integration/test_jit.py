"""torch.jit.trace and torch.jit.script (train and eval, grad on and off) equal eager.

jit is deprecated in torch 2.13 (a DeprecationWarning), and tracing torch's own BN in training
warns (TracerWarning: it converts its step counter to a Python bool); both warnings are allowed
here, and a value baked into a trace shows as a wrong output or buffer in a later step.

Run: .venv/bin/python -m pytest -q tests/integration/test_jit.py
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.utils.parametrize

import batchnorm

from ._cases import CASES, Case, assert_steps_close, run_steps, train_then_eval

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]


def check_trace(case: Case, *, training: bool, grad: bool) -> None:
    """jit.trace on one input, then 3 calls on others == eager (which also replays the trace call)."""
    fresh = case.build().train(training)
    xs = case.inputs(4)
    traced_owner = copy.deepcopy(fresh)
    with torch.enable_grad() if grad else torch.no_grad():
        traced = torch.jit.trace(traced_owner, xs[0], check_trace=False)
    got = run_steps(traced, traced, xs[1:], grad=grad)
    eager = copy.deepcopy(fresh)
    with torch.no_grad():
        eager(xs[0])  # tracing ran the layer once
    want = run_steps(eager, eager, xs[1:], grad=grad)
    assert_steps_close(got, want, f"{case.name} traced ({'train' if training else 'eval'}) vs eager")


def check_script(case: Case, *, grad: bool) -> None:
    """jit.script == eager over 3 training steps and an eval step, and after save/load."""
    fresh = case.build()
    scripted = torch.jit.script(copy.deepcopy(fresh))
    got = train_then_eval(scripted, scripted, scripted, case, grad=grad)
    eager = copy.deepcopy(fresh)
    want = train_then_eval(eager, eager, eager, case, grad=grad)
    assert_steps_close(got, want, f"{case.name} scripted vs eager")
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = case.inputs(1, seed=5)[0]
    loaded.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_trace_matches_eager(case: Case, training: bool, grad: bool) -> None:
    check_trace(case, training=training, grad=grad)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_script_matches_eager(case: Case, grad: bool) -> None:
    check_script(case, grad=grad)


SCRIPTED_KINDS = [
    lambda: batchnorm.BatchNorm1d(4),
    lambda: batchnorm.GhostBatchNorm1d(4, virtual_batch_size=2),
    lambda: batchnorm.BatchRenorm1d(4),
    lambda: batchnorm.BatchNormAct1d(4),
    lambda: batchnorm.SyncBatchNorm(4),
]


@pytest.mark.parametrize("make", SCRIPTED_KINDS, ids=["bn", "ghost", "renorm", "act", "sync"])
def test_script_runs_the_layers_own_step(make) -> None:
    """A scripted layer is one call of the layer's step: its checks and messages, and its guard
    that keeps a non-finite batch out of the running statistics."""
    layer = make()
    scripted = torch.jit.script(copy.deepcopy(layer))
    with pytest.raises(RuntimeError, match=rf"{type(layer).__name__}\(4\).*4 channels"):
        scripted(torch.randn(8, 5))
    before = {key: value.clone() for key, value in scripted.state_dict().items()}
    x = torch.randn(8, 4)
    x[3, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        scripted(x)
    after = scripted.state_dict()
    for key, value in before.items():
        if key != "num_batches_skipped":
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert int(after["num_batches_skipped"]) == 1


class _Doubled(batchnorm.GhostBatchNorm1d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input * 2.0


def _plus_100(module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return output + 100.0


def test_script_compiles_the_layer_itself() -> None:
    """The layer itself is scripted: the model keeps our layers, a subclass's own forward and a
    forward hook are compiled, and settings given as ints work."""
    model = torch.nn.Sequential(batchnorm.BatchNorm1d(4, eps=1, momentum=1), batchnorm.FrozenBatchNorm1d(4))
    model[1].register_forward_hook(_plus_100)
    eager = copy.deepcopy(model)
    scripted = torch.jit.script(model)
    assert isinstance(model[0], batchnorm.BatchNorm1d) and isinstance(model[1], batchnorm.FrozenBatchNorm1d)
    x = torch.randn(8, 4)
    torch.testing.assert_close(scripted(x), eager(x), rtol=0, atol=0)
    torch.testing.assert_close(scripted[0].running_var, eager[0].running_var, rtol=0, atol=0)
    assert float(scripted(x).detach().mean()) > 50  # the hook ran
    torch.testing.assert_close(torch.jit.script(_Doubled(4, 2))(x), x * 2.0)


def test_script_refuses_a_parametrized_weight() -> None:
    layer = batchnorm.BatchNorm1d(4)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", torch.nn.Identity())
    with pytest.raises(RuntimeError, match=r"BatchNorm1d\(4\).*parametrized"):
        torch.jit.script(layer)
