"""gradcheck (batched grad, forward AD) and gradgradcheck in float64 on the functional forms
and on every layer as a pure function of (input, weight, bias) with fresh buffers per call.

Run: .venv/bin/python -m pytest -q tests/integration/test_gradcheck.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import batchnorm

from ._cases import CASES, Case

# forward-mode AD in torch 2.13 scripts a helper of its own on first use (its DeprecationWarning
# is torch's, not the layer's)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

D = torch.float64


def _leaf(shape: tuple[int, ...], seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=D) * scale + shift).requires_grad_()


def _stats(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return 0.5 * torch.randn(c, generator=g, dtype=D), 0.5 + torch.rand(c, generator=g, dtype=D)


def _check(fn, inputs: tuple[torch.Tensor, ...], what: str, *, double: bool = True) -> None:
    """gradcheck (batched, forward and backward mode) and, where the backward is differentiable,
    gradgradcheck. BN + activation in training has no double backward: its backward recovers
    the normalized input from the output (the memory-saving design), which autograd cannot see."""
    assert gradcheck(fn, inputs, check_batched_grad=True, check_forward_ad=True, check_backward_ad=True), what
    if double:
        assert gradgradcheck(fn, inputs, check_batched_grad=True), what


def _functional(name: str, training: bool):
    """(fn of (x, weight, bias), input shape) for one functional form; buffers fresh per call."""
    rm, rv = _stats(3)

    def stats():
        return rm.clone(), rv.clone()

    if name == "batch_norm":
        return lambda x, w, b: batchnorm.batch_norm(x, *stats(), w, b, training, 0.1, 1e-5)
    if name == "batch_norm_no_stats":
        return lambda x, w, b: batchnorm.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    if name.startswith("batch_norm_act"):
        act = name.split(":")[1]
        return lambda x, w, b: batchnorm.batch_norm_act(x, *stats(), w, b, training, 0.1, 1e-5, act)
    if name == "batch_renorm":
        # running std 3: r = sigma_B / 3 is clipped at 1/1.5 for every channel, d at +-0.5: both
        # constant near the input, so the stop-gradient of r and d is the true derivative
        rstd = torch.full((3,), 3.0, dtype=D)
        rmean = torch.full((3,), 4.0, dtype=D)
        return lambda x, w, b: batchnorm.batch_renorm(
            x, rmean.clone(), rstd.clone(), w, b, training, 0.1, 1e-5, 1.5, 0.5
        )
    if name == "ghost_batch_norm":
        if not training:
            return None
        return lambda x, w, b: batchnorm.ghost_batch_norm(x, 2, *stats(), w, b, 0.1, 1e-5)
    raise KeyError(name)


FUNCTIONALS = ["batch_norm", "batch_norm_no_stats", "batch_norm_act:leaky_relu", "batch_norm_act:elu",
               "batch_norm_act:identity", "batch_renorm", "ghost_batch_norm"]  # fmt: skip


def check_functional(name: str, *, training: bool, shape: tuple[int, ...] = (5, 3, 2)) -> None:
    fn = _functional(name, training)
    if fn is None:
        return
    inputs = (_leaf(shape, 0), _leaf((3,), 1, 0.3, 1.0), _leaf((3,), 2, 0.3))
    _check(fn, inputs, f"{name} ({'train' if training else 'eval'})", double=not (training and "act" in name))


def check_module(case: Case, *, training: bool) -> None:
    """The layer as f(x, weight, bias) with a fresh copy of its buffers on every call."""
    m = case.build().to(D).train(training)
    bufs = {k: v.clone() for k, v in m.named_buffers()}
    names = [k for k in ("weight", "bias") if k in dict(m.named_parameters())]

    def f(x, *params):
        state = {k: v.clone() for k, v in bufs.items()}
        state.update(dict(zip(names, params)))
        return functional_call(m, state, (x,))

    shape = (5, 3) + (2,) * (len(case.shape) - 2)  # (N, C, *) with 2 per spatial dim
    if case.kind == "renorm" and training:
        # see batch_renorm above: clipped r and d (constant) keep the stop-gradient exact
        with torch.no_grad():
            bufs["running_std"].fill_(3.0)
            bufs["running_mean"].fill_(4.0)
    x = _leaf(shape, 0)
    params = tuple(_leaf((3,), i + 1, 0.3, 1.0 if n == "weight" else 0.0) for i, n in enumerate(names))
    _check(
        f,
        (x, *params),
        f"{case.name} ({'train' if training else 'eval'})",
        double=not (training and case.kind == "act"),
    )


MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


@MODES
@pytest.mark.parametrize("name", FUNCTIONALS)
def test_functional_gradcheck(name: str, training: bool) -> None:
    if _functional(name, training) is None:
        pytest.skip("ghost_batch_norm is training-only")
    check_functional(name, training=training)


@MODES
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_layer_gradcheck(case: Case, training: bool) -> None:
    check_module(copy.copy(case), training=training)


@pytest.mark.parametrize("duals", [(0, 1), (0, 2), (0, 1, 2), (1,), (1, 2)])
def test_eval_forward_ad_through_running_statistics(duals: tuple[int, ...]) -> None:
    """In eval the output depends on the running statistics, and forward AD differentiates
    through them (torch's ``batch_norm`` refuses a tangent on them when the input has one):
    the tangent equals a central finite difference in float64."""
    import torch.autograd.forward_ad as fwAD

    x = _leaf((3, 2, 5), 0).detach()
    mean, var = _stats(2)
    primals = (x, mean, var)
    g = torch.Generator().manual_seed(7)
    tangents = tuple(
        torch.randn(p.shape, generator=g, dtype=D) if i in duals else torch.zeros_like(p) for i, p in enumerate(primals)
    )

    def f(a: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return batchnorm.batch_norm(a, m, v, training=False)

    with fwAD.dual_level():
        args = [
            fwAD.make_dual(p, t) if i in duals else p for i, (p, t) in enumerate(zip(primals, tangents, strict=True))
        ]
        tangent = fwAD.unpack_dual(f(*args)).tangent
    h = 1e-6
    plus = f(*(p + h * t for p, t in zip(primals, tangents, strict=True)))
    minus = f(*(p - h * t for p, t in zip(primals, tangents, strict=True)))
    torch.testing.assert_close(tangent, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-8)
