"""Quick-mode claims hold on digits at the default seed (the cheap experiments; dropout is slow).

PYTHONPATH=src python -m pytest -q tests/lab/test_quick_claims.py          # ~1 minute
PYTHONPATH=src python -m pytest -q -m slow tests/lab/test_quick_claims.py  # dropout too
"""

from __future__ import annotations

from pathlib import Path

import pytest

from batchnorm.lab.config import RunConfig
from batchnorm.lab.runner import run_one


@pytest.mark.parametrize(
    "experiment_id",
    [
        "goodfellow-chain",
        "bias",
        "inference-stats",
        "placement",
        pytest.param("dropout", marks=pytest.mark.slow),
    ],
)
def test_quick_claims_hold_on_digits_seed_0(experiment_id: str, tmp_path: Path) -> None:
    results = run_one(experiment_id, RunConfig(mode="quick", seed=0, out=tmp_path))
    failed = [c for c in results["claims"] if not c["holds"]]
    assert len(results["claims"]) >= 3
    assert not failed, failed
