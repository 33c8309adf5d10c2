"""Shared test fixtures."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Without CUDA, import triton (when installed) in interpreter mode before any test runs.

    Triton creates its language functions in the mode of its first import. ``torch.compile``
    imports triton when it is installed, so a test that compiles would otherwise leave the
    interpreter tests of ``tests/test_kernels_triton.py`` with functions they cannot call.
    """
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
