# .venv/bin/python -m pytest -q tests/lab/test_placement.py            (tiny: seconds)
# .venv/bin/python -m pytest -q -m slow tests/lab/test_placement.py    (quick mode, minutes)
"""``placement`` over seeds: the steps rule is the same on every data set, replicates are paired
across arms and averaged inside a seed, a refuting seed set does not hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiment import first_reaching
from batchnorm.lab.experiments import placement as exp
from batchnorm.lab.runner import run_one


def test_steps_rule_is_the_same_on_every_data_set() -> None:
    for mode, steps in (("quick", 2000), ("full", 20000)):
        digits = exp.EXPERIMENT.settings(RunConfig(mode=mode, data="digits")).record()
        mnist1d = exp.EXPERIMENT.settings(RunConfig(mode=mode, data="mnist1d")).record()
        assert digits == mnist1d and digits["steps"] == steps and digits["steps_rule"]
        assert digits["checkpoint_every"] * 20 == steps and digits["replicates"] >= 3


def test_first_reaching_counts_never_as_one_checkpoint_past_the_end() -> None:
    assert first_reaching([0, 10, 20, 30], [0.1, 0.5, 0.9, 0.95], 0.9) == 20.0
    assert first_reaching([0, 10, 20, 30], [0.9, 0.5, 0.6, 0.7], 0.9) == 40.0  # step 0 does not count
    assert first_reaching([0, 25], [0.1, 0.2], 0.9) == 50.0
    with pytest.raises(ValueError, match="as many values as steps"):
        first_reaching([0, 10], [0.1], 0.9)


def test_tiny_run_pairs_arms_and_claims_read_every_seed(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="tiny", seeds=(0, 1, 2), out=tmp_path))
    per = results["metrics"]["per_seed"]
    reps = results["config"]["replicates"]
    assert len(per) == 3 and all(len(m[arm]) == reps for m in per for arm in m)
    assert [len(c["seeds"]) for c in results["claims"]] == [3] * 4
    # ReLU after-BN 5 pp below before-BN at every checkpoint, every seed and replicate: refuted
    for m in per:
        for before, after in zip(m["relu/before"], m["relu/after"]):
            after["test_acc"] = [a - 0.05 for a in before["test_acc"]]
    last = exp.EXPERIMENT.claims(results)[3]
    assert last["verdict"] == "does not hold" and last["estimate"] == pytest.approx(0.05)


@pytest.mark.slow
def test_quick_mode_on_digits_base_seed_0(tmp_path: Path) -> None:
    """All four claims hold; the ReLU placements' closeness needs the second look (8 seeds)."""
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="quick", seed=0, out=tmp_path))
    claims = results["claims"]
    assert [c["verdict"] for c in claims] == ["holds"] * 4, claims
    assert [c["n_seeds"] for c in claims] == [4, 4, 4, 8], claims
