"""Lab infrastructure: atomic results, JSON conversion, registry contract.

PYTHONPATH=src python -m pytest -q tests/lab/test_results_and_registry.py
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from batchnorm._files import write_text_atomic
from batchnorm.lab import registry
from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiment import Experiment
from batchnorm.lab.report import explanation
from batchnorm.lab.results import load_results, save_results, to_jsonable


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.json"
    write_text_atomic(path, '{"old": 1}')

    def boom(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_results(tmp_path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp file left


def test_to_jsonable_handles_tensors_and_non_finite_values(tmp_path: Path) -> None:
    value = {"t": torch.tensor([1.5, float("nan")]), "inf": -math.inf, "p": Path("a/b"), "tup": (1, 2)}
    out = to_jsonable(value)
    assert out == {"t": [1.5, "nan"], "inf": "-inf", "p": "a/b", "tup": [1, 2]}
    save_results(tmp_path, value)
    back = load_results(tmp_path)
    assert float(back["inf"]) == -math.inf and math.isnan(float(back["t"][1]))
    with pytest.raises(TypeError, match="cannot serialize"):
        to_jsonable(object())
    with pytest.raises(ValueError, match="no results.json"):
        load_results(tmp_path / "missing")


def test_every_registered_experiment_satisfies_the_contract() -> None:
    ids = registry.EXPERIMENTS
    assert ids[0] == "ioffe2015-fig1"
    assert len(set(ids)) == len(ids)
    for experiment_id in ids:
        experiment = registry.get(experiment_id)
        assert isinstance(experiment, Experiment) and experiment.ID == experiment_id
        assert "\n" not in experiment.DESCRIPTION and 0 < len(experiment.DESCRIPTION) <= 160
        assert len(explanation(experiment).split()) > 50  # the Markdown file beside the module
        assert not hasattr(experiment, "EXPLANATION")  # prose lives in Markdown only
    with pytest.raises(ValueError, match="unknown experiment"):
        registry.get("nope")


def test_run_config_validates_and_picks_by_mode() -> None:
    cfg = RunConfig(mode="quick", seed=3, out="x")  # type: ignore[arg-type]
    assert cfg.out == Path("x")
    assert to_jsonable(asdict(cfg)) == {"mode": "quick", "seed": 3, "data": "digits", "out": "x", "seeds": None}
    assert RunConfig(seeds=[4, 2]).seeds == (4, 2) and to_jsonable(asdict(RunConfig(seeds=(1,))))["seeds"] == [1]
    for bad in ([], [1, 1], [-1], [True], ["0"]):
        with pytest.raises(ValueError, match="seeds"):
            RunConfig(seeds=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        RunConfig(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        RunConfig(seed=-1)


def test_claims_are_counted_by_verdict_and_kind_for_the_report_and_the_cli() -> None:
    from batchnorm.lab.report import verdict_counts
    from batchnorm.lab.results import count_claims, describe_counts, verdict_of

    claims = [
        {"verdict": "holds"},
        {"verdict": "inconclusive", "holds": False},
        {"holds": False},  # older results: no verdict, ``holds`` decides
        {"holds": True, "kind": "identity"},
    ]
    assert [verdict_of(c) for c in claims] == ["holds", "inconclusive", "does not hold", "holds"]
    counts = count_claims(claims)
    assert counts == {
        "replication": {"holds": 1, "does not hold": 1, "inconclusive": 1},
        "identity": {"holds": 1, "does not hold": 0, "inconclusive": 0},
    }
    assert describe_counts(counts) == "3 replications: 1 hold, 1 do not hold, 1 inconclusive; 1 identity holds"
    assert verdict_counts(claims) == (
        "replications: 1 hold, 1 do not hold, 1 inconclusive (of 3); "
        "identities of the math: 1 hold, 0 do not hold, 0 inconclusive (of 1)"
    )
    assert describe_counts(count_claims([])) == "no claims" and verdict_counts(claims[:1]).endswith("(of 1)")
