"""Every experiment runs end to end in tiny mode: results.json, claims, figures (no text box
overlapping another, drawn over another panel or off the canvas), report;
``lab report`` redraws from the saved results without training; ``lab run all`` writes an index.

    PYTHONPATH=src python -m pytest -q tests/lab/test_experiments_tiny.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchnorm.cli import main
from batchnorm.lab import registry
from batchnorm.lab.config import RunConfig
from batchnorm.lab.runner import redraw, run_one
from batchnorm.lab.verdict import VERDICTS

from ._layout import checking_layout


@pytest.mark.parametrize("experiment_id", registry.EXPERIMENTS)
def test_tiny_run_writes_results_figures_and_report(experiment_id: str, tmp_path: Path) -> None:
    with checking_layout() as problems:  # every figure drawn: no text overlaps or leaves the canvas
        results = run_one(experiment_id, RunConfig(mode="tiny", seed=0, out=tmp_path))
    assert problems == []
    directory = tmp_path / experiment_id
    saved = json.loads((directory / "results.json").read_text())
    assert saved == results
    assert saved["run"] == {"mode": "tiny", "seed": 0, "data": "digits", "seeds": None}
    assert {"python", "torch", "numpy", "batchnorm"} <= set(saved["versions"])
    assert saved["config"] and saved["metrics"] and saved["wall_time_s"] > 0
    assert saved["claims"], "an experiment must judge at least one claim"
    for claim in saved["claims"]:
        assert set(claim) >= {"claim", "holds", "evidence"}
        assert isinstance(claim["holds"], bool) and claim["evidence"]
        if "verdict" in claim:  # judged over seeds
            assert claim["verdict"] in VERDICTS and claim["holds"] == (claim["verdict"] == "holds")
            assert claim["seeds"] == saved["metrics"]["seeds"] and len(claim["interval"]) == 2
            assert claim["expected"] and claim["source"]
    pngs = sorted(directory.glob("*.png"))
    assert pngs
    report = (directory / "report.html").read_text()
    assert report.count("data:image/png;base64,") == len(pngs)
    assert "batchnorm lab run " + experiment_id in report
    assert not list(directory.glob(".*tmp"))


def test_report_redraws_from_saved_results_without_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    experiment_id = registry.EXPERIMENTS[0]
    run_one(experiment_id, RunConfig(mode="tiny", out=tmp_path))
    directory = tmp_path / experiment_id
    for path in list(directory.glob("*.png")) + [directory / "report.html"]:
        path.unlink()
    module = registry.get(experiment_id)

    def no_training(*args: object) -> None:
        raise AssertionError("redraw must not train")

    monkeypatch.setattr(module, "run", no_training)
    assert main(["lab", "report", str(tmp_path)]) == 0
    assert (directory / "report.html").is_file() and list(directory.glob("*.png"))
    assert (tmp_path / "index.html").is_file()
    assert redraw(directory) == [directory / "report.html"]


def test_interrupted_run_keeps_previous_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    experiment_id = registry.EXPERIMENTS[0]
    run_one(experiment_id, RunConfig(mode="tiny", out=tmp_path))
    before = (tmp_path / experiment_id / "results.json").read_text()
    module = registry.get(experiment_id)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", interrupted)
    assert main(["lab", "run", experiment_id, "--tiny", "--out", str(tmp_path)]) == 130
    assert (tmp_path / experiment_id / "results.json").read_text() == before


def test_run_all_writes_index_linking_each_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "run", "all", "--tiny", "--out", str(tmp_path)]) == 0
    index = (tmp_path / "index.html").read_text()
    for experiment_id in registry.EXPERIMENTS:
        assert f"href='{experiment_id}/report.html'" in index
    assert "index:" in capsys.readouterr().out


@pytest.mark.parametrize("experiment_id", registry.EXPERIMENTS)
def test_tiny_run_on_mnist1d(experiment_id: str, tmp_path: Path) -> None:
    """Every experiment accepts MNIST-1D's 40-feature signals (--data mnist1d)."""
    with checking_layout() as problems:
        results = run_one(experiment_id, RunConfig(mode="tiny", seed=0, data="mnist1d", out=tmp_path))
    assert problems == []
    assert results["run"]["data"] == "mnist1d"
    assert results["claims"] and (tmp_path / experiment_id / "report.html").is_file()


def test_report_on_results_from_an_older_version_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    experiment_id = registry.EXPERIMENTS[0]
    run_one(experiment_id, RunConfig(mode="tiny", out=tmp_path))
    path = tmp_path / experiment_id / "results.json"
    saved = json.loads(path.read_text())
    saved["metrics"] = {"older": True}
    path.write_text(json.dumps(saved))
    assert main(["lab", "report", str(tmp_path / experiment_id)]) == 2
    err = capsys.readouterr().err
    assert "older version" in err and len(err.strip().splitlines()) == 1
