"""A training step (forward + backward) and an eval step read nothing back to the host.

Two detectors: (1) on CPU, ``Tensor.item``, ``__bool__``, ``__float__``, ``__int__``,
``__index__``, ``tolist`` and ``cpu`` raise while the step runs (what would be a device sync on
a GPU); (2) the step runs on the ``meta`` device, where any data-dependent read raises (torch's
BN runs there with momentum=0.1). Output shape and dtype are all a meta tensor has to check;
the values are checked by every other test.

Run: .venv/bin/python -m pytest -q tests/integration/test_no_host_sync.py
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

import batchnorm

from ._cases import CASES, Case

FORBIDDEN = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu")


@contextlib.contextmanager
def forbid_host_reads() -> Iterator[None]:
    """Make the Tensor methods that read data into Python raise (restored on exit)."""
    saved = {name: getattr(torch.Tensor, name) for name in FORBIDDEN}

    def make(name: str):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name}() called during the step")

        return raiser

    try:
        for name in FORBIDDEN:
            setattr(torch.Tensor, name, make(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _step(m: torch.nn.Module, x: torch.Tensor, *, training: bool, grad: bool) -> torch.Tensor:
    m.train(training)
    if not grad:
        with torch.no_grad():
            return m(x)
    x = x.detach().requires_grad_()
    y = m(x)
    y.backward(torch.ones_like(y))
    return y


def check_no_host_read(case: Case, *, training: bool, grad: bool) -> None:
    m = case.build()
    x = case.inputs(1)[0]
    _step(m, x, training=training, grad=grad)  # warm-up: lazy initialisation may read once
    with forbid_host_reads():
        _step(m, x, training=training, grad=grad)


def check_meta(case: Case, *, training: bool, grad: bool) -> None:
    m = case.build().to("meta")
    x = case.inputs(1)[0].to("meta")
    y = _step(m, x, training=training, grad=grad)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype, (y.device, y.shape, y.dtype)


MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
GRAD = pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
# the default, and "native": aten's kernels, the CUDA default (run on CPU and meta here)
BACKENDS = pytest.mark.parametrize("backend", ["auto", "native"])


@BACKENDS
@GRAD
@MODES
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_step_reads_nothing_back(case: Case, training: bool, grad: bool, backend: str) -> None:
    with batchnorm.use_backend(backend):
        check_no_host_read(case, training=training, grad=grad)


@BACKENDS
@GRAD
@MODES
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_step_runs_on_meta_device(case: Case, training: bool, grad: bool, backend: str) -> None:
    with batchnorm.use_backend(backend):
        check_meta(case, training=training, grad=grad)
