"""Quick-mode claims hold on digits at the default seed (experiments judged over seeds have
their own quick-mode tests: test_<id>.py).

    PYTHONPATH=src python -m pytest -q tests/lab/test_quick_claims.py          # ~1 minute
    PYTHONPATH=src python -m pytest -q -m slow tests/lab/test_quick_claims.py  # the slow ones too
"""

from __future__ import annotations

from pathlib import Path

import pytest

from batchnorm.lab.config import RunConfig
from batchnorm.lab.runner import run_one


@pytest.mark.parametrize(
    "experiment_id",
    [
        "inference-stats",
    ],
)
def test_quick_claims_hold_on_digits_seed_0(experiment_id: str, tmp_path: Path) -> None:
    results = run_one(experiment_id, RunConfig(mode="quick", seed=0, out=tmp_path))
    claims = results["claims"]
    assert [c["verdict"] for c in claims] == ["holds"] * 5, claims
    assert [c["n_seeds"] for c in claims] == [4] * 5, claims
    # the three test-time statistics give the same accuracy on every seed: zero spread, no interval
    assert [c["zero_spread"] for c in claims] == [True, False, False, False, False], claims
