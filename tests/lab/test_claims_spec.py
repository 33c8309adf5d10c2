"""The claims files (``experiments/<name>.claims.toml``): a malformed file is refused with a
clear ``ValueError``; every experiment's file loads, and a tiny run makes exactly its claims,
in order, each statement its table's template filled in. The settings files
(``experiments/<name>.settings.toml``): a run's settings record every field and every setting of
the file, the computed fields first, then the file's in its order.

    PYTHONPATH=src python -m pytest -q tests/lab/test_claims_spec.py
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from pathlib import Path

import pytest
import torch

from batchnorm.lab import claims_spec, registry
from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiments._calibration import CALIBRATION_SEED
from batchnorm.lab.progress import Progress
from batchnorm.lab.results import to_jsonable
from batchnorm.lab.verdict import Part

GOOD = """
[first]
statement = "x at least {speedup:g}x"
expected = "3x"
source = "Fig. 1"
effect = "ratio"
above = "speedup"

[second]
statement = "y within {band_pp:g} pp"
expected = "none"
source = "Sec. 2"
kind = "identity"
above = "-band"
below = 0.5
a = "gap"
also = [{ a = "gap", b = "base", effect = "ratio", above = 2 }]
evidence = "gap per seed: {gap:+.2f}; first seed {seed0}, steps {steps:g}, mean {mean[gap]:.1f}"
"""


def _with_claims_file() -> list[str]:
    """The experiments that declare their claims in a claims file."""
    out = []
    for experiment_id in registry.EXPERIMENTS:
        package, name = registry.module_name(experiment_id).rsplit(".", 1)
        if importlib.resources.files(package).joinpath(f"{name}.claims.toml").is_file():
            out.append(experiment_id)
    return out


def test_parse_keeps_the_tables_in_order() -> None:
    specs = claims_spec.parse(GOOD, "good.toml")
    assert list(specs) == ["first", "second"]
    assert specs["second"]["below"] == 0.5 and specs["first"]["effect"] == "ratio"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace('expected = "3x"\n', ""), r"\[first\] lacks expected"),
        (GOOD.replace('source = "Sec. 2"\n', ""), r"\[second\] lacks source"),
        (GOOD.replace('effect = "ratio"', 'efect = "ratio"'), r"\[first\] has unknown key\(s\) efect"),
        (GOOD.replace("below = 0.5", "below = [0.5]"), r"\[second\] expected each threshold"),
        (GOOD.replace('a = "gap"', "a = 1"), r"\[second\] expected a and b a column's name"),
        (
            GOOD.replace("evidence = ", "evidence = 1 #"),
            r"\[second\] expected a and b a column's name, evidence a template",
        ),
        (
            GOOD.replace("also = [{", "also = {").replace("above = 2 }]", "above = 2 }"),
            r"\[second\] expected also an array",
        ),
        (
            GOOD.replace('effect = "ratio", above = 2', 'efect = "ratio", above = 2'),
            r"\[second\] also's part 1 expected a, a threshold and .*, got \['a', 'above', 'b', 'efect'\]",
        ),
        (GOOD.replace(', effect = "ratio", above = 2', ""), r"\[second\] also's part 1 expected a, a threshold"),
        ('statement = "x"\n', "expected one \\[name\\] table per claim"),
        ("", "expected one \\[name\\] table per claim"),
    ],
)
def test_a_malformed_file_is_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"bad\.toml: " + message):
        claims_spec.parse(text, "bad.toml")


def test_invalid_toml_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        claims_spec.parse("[first\nstatement = ", "bad.toml")


def test_thresholds_and_statements_resolve_from_settings_and_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims_spec, "load", lambda module: claims_spec.parse(GOOD, f"{module}.claims.toml"))
    results = {"config": {"speedup": 3.0, "band": 0.01}, "metrics": {"seeds": [0, 1], "per_seed": [{}, {}]}}
    make = claims_spec.Claims("experiments.demo", results, band_pp=1.0, gap=[0.1, 0.2], base=[0.01, 0.02])
    first = make("first", a=[9.0, 12.0], b=[1.0, 2.0], evidence="e")
    second = make("second", a=[0.1, 0.2], evidence="e")
    assert first["claim"] == "x at least 3x" and first["threshold"] == 3.0 and first["direction"] == "a / b >= 3"
    assert second["claim"] == "y within 1 pp" and second["threshold"] == [-0.01, 0.5] and second["kind"] == "identity"
    assert (second["expected"], second["source"]) == ("none", "Sec. 2")


def test_a_claim_declared_in_full_is_judged_from_the_columns_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims_spec, "load", lambda module: claims_spec.parse(GOOD, f"{module}.claims.toml"))
    results = {"config": {"speedup": 3.0, "band": 0.01}, "metrics": {"seeds": [4, 5], "per_seed": [{}, {}]}}
    gap, base = [0.1, 0.25], [0.04, 0.1]
    values = {"gap": gap, "base": base, "steps": [120, 95], "mean": {"gap": 0.175}, "band_pp": 1.0}
    make = claims_spec.Claims("experiments.demo", results, **values)
    declared = make("second")
    by_hand = make("second", a=gap, evidence="e", also=[Part(gap, base, effect="ratio", above=2)])
    assert declared["evidence"] == "gap per seed: +0.10, +0.25; first seed 4, steps 120, 95, mean 0.2"
    assert {**declared, "evidence": "e"} == by_hand
    assert [p["direction"] for p in declared["parts"]] == ["-0.01 <= value <= 0.5", "a / b >= 2"]
    first = make("first", a=[9.0, 12.0], b=[1.0, 2.0], evidence="e")
    assert make.all(first=first) == [first, declared]


def test_evidence_lists_a_list_formatted_with_a_spec() -> None:
    assert claims_spec.listed([0.5, 2, 1e-3]) == "0.5, 2.0, 0.0"
    assert claims_spec.listed([0.5, 2], "{:.3g}x") == "0.5x, 2x"
    assert claims_spec.listed([0.5, 2], "{:.3g}", "/") == "0.5/2"
    assert (
        claims_spec._Evidence().format("{v:.1f}; {v}; {d[k]:g}", v=[1, 2.25], d={"k": (3, 4)})
        == "1.0, 2.2; [1, 2.25]; 3, 4"
    )


def test_every_experiment_has_a_claims_file() -> None:
    assert _with_claims_file() == list(registry.EXPERIMENTS)


@pytest.mark.parametrize("experiment_id", _with_claims_file())
def test_a_tiny_run_makes_exactly_the_declared_claims(experiment_id: str, tmp_path: Path) -> None:
    module = registry.get(experiment_id)
    specs = claims_spec.load(registry.module_name(experiment_id))
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runner does: these models are tiny
    try:
        results = to_jsonable(module.run(RunConfig(mode="tiny", seed=0, out=tmp_path), Progress()))
    finally:
        torch.set_num_threads(saved)
    made = module.claims(results)
    assert len(made) == len(specs)
    for spec, c in zip(specs.values(), made):
        pattern = "".join(
            ".+?" if i % 2 else re.escape(p) for i, p in enumerate(re.split(r"\{[^{}]*\}", spec["statement"]))
        )
        assert re.fullmatch(pattern, c["claim"]), (spec["statement"], c["claim"])
        assert (c["expected"], c["source"]) == (spec["expected"], spec["source"])


@pytest.mark.parametrize("experiment_id", registry.EXPERIMENTS)
def test_settings_record_the_computed_fields_then_the_file_in_order(experiment_id: str) -> None:
    s = registry.get(experiment_id).settings(RunConfig(mode="quick"))
    if not isinstance(s, claims_spec.Declared):
        pytest.skip(f"{experiment_id} declares every setting in code")
    declared = claims_spec.load_settings(registry.module_name(experiment_id))
    fields = [f.name for f in dataclasses.fields(s)]
    record = s.record()
    assert list(record) == [name for name in fields if name not in declared] + list(declared)
    assert all(repr(record[name]) == repr(getattr(s, name)) for name in fields)  # nan too
    assert dataclasses.replace(s).record() == record
    assert record.get("calibration_seed", CALIBRATION_SEED) == CALIBRATION_SEED
    with pytest.raises(ValueError, match="no field"):
        type(s).of(not_a_setting=1)
    with pytest.raises(ValueError, match="no value"):
        type(s).of()  # the fields computed by mode or in code have no value in the file
