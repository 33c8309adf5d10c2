"""Without numba, inputs that the fast CPU kernels would take run on torch ops, and a warning
says so once per process (one line naming the install that fixes it).

    .venv/bin/python -m pytest -q tests/test_fast_path_missing.py
"""

from __future__ import annotations

import warnings

import pytest
import torch

from batchnorm import BatchNorm2d
from batchnorm._kernels import dispatch, torch_ops


@pytest.fixture()
def no_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if numba could not be imported: both numba back-end modules are unavailable."""
    monkeypatch.setattr(dispatch, "_numba_module", {"cpu": None, "cpu_small": None})
    monkeypatch.setattr(dispatch, "_numba_error", {"cpu": "ModuleNotFoundError: No module named 'numba'"})
    monkeypatch.setattr(dispatch, "_warned", {"no_numba": False})
    monkeypatch.setattr(dispatch, "_state", {"name": "auto"})


@pytest.mark.parametrize("numel", [2 * 3 * 4 * 4, dispatch.AUTO_MIN_NUMEL])  # the small and the large path
def test_missing_numba_warns_once_with_the_fix(no_numba: None, numel: int) -> None:
    x = torch.randn(numel // 16, 1, 4, 4)
    with pytest.warns(RuntimeWarning) as record:
        assert dispatch.backend_for(x) is torch_ops
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message and "pip install numba" in message and "No module named 'numba'" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.backend_for(x) is torch_ops  # once per process: silent now


def test_missing_numba_layer_still_matches_torch(no_numba: None) -> None:
    """A tensor large enough for the parallel kernels (small ones run aten's kernels anyway)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 192, 192)
    ours, ref = BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with pytest.warns(RuntimeWarning, match="pip install numba"):
        y = ours(x)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_no_warning_where_the_kernels_never_apply(no_numba: None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.backend_for(torch.randn(4, 3, dtype=torch.float16))  # 16-bit: aten kernels anyway
        with dispatch.use_backend("torch"):
            dispatch.backend_for(torch.randn(4, 3))  # torch chosen by the user
