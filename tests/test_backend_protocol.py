"""The kernel back-ends satisfy the typed contract in ``batchnorm._kernels.backend``.

Run: .venv/bin/python -m pytest -q tests/test_backend_protocol.py
"""

from __future__ import annotations

import importlib
import importlib.util
import types

import pytest
from torch import Tensor

from batchnorm._kernels import dispatch, native, torch_ops
from batchnorm._kernels.backend import KernelBackend, NumbaBackend, signature_mismatches


def _numba_modules() -> list[types.ModuleType]:
    pytest.importorskip("numba")
    from batchnorm._kernels import cpu, cpu_small

    return [cpu, cpu_small]


def test_torch_ops_is_a_kernel_backend() -> None:
    assert isinstance(torch_ops, KernelBackend)
    assert signature_mismatches(torch_ops, KernelBackend) == []


def test_numba_modules_are_numba_backends() -> None:
    for mod in _numba_modules():
        assert isinstance(mod, NumbaBackend), mod.__name__
        assert signature_mismatches(mod, NumbaBackend) == [], mod.__name__


def test_native_module_is_a_numba_style_backend() -> None:
    """The aten-kernel back-end needs no numba and answers ``supports`` like the numba modules."""
    assert isinstance(native, NumbaBackend)
    assert signature_mismatches(native, NumbaBackend) == []


def test_triton_module_is_a_numba_style_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    # created for the interpreter, as the Triton tests need it: triton and triton_bn read the
    # setting when first imported
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_bn = importlib.import_module("batchnorm._kernels.triton_bn")

    assert isinstance(triton_bn, NumbaBackend)
    assert signature_mismatches(triton_bn, NumbaBackend) == []


def test_protocol_names_are_dispatch_contract() -> None:
    """The protocol and dispatch's list of names describe the same functions."""
    names = {n for n in dir(NumbaBackend) if not n.startswith("_")}
    assert names == set(dispatch.BACKEND_API)


def test_mismatches_are_reported() -> None:
    """A module with a missing function, a renamed parameter, a wrong annotation and an
    extra required parameter is caught on each count."""

    def train_forward(
        x: Tensor, weight: Tensor | None, bias: Tensor | None, epsilon: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def eval_forward(
        x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: int
    ) -> Tensor:
        raise NotImplementedError

    def batch_stats(x: Tensor, unbiased: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def supports(x: Tensor, *, check_layout: bool = True) -> bool:  # a defaulted extra is fine
        raise NotImplementedError

    fake = types.ModuleType("fake_backend")
    for f in (train_forward, eval_forward, batch_stats, supports):
        setattr(fake, f.__name__, f)
    assert not isinstance(fake, NumbaBackend)  # backward & co. are missing
    problems = signature_mismatches(fake, NumbaBackend)
    joined = "\n".join(problems)
    assert "fake_backend.backward: missing" in joined
    assert "fake_backend.train_forward: parameters" in joined
    assert "fake_backend.eval_forward: eps is <class 'int'>" in joined
    assert "batch_stats: extra parameter 'unbiased' has no default" in joined
    assert not any(p.startswith("fake_backend.supports") for p in problems)
