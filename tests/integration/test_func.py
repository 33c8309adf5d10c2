"""torch.func: functional_call, vmap (model ensembling, after replace_all_batch_norm_modules_,
eval), grad, jacrev and jvp, in the forms torch's own BN supports.

torch's BN in training mutates its buffers, which a grad transform allows only for tensors
passed in as arguments: grad/jacrev in training take the buffers as an argument (via
functional_call); jvp in training runs on layers without running statistics. Every result is
compared with plain autograd on an eager copy (reverse-mode, non-vectorized Jacobians).

Run: .venv/bin/python -m pytest -q tests/integration/test_func.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, jacrev, jvp, replace_all_batch_norm_modules_, stack_module_state, vmap

from ._cases import CASES, Case, assert_steps_close, run_steps, state_of

# forward-mode AD in torch 2.13 scripts a helper of its own on first use (its DeprecationWarning
# is torch's, not the layer's)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

TOL = {"rtol": 1e-5, "atol": 1e-5}
MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
GRAD = pytest.mark.parametrize("grad_on", [True, False], ids=["grad", "no_grad"])
ALL = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
# replace_all_batch_norm_modules_ removes running statistics; renorm is defined by them and
# frozen has nothing to remove (it vmaps as is: test_vmap_eval)
REPLACEABLE = pytest.mark.parametrize(
    "case", [c for c in CASES if c.kind not in ("renorm", "frozen")], ids=lambda c: c.name
)


def _params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _buffers(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_buffers()}


def check_functional_call(case: Case, *, training: bool, grad_on: bool) -> None:
    """functional_call with our own tensors == eager; those buffers are updated, the module's not."""
    fresh = case.build().train(training)
    m = copy.deepcopy(fresh)
    params = {k: v.requires_grad_(grad_on) for k, v in _params(m).items()}
    bufs = _buffers(m)

    class Call(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return functional_call(m, {**params, **bufs}, (x,))

    holder = torch.nn.Module()
    for k, v in params.items():
        holder.register_parameter(k, torch.nn.Parameter(v, requires_grad=grad_on))
    params = dict(holder.named_parameters())
    for k, v in bufs.items():
        holder.register_buffer(k, v)
    got = run_steps(Call(), holder, case.inputs(), grad=grad_on)
    eager = copy.deepcopy(fresh)
    want = run_steps(eager, eager, case.inputs(), grad=grad_on)
    assert_steps_close(got, want, f"{case.name} functional_call vs eager")
    for k, v in state_of(fresh).items():
        assert torch.equal(m.state_dict()[k], v), f"{case.name}: functional_call changed the module's own {k}"


def check_ensemble(case: Case, *, training: bool, grad_on: bool, batched_input: bool) -> None:
    """vmap over stack_module_state of 3 differently initialized layers == each run alone."""
    members = [case.build(seed=s).train(training) for s in range(3)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    xs = torch.stack(case.inputs(3))  # (3, N, C, *)
    x_in = xs if batched_input else xs[0]

    def one(p, b, x):
        return functional_call(base, (p, b), (x,))

    with torch.enable_grad() if grad_on else torch.no_grad():
        out = vmap(one, in_dims=(0, 0, 0 if batched_input else None))(params, buffers, x_in)
    for i, member in enumerate(members):
        with torch.no_grad():
            want = member(xs[i] if batched_input else xs[0])
        torch.testing.assert_close(
            out[i].detach(), want, **TOL, msg=lambda s, i=i: f"{case.name} member {i}: output\n{s}"
        )
        for k, v in member.named_buffers():
            torch.testing.assert_close(
                buffers[k][i], v, **TOL, msg=lambda s, i=i, k=k: f"{case.name} member {i}: {k}\n{s}"
            )


def check_vmap_replaced(case: Case, *, training: bool, grad_on: bool) -> None:
    """After replace_all_batch_norm_modules_, vmap(layer) == the layer on each slice (batch stats)."""
    m = case.build().train(training)
    replace_all_batch_norm_modules_(m)
    xs = torch.stack(case.inputs(3))
    with torch.enable_grad() if grad_on else torch.no_grad():
        out = vmap(m)(xs)
    with torch.no_grad():
        want = torch.stack([m(x) for x in xs])
    torch.testing.assert_close(out.detach(), want, **TOL, msg=lambda s: f"{case.name} vmap after replace\n{s}")


def check_vmap_eval(case: Case, *, grad_on: bool) -> None:
    """In eval, vmap(layer) == the layer on each slice, running statistics untouched."""
    m = case.build().eval()
    before = state_of(m)
    xs = torch.stack(case.inputs(3))
    with torch.enable_grad() if grad_on else torch.no_grad():
        out = vmap(m)(xs)
    with torch.no_grad():
        want = torch.stack([m(x) for x in xs])
    torch.testing.assert_close(out.detach(), want, **TOL, msg=lambda s: f"{case.name} vmap eval\n{s}")
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), f"{case.name}: eval vmap changed {k}"


def check_grad(case: Case, *, training: bool) -> None:
    """torch.func.grad of a weighted sum w.r.t. (params, x) == autograd; buffers updated once."""
    fresh = case.build().train(training)
    m = copy.deepcopy(fresh)
    x = case.inputs(1)[0]
    w = torch.randn(x.shape)
    bufs = _buffers(m)

    def loss(p, x, b):
        return (functional_call(m, {**p, **b}, (x,)) * w).sum()

    gp, gx = grad(loss, argnums=(0, 1))(_params(m), x, bufs)
    eager = copy.deepcopy(fresh)
    xe = x.clone().requires_grad_()
    (eager(xe) * w).sum().backward()
    torch.testing.assert_close(gx, xe.grad, **TOL, msg=lambda s: f"{case.name} grad w.r.t. input\n{s}")
    for k, p in eager.named_parameters():
        torch.testing.assert_close(gp[k], p.grad, **TOL, msg=lambda s, k=k: f"{case.name} grad w.r.t. {k}\n{s}")
    for k, v in eager.named_buffers():
        torch.testing.assert_close(bufs[k], v, **TOL, msg=lambda s, k=k: f"{case.name} buffer {k} after grad\n{s}")


def _reverse_jacobian(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.jacobian(lambda t: m(t), x, vectorize=False)


def check_jacrev(case: Case, *, training: bool) -> None:
    """jacrev w.r.t. the input == the row-by-row autograd Jacobian."""
    fresh = case.build().train(training)
    m = copy.deepcopy(fresh)
    x = case.inputs(1)[0]
    bufs = _buffers(m)
    p = _params(m)
    jac = jacrev(lambda x, b: functional_call(m, {**p, **b}, (x,)))(x, bufs)
    want = _reverse_jacobian(copy.deepcopy(fresh), x)
    torch.testing.assert_close(jac, want, **TOL, msg=lambda s: f"{case.name} jacrev\n{s}")


def check_jvp(case: Case, *, training: bool) -> None:
    """jvp w.r.t. the input (and weight/bias via functional_call) == J @ v from reverse mode.
    In training the layer keeps no running statistics (as torch's BN needs for jvp)."""
    m = case.build().train(training)
    if training:
        replace_all_batch_norm_modules_(m)
    x = case.inputs(1)[0]
    v = torch.randn(x.shape)
    _, tangent = jvp(m, (x,), (v,))
    jac = _reverse_jacobian(m, x).reshape(x.numel(), x.numel())
    torch.testing.assert_close(tangent, (jac @ v.reshape(-1)).reshape(x.shape), **TOL,
                               msg=lambda s: f"{case.name} jvp w.r.t. input\n{s}")  # fmt: skip
    params = _params(m)
    if params:
        tangents = {k: torch.randn(t.shape) for k, t in params.items()}
        _, tp = jvp(lambda p: functional_call(m, p, (x,)), (params,), (tangents,))
        eps = 1e-3  # central difference in float64 as the reference for the parameter direction
        md = copy.deepcopy(m).double()
        plus = functional_call(md, {k: params[k].double() + eps * tangents[k].double() for k in params}, (x.double(),))
        minus = functional_call(md, {k: params[k].double() - eps * tangents[k].double() for k in params}, (x.double(),))
        # a difference quotient across an activation's kink says nothing: leave out outputs near 0
        smooth = functional_call(md, {k: params[k].double() for k in params}, (x.double(),)).abs() > 1e-3
        if case.kind != "act":
            smooth = torch.ones_like(smooth)
        torch.testing.assert_close(tp.double()[smooth], ((plus - minus) / (2 * eps))[smooth], rtol=1e-4, atol=1e-4,
                                   msg=lambda s: f"{case.name} jvp w.r.t. weight/bias\n{s}")  # fmt: skip


@GRAD
@MODES
@ALL
def test_functional_call(case: Case, training: bool, grad_on: bool) -> None:
    check_functional_call(case, training=training, grad_on=grad_on)


@pytest.mark.parametrize("batched_input", [False, True], ids=["shared_x", "own_x"])
@GRAD
@MODES
@ALL
def test_vmap_model_ensembling(case: Case, training: bool, grad_on: bool, batched_input: bool) -> None:
    check_ensemble(case, training=training, grad_on=grad_on, batched_input=batched_input)


@GRAD
@MODES
@REPLACEABLE
def test_vmap_after_replace_all_batch_norm_modules(case: Case, training: bool, grad_on: bool) -> None:
    check_vmap_replaced(case, training=training, grad_on=grad_on)


@GRAD
@ALL
def test_vmap_eval(case: Case, grad_on: bool) -> None:
    check_vmap_eval(case, grad_on=grad_on)


@MODES
@ALL
def test_grad(case: Case, training: bool) -> None:
    check_grad(case, training=training)


@MODES
@ALL
def test_jacrev(case: Case, training: bool) -> None:
    check_jacrev(case, training=training)


@MODES
@ALL
def test_jvp(case: Case, training: bool) -> None:
    if training and case.kind == "renorm":
        pytest.skip("renorm needs its running statistics in training; no stat-free form to differentiate forward")
    check_jvp(case, training=training)
