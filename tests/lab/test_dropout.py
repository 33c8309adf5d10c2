# .venv/bin/python -m pytest -q tests/lab/test_dropout.py            (tiny: seconds)
# .venv/bin/python -m pytest -q -m slow tests/lab/test_dropout.py    (quick mode, minutes)
"""``dropout`` over seeds: the steps rule on the calibration seed, the calibration seed is never
a claim seed, a refuting seed set does not hold; its fixed batches; replicate seeds and means."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch

from batchnorm.lab._replicates import mean_over_replicates, replicate_seed
from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiments import dropout as exp
from batchnorm.lab.experiments._calibration import CALIBRATION_SEED
from batchnorm.lab.progress import Progress
from batchnorm.lab.runner import run_one
from batchnorm.lab.training import minibatches


@pytest.mark.parametrize(
    ("fit", "expected"), [({"plain": 300, "BN, fixed batches": 700}, 1400), ({"dropout 0.5": None}, 1600)]
)
def test_calibration_rule_doubles_the_slowest_arm_and_caps(
    monkeypatch: pytest.MonkeyPatch, fit: dict[str, Any], expected: int
) -> None:
    calls = []

    def fake_train_arm(s: exp.Settings, data: Any, gens: list[int], arm: str, progress: Progress, **kw: Any) -> tuple:
        calls.append((gens, bool(kw["fit_at"])))
        return [], fit.get(arm, 100)

    monkeypatch.setattr(exp, "_train_arm", fake_train_arm)
    s = exp.EXPERIMENT.prepare(RunConfig(mode="quick"), exp.EXPERIMENT.settings(RunConfig(mode="quick")), Progress())
    assert s.steps == expected
    assert all(g == [CALIBRATION_SEED] and stop for g, stop in calls) and len(calls) == 6
    never = s.max_steps + s.calibration_every
    assert s.calibration_fit_steps == {
        name: (fit[name] if fit.get(name, 100) is not None else never) if name in fit else 100
        for name in s.record()["arms"]
    }


def test_the_calibration_seed_is_never_a_claim_seed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calibration seed"):
        exp.EXPERIMENT.run(RunConfig(mode="tiny", seeds=(5, CALIBRATION_SEED), out=tmp_path), Progress())


def test_tiny_run_records_the_rule_and_claims_read_every_seed(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="tiny", seeds=(0, 1, 2), out=tmp_path))
    cfg = results["config"]
    assert (
        cfg["steps"] == cfg["max_steps"] and set(cfg["calibration_fit_steps"]) == set(cfg["arms"]) and cfg["steps_rule"]
    )
    per = results["metrics"]["per_seed"]
    assert all(len(m["BN"]["test_acc"]) == cfg["replicates"] for m in per)
    assert [len(c["seeds"]) for c in results["claims"]] == [3] * 5
    for m in per:  # BN's test loss 0.5 above plain's for every replicate of every seed
        m["BN"]["test_loss"] = [v + 0.5 for v in m["plain"]["test_loss"]]
    first = exp.EXPERIMENT.claims(results)[0]
    assert first["verdict"] == "does not hold" and first["estimate"] == pytest.approx(0.5)


@pytest.mark.slow
def test_quick_mode_on_digits_base_seed_0(tmp_path: Path) -> None:
    """All five claims hold; "dropout 0.5 on top of BN gains < 1 pp" sits near its threshold
    (about +0.4 pp) and needs 16 seeds (the seed plan's futility minimum: at 8 seeds its
    interval still reached past 1 pp); every arm fits."""
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="quick", seed=0, out=tmp_path))
    claims = results["claims"]
    assert [c["verdict"] for c in claims] == ["holds"] * 5, claims
    assert results["metrics"]["seeds"] == list(range(16)) and [c["n_seeds"] for c in claims] == [8, 8, 8, 16, 4]
    assert min(min(m[arm]["train_acc"]) for m in results["metrics"]["per_seed"] for arm in m) >= 0.97


def test_fixed_batches_partition_the_set_and_repeat() -> None:
    stream = exp._fixed_batches(20, 5, torch.Generator().manual_seed(0))
    first = list(islice(stream, 4))
    again = list(islice(stream, 4))
    assert sorted(torch.cat(first).tolist()) == list(range(20))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # the first epoch is the shuffled stream's first epoch (pairs the fixed arm with BN's)
    shuffled = list(islice(minibatches(20, 5, torch.Generator().manual_seed(0)), 4))
    for a, b in zip(first, shuffled):
        assert torch.equal(a, b)


def test_replicate_seeds_and_means() -> None:
    assert replicate_seed(3, 0) == 3
    seeds = {replicate_seed(s, r) for s in range(10) for r in range(4)}
    assert len(seeds) == 40
    assert mean_over_replicates([{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 6.0}]) == {"a": 2.0, "b": 4.0}
    with pytest.raises(ValueError, match="replicate index"):
        replicate_seed(0, -1)
    with pytest.raises(ValueError, match="seed"):
        replicate_seed(200_000, 1)
    with pytest.raises(ValueError, match="same keys"):
        mean_over_replicates([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="at least one"):
        mean_over_replicates([])
