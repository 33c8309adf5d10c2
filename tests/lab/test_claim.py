# PYTHONPATH=src python -m pytest -q tests/lab/test_claim.py
"""``experiment.claim``: the sequential rule applied to saved results, and the fields a report
shows (rule, seeds, threshold, margin, why, zero spread, kind)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiment import SEED_PLANS, claim, plan_for, seeds_for
from batchnorm.lab.verdict import part


def _results(n: int, looks: tuple[int, ...] | None = (4, 8, 16)) -> dict[str, Any]:
    metrics: dict[str, Any] = {"seeds": list(range(n)), "per_seed": [{} for _ in range(n)]}
    if looks is not None:
        metrics["plan"] = {"looks": list(looks), "alpha": 0.05}
    return {"metrics": metrics}


def _claim(results: dict[str, Any], a: Any, **kw: Any) -> dict[str, Any]:
    return claim("c", results=results, a=a, expected="e", source="s", evidence="v", **kw)


def test_plans_and_seeds_of_a_run() -> None:
    assert plan_for(RunConfig(mode="quick")).looks == (4, 8, 16) and SEED_PLANS["tiny"].looks == (2,)
    assert seeds_for(RunConfig(mode="quick", seed=16)) == tuple(range(16, 32))
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
    c = _claim(_results(4), settles, above=0.0, also=[part(hopeless, above=0.0)])
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
