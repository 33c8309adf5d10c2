"""ghost-bn: the five arms' recipes (Hoffer et al. 2017) and the quick-mode claims.

PYTHONPATH=src python -m pytest -q tests/lab/test_ghost_bn.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiments import ghost_bn as exp
from batchnorm.lab.runner import run_one


def test_arm_recipes_follow_the_paper() -> None:
    s = exp._settings(RunConfig(mode="quick"))
    ratio = s["large_batch"] // s["small_batch"]
    specs = {arm: exp._arm_spec(arm, s) for arm in exp._ARMS}
    assert specs["sb"] == {"batch": 32, "lr": s["lr"], "ghost": None, "epochs": s["epochs"]}
    assert specs["lb"] == {"batch": 1024, "lr": s["lr"], "ghost": None, "epochs": s["epochs"]}
    assert specs["lb_lr"]["lr"] == pytest.approx(s["lr"] * math.sqrt(32))
    assert specs["lb_lr_gbn"] == {**specs["lb_lr"], "ghost": 32}
    assert specs["lb_lr_gbn_ra"] == {**specs["lb_lr_gbn"], "epochs": s["epochs"] * ratio}


def test_regime_adaptation_makes_as_many_updates_as_the_small_batch(tmp_path: Path) -> None:
    results = run_one(exp.ID, RunConfig(mode="tiny", seed=0, out=tmp_path))
    arms = results["metrics"]["arms"]
    n = results["data"]["train"]
    epochs = results["config"]["epochs"]
    assert arms["sb"]["runs"][0]["updates"] == math.ceil(epochs * n / 32)
    assert arms["lb"]["runs"][0]["updates"] == math.ceil(epochs * n / 1024)
    assert arms["lb_lr_gbn_ra"]["runs"][0]["updates"] == math.ceil(32 * epochs * n / 1024)
    assert abs(arms["lb_lr_gbn_ra"]["runs"][0]["updates"] - arms["sb"]["runs"][0]["updates"]) <= 1


@pytest.mark.slow
def test_quick_mode_claims_hold_on_digits(tmp_path: Path) -> None:
    results = run_one(exp.ID, RunConfig(mode="quick", seed=0, data="digits", out=tmp_path))
    failed = [c for c in results["claims"] if not c["holds"]]
    assert not failed, failed
