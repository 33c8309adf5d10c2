# .venv/bin/python -m pytest -q tests/lab/test_failures.py
"""One experiment's failure costs neither its measurements nor the other experiments, and the
command line reports it in one line (exit status 1); ``replicate --resume`` keeps what was
measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchnorm.cli import main
from batchnorm.lab import _cli as lab_cli
from batchnorm.lab import registry
from batchnorm.lab import replicate as replicate_module
from batchnorm.lab.config import RunConfig
from batchnorm.lab.runner import ExperimentFailed, run_one


def _break_judging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's judging of bias's claims raises; the run's own looks at its seeds still judge."""
    experiment = registry.get("bias")
    claims = experiment.claims

    def broken(results: dict[str, Any]) -> list[dict[str, Any]]:
        if "id" in results:  # saved results, as the runner judges them
            raise KeyError("8")
        return claims(results)

    monkeypatch.setattr(experiment, "claims", broken)


def test_a_failed_judging_keeps_the_measurements_and_report_judges_them_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _break_judging(monkeypatch)
    with pytest.raises(ExperimentFailed, match=r"bias: judging its claims failed \(KeyError: '8'\)"):
        run_one("bias", RunConfig(mode="tiny", out=tmp_path))
    saved = json.loads((tmp_path / "bias" / "results.json").read_text())
    assert saved["claims"] == [] and saved["claims_error"] == "KeyError: '8'" and saved["metrics"]["per_seed"]
    monkeypatch.undo()  # the bug fixed: `lab report` judges the saved measurements
    assert main(["lab", "report", str(tmp_path / "bias")]) == 0
    judged = json.loads((tmp_path / "bias" / "results.json").read_text())
    assert judged["claims"] and "claims_error" not in judged


def test_lab_run_reports_a_failure_in_one_line_and_runs_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _break_judging(monkeypatch)
    code = main(["lab", "run", "bias", "goodfellow-chain", "--tiny", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert [line for line in err if line.startswith("batchnorm: error:")] == [
        line for line in err if "bias: judging its claims failed" in line
    ]
    assert "Traceback" not in "\n".join(err)
    assert json.loads((tmp_path / "goodfellow-chain" / "results.json").read_text())["claims"]


def test_replicate_resume_judges_saved_runs_again_without_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["lab", "replicate", "--tiny", "--data", "digits", "--seeds", "0-1", "--only", "bias,goodfellow-chain"]
    _break_judging(monkeypatch)
    assert main([*argv, "--out", str(tmp_path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    err = [line for line in lines if " | experiment " not in line]  # the rest are progress lines
    assert len(err) == 1 and "digits: bias: judging its claims failed" in err[0]
    assert len(lines) > 1 and lines[-1] == err[0]
    first = json.loads((tmp_path / "replication.json").read_text())
    assert [r["id"] for r in first["rows"]] == ["goodfellow-chain"] and len(first["failed"]) == 1
    monkeypatch.undo()

    def no_training(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("--resume trained an experiment that was already measured")

    monkeypatch.setattr(replicate_module, "run_one", no_training)
    assert main([*argv, "--out", str(tmp_path), "--resume"]) == 0
    second = json.loads((tmp_path / "replication.json").read_text())
    assert [r["id"] for r in second["rows"]] == ["bias", "goodfellow-chain"] and second["failed"] == []
    assert second["rows"][1] == first["rows"][0]
    # other seeds are not the saved runs: those are trained (here: the one-line internal error)
    capsys.readouterr()
    other = ["lab", "replicate", "--tiny", "--data", "digits", "--seeds", "0-2", "--only", "bias"]
    assert main([*other, "--out", str(tmp_path), "--resume"]) == 1
    assert "--resume trained" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_with_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(args: Any) -> int:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(lab_cli, "_cmd_list", boom)  # the parser is built inside main
    monkeypatch.delenv("BATCHNORM_TRACEBACK", raising=False)
    assert main(["lab", "list"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "batchnorm: internal error: RuntimeError: something broke (run with BATCHNORM_TRACEBACK=1 to see where)"
    ]
    monkeypatch.setenv("BATCHNORM_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="something"):
        main(["lab", "list"])
