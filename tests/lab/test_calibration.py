"""The calibration split and the epoch rule shared by the lr-sweep and santurkar2018-* setups.

PYTHONPATH=src python -m pytest -q tests/lab/test_calibration.py
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from batchnorm.lab.config import RunConfig
from batchnorm.lab.datasets import load
from batchnorm.lab.experiment import SEED_PLANS
from batchnorm.lab.experiments import lr_sweep, santurkar2018_landscape, santurkar2018_noisy
from batchnorm.lab.experiments._calibration import CALIBRATION_SEED, calibration_split, epochs_to_steps


def test_calibration_split_partitions_the_training_set_and_never_the_test_set() -> None:
    data = load("digits", 3)
    cal = calibration_split(data, 3)
    n = data.train_x.shape[0]
    assert cal.train_x.shape[0] + cal.test_x.shape[0] == n
    assert cal.test_x.shape[0] == pytest.approx(0.2 * n, abs=10)
    rows = {tuple(r) for r in data.train_x.numpy().round(6).tolist()}
    both = np.concatenate([cal.train_x.numpy(), cal.test_x.numpy()]).round(6).tolist()
    assert all(tuple(r) in rows for r in both)
    # stratified: every class in both parts, in about the training set's proportions
    for part in (cal.train_y, cal.test_y):
        counts = np.bincount(part.numpy(), minlength=10) / part.shape[0]
        np.testing.assert_allclose(counts, np.bincount(data.train_y.numpy(), minlength=10) / n, atol=0.02)
    again = calibration_split(data, 3)
    assert torch.equal(again.test_y, cal.test_y) and torch.equal(again.test_x, cal.test_x)
    assert not torch.equal(calibration_split(data, 4).test_x, cal.test_x)


def test_calibration_split_rejects_a_set_too_small_to_split() -> None:
    data = load("digits", 0)
    tiny = dataclasses.replace(data, train_x=data.train_x[:2], train_y=data.train_y[:2])
    with pytest.raises(ValueError, match="leaves an empty part"):
        calibration_split(tiny, 0)


def test_epochs_to_steps() -> None:
    assert epochs_to_steps(40, 1437, 128) == round(40 * 1437 / 128)
    assert epochs_to_steps(15, 8000, 60) == 2000
    with pytest.raises(ValueError, match="epochs > 0"):
        epochs_to_steps(0, 10, 1)


@pytest.mark.parametrize("module", [lr_sweep, santurkar2018_noisy, santurkar2018_landscape])
def test_step_rule_is_the_same_number_of_epochs_on_every_data_set(module: object) -> None:
    exp = module.EXPERIMENT  # type: ignore[attr-defined]
    batch = {lr_sweep: 60}.get(module, 128)
    epochs = []
    for data in ("digits", "mnist1d"):
        s = exp.settings(RunConfig(mode="quick", data=data))
        n = load(data, 0).train_x.shape[0]
        epochs.append(s.steps * batch / n)
        assert "passes over the training set" in s.steps_rule
        assert dataclasses.is_dataclass(s) and dataclasses.fields(s)
    assert epochs[0] == pytest.approx(epochs[1], rel=0.01)


def test_calibration_seed_is_never_a_claim_seed() -> None:
    assert CALIBRATION_SEED >= 1000 > max(p.cap for p in SEED_PLANS.values())
    with pytest.raises(ValueError, match="calibration seed"):
        santurkar2018_noisy.EXPERIMENT.run(RunConfig(mode="tiny", seeds=(CALIBRATION_SEED,)), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calibration seed"):
        lr_sweep.EXPERIMENT.run(RunConfig(mode="tiny", seeds=(1, CALIBRATION_SEED)), None)  # type: ignore[arg-type]
