# PYTHONPATH=src python -m pytest -q tests/lab/test_claim.py
"""``claims_spec.claim``: the sequential rule applied to saved results, and the fields a report
shows (rule, seeds, threshold, margin, why, zero spread, kind)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchnorm.lab.claims_spec import claim
from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiment import SEED_PLANS, Experiment, column, plan_for, seeds_for
from batchnorm.lab.progress import Progress
from batchnorm.lab.verdict import Part


def _results(n: int, looks: tuple[int, ...] | None = (4, 8, 16)) -> dict[str, Any]:
    metrics: dict[str, Any] = {"seeds": list(range(n)), "per_seed": [{} for _ in range(n)]}
    if looks is not None:
        metrics["plan"] = {"looks": list(looks), "alpha": 0.05}
    return {"metrics": metrics}


def _claim(results: dict[str, Any], a: Any, **kw: Any) -> dict[str, Any]:
    return claim("c", results=results, a=a, expected="e", source="s", evidence="v", **kw)


def test_plans_and_seeds_of_a_run() -> None:
    quick = plan_for(RunConfig(mode="quick"))
    assert quick.looks == (4, 8, 16, 32) and quick.min_futility == 16 and SEED_PLANS["tiny"].looks == (2,)
    assert quick.confidence == pytest.approx(1 - 0.05 / 4)
    assert SEED_PLANS["full"].looks == (5, 10, 20) and SEED_PLANS["full"].min_futility == 10
    assert seeds_for(RunConfig(mode="quick", seed=16)) == tuple(range(16, 48))
    assert plan_for(RunConfig(mode="quick", seeds=(3, 5, 9))).looks == (3,)  # explicit seeds: one look at 95%
    assert plan_for(RunConfig(mode="quick", seeds=(3, 5, 9))).confidence == pytest.approx(0.95)


def test_a_clear_effect_is_decided_at_the_first_look_with_its_fields() -> None:
    c = _claim(_results(16), [1.0, 1.2, 0.9, 1.1] * 4, above=0.5)
    assert c["verdict"] == "holds" and c["holds"] and c["n_seeds"] == 4 and c["seeds"] == [0, 1, 2, 3]
    assert c["threshold"] == 0.5 and c["margin"] == pytest.approx(1.05 - 0.5)
    assert c["kind"] == "replication" and not c["zero_spread"] and not c["could_settle"]
    assert "4, 8, 16" in c["rule"] and "98.3%" in c["rule"] and "claimed side" in c["why"]
    assert c["confidence"] == pytest.approx(1 - 0.05 / 3)


def test_an_effect_at_its_threshold_stays_inconclusive_and_says_how_close() -> None:
    rng = np.random.default_rng(0)
    c = _claim(_results(16), 0.5 + rng.normal(0, 1, 16), above=0.5, below=2.0)
    assert c["verdict"] == "inconclusive" and c["n_seeds"] == 16 and c["threshold"] == [0.5, 2.0]
    assert "cap" in c["why"] and "half-width" in c["why"] and abs(c["margin"]) < 1.0


def test_why_names_the_part_more_seeds_could_not_settle() -> None:
    settles = [1.0, -0.4, 1.6, 0.6]  # estimate 0.7, spread 0.85: 16 seeds would decide it
    hopeless = [0.1, -0.2, 0.15, -0.05]  # estimate 0, on the threshold
    c = _claim(_results(4), settles, above=0.0, also=[Part(hopeless, above=0.0)])
    assert c["verdict"] == "inconclusive" and not c["could_settle"]
    assert c["why"].startswith("part 2") and "no more seeds" in c["why"]
    assert [p["verdict"] for p in c["parts"]] == ["inconclusive", "inconclusive"]
    alone = _claim(_results(4), settles, above=0.0)
    assert alone["could_settle"]  # the run would train the next block for it


def test_zero_spread_and_identities_are_reported_as_such() -> None:
    c = _claim(_results(4), [5.75] * 4, above=2.0, kind="identity")
    assert c["zero_spread"] and c["kind"] == "identity" and "zero spread" in c["why"]
    assert c["interval"] == [5.75, 5.75] and "no interval" in c["method"]
    with pytest.raises(ValueError, match="kind"):
        _claim(_results(4), [1.0] * 4, above=0.0, kind="guess")  # type: ignore[arg-type]


def test_results_without_a_plan_are_one_look_over_every_seed() -> None:
    c = _claim(_results(3, looks=None), [1.0, 1.2, 0.9], above=0.5)
    assert c["n_seeds"] == 3 and c["confidence"] == pytest.approx(0.95) and "fixed" in c["rule"]


def test_saved_plan_keeps_its_futility_minimum() -> None:
    results = _results(16, looks=(4, 8, 16, 32))
    results["metrics"]["plan"]["futility_from"] = 16
    c = _claim(results, [1.0, 1.2, 0.9, 1.1] * 4, above=0.5)
    assert "4, 8, 16, 32" in c["rule"] and "98.8%" in c["rule"] and "before 16 seeds" in c["rule"]


@dataclasses.dataclass(frozen=True)
class _FakeSettings:
    threshold: float = 0.0

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Fake(Experiment):
    """One claim on a fixed value per seed (no training): 'value >= 0'."""

    ID = "fake"
    DESCRIPTION = "fake"

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)
        self.trained: list[int] = []

    def settings(self, cfg: RunConfig) -> _FakeSettings:
        return _FakeSettings()

    def load_seed(self, cfg: RunConfig, settings: Any, seed: int) -> int:
        return seed

    def describe_data(self, settings: Any, first: Any) -> dict[str, Any]:
        return {}

    def run_seed(self, settings: Any, data: Any, seed: int, progress: Progress) -> dict[str, Any]:
        self.trained.append(seed)
        return {"x": self.values[seed]}

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [_claim(results, column(results["metrics"]["per_seed"], "x"), above=0.0)]


def test_a_run_trains_an_undecided_claim_to_16_seeds_before_any_futility_stop(tmp_path: Path) -> None:
    # mean 0.5, sd 0.36 over 32 seeds, but the first 4 scatter (sd 1.1): projected from them the
    # claim looks hopeless, and the former rule stopped the run at 4 seeds, undecided
    x = np.array([1.9, -0.8, 0.2, 0.7] + [0.55, 0.35, 0.6, 0.45] * 7)
    fake = _Fake(x + (0.5 - x.mean()))
    results = fake.run(RunConfig(mode="quick", out=tmp_path), Progress())
    assert fake.trained == list(range(16)) and results["metrics"]["seeds"] == list(range(16))
    assert results["metrics"]["plan"] == {"looks": [4, 8, 16, 32], "alpha": 0.05, "futility_from": 16}
    assert fake.claims(results)[0]["verdict"] == "holds"


def test_a_run_stops_at_16_seeds_when_the_cap_could_not_settle_a_claim(tmp_path: Path) -> None:
    # an effect on its threshold: inconclusive at every look; 16 seeds, then the projection stops it
    fake = _Fake(np.random.default_rng(3).normal(0.0, 1.0, 32))
    results = fake.run(RunConfig(mode="quick", out=tmp_path), Progress())
    c = fake.claims(results)[0]
    assert fake.trained == list(range(16)) and c["verdict"] == "inconclusive" and not c["could_settle"]
    assert "no more seeds" in c["why"] and "half-width" in c["why"]
