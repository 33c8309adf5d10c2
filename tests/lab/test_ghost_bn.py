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
    s = exp.EXPERIMENT.settings(RunConfig(mode="quick"))
    ratio = s.large_batch // s.small_batch
    specs = {arm: exp._arm_spec(arm, s) for arm in exp._ARMS}
    assert specs["sb"] == {"batch": 32, "lr": s.lr, "ghost": None, "epochs": s.epochs}
    assert specs["lb"] == {"batch": 1024, "lr": s.lr, "ghost": None, "epochs": s.epochs}
    assert specs["lb_lr"]["lr"] == pytest.approx(s.lr * math.sqrt(32))
    assert specs["lb_lr_gbn"] == {**specs["lb_lr"], "ghost": 32}
    assert specs["lb_lr_gbn_ra"] == {**specs["lb_lr_gbn"], "epochs": s.epochs * ratio}


def test_regime_adaptation_makes_as_many_updates_as_the_small_batch(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="tiny", seed=0, out=tmp_path))
    assert results["metrics"]["seeds"] == [0, 1]
    epochs = results["config"]["epochs"]
    for seed in results["metrics"]["per_seed"]:
        arms = seed["arms"]
        n = seed["train_examples"]
        assert arms["sb"]["updates"] == math.ceil(epochs * n / 32)
        assert arms["lb"]["updates"] == math.ceil(epochs * n / 1024)
        assert arms["lb_lr_gbn_ra"]["updates"] == math.ceil(32 * epochs * n / 1024)
        assert abs(arms["lb_lr_gbn_ra"]["updates"] - arms["sb"]["updates"]) <= 1


def test_claims_pair_the_arms_of_each_seed() -> None:
    """Synthetic accuracies: a gap on every seed holds; LB above SB on every seed is refuted."""

    s = exp.EXPERIMENT.settings(RunConfig(mode="quick"))

    def results(acc: dict[str, list[float]]) -> dict:
        per_seed = [
            {"arms": {arm: {"test_acc": v[k], "train_acc": 100.0, "updates": 1} for arm, v in acc.items()}}
            for k in range(3)
        ]
        return {"config": s.record(), "metrics": {"seeds": [0, 1, 2], "per_seed": per_seed}}

    # seed-to-seed spread of 3 pp, but the paired SB - LB gap is 2 pp on every seed
    good = {
        "sb": [95.0, 98.0, 96.0],
        "lb": [93.0, 96.0, 94.0],
        "lb_lr": [94.0, 97.0, 95.0],
        "lb_lr_gbn": [94.5, 97.4, 95.6],
        "lb_lr_gbn_ra": [95.2, 98.1, 96.3],
    }
    assert [c["verdict"] for c in exp.EXPERIMENT.claims(results(good))] == ["holds"] * 3
    assert exp.EXPERIMENT.claims(results(good))[0]["estimate"] == pytest.approx(2.0)
    bad = dict(good, lb=[97.0, 99.0, 98.0])
    assert exp.EXPERIMENT.claims(results(bad))[0]["verdict"] == "does not hold"


@pytest.mark.slow
def test_quick_mode_claims_on_digits_base_seed_0(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="quick", seed=0, data="digits", out=tmp_path))
    claims = results["claims"]
    assert [c["verdict"] for c in claims] == ["holds"] * 3, claims
    assert [c["n_seeds"] for c in claims] == [8, 16, 8], claims
