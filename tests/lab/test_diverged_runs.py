"""A run that diverged is shown and counted as diverged, never as 0% accuracy: results.json
stores it as accuracy 0 with a ``diverged_at`` step (lr-sweep) or ``"diverged": true``
(santurkar2018-noisy); the evidence says "diverged" and the figures leave it out of means.

    PYTHONPATH=src python -m pytest -q tests/lab/test_diverged_runs.py
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from batchnorm.lab import registry
from batchnorm.lab.config import RunConfig
from batchnorm.lab.figures import save_all
from batchnorm.lab.runner import run_one

from ._layout import checking_layout


def _evidence(module: Any, results: dict[str, Any]) -> str:
    return " ".join(str(c["evidence"]) for c in module.claims(results))


def test_lr_sweep_names_diverged_runs(tmp_path: Path) -> None:
    module = registry.get("lr-sweep")
    results = copy.deepcopy(run_one("lr-sweep", RunConfig(mode="tiny", seed=0, out=tmp_path)))
    high = [float(v) for v in results["config"]["lrs"]].index(float(results["config"]["high_lr"]))
    plain = results["metrics"]["per_seed"][1]["plain"]
    plain["test_acc"][high], plain["diverged_at"][high] = 0.0, 3  # seed 1 diverged at step 3
    evidence = _evidence(module, results)
    assert "plain " in evidence and ", diverged (plain diverged on 1 of 2 seeds" in evidence
    assert "0.0%" not in evidence
    with checking_layout() as problems:
        paths = save_all(module.figures(results), tmp_path)
    assert problems == [] and paths


def test_noisy_names_diverged_runs(tmp_path: Path) -> None:
    module = registry.get("santurkar2018-noisy")
    results = copy.deepcopy(run_one("santurkar2018-noisy", RunConfig(mode="tiny", seed=0, out=tmp_path)))
    hi = results["config"]["lrs"][-1]
    run = results["metrics"]["per_seed"][0][f"none@{hi:g}"]
    run.update(diverged=True, final_train_acc=0.0, mean_train_loss=1e3)
    evidence = _evidence(module, results)
    assert f"at lr {hi:g} per seed: no BN diverged, " in evidence and "(1 of 2 diverged)" in evidence
    with checking_layout() as problems:
        paths = save_all(module.figures(results), tmp_path)
    assert problems == [] and paths
