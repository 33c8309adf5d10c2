"""``batchnorm lab`` command line: listing, exit status 2 with one line for user errors.

PYTHONPATH=src python -m pytest -q tests/lab/test_cli.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from batchnorm.cli import main
from batchnorm.lab import registry


def test_list_shows_every_experiment_with_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(registry.EXPERIMENTS)
    assert all(" s quick " in line for line in lines)


def test_list_estimates_are_the_measured_times(capsys: pytest.CaptureFixture[str]) -> None:
    from batchnorm.lab._cli import quick_seconds

    seconds = quick_seconds()
    assert set(seconds) == set(registry.EXPERIMENTS)  # every experiment measured
    assert main(["lab", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    shown = {line.split()[0]: "~" + line.split("~")[1].split(" s quick")[0].strip() for line in lines}
    assert shown == {eid: f"~{s:.0f}" for eid, s in seconds.items()}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["lab", "run", "no-such-experiment"], "unknown experiment 'no-such-experiment'"),
        (["lab", "run", "all", "ioffe2015-fig1"], "`all` cannot be combined"),
        (["lab", "run", "ioffe2015-fig1", "--data", "cifar"], "unknown dataset 'cifar'"),
        (["lab", "run", "ioffe2015-fig1", "--data", "mnist:/no/such/dir"], "does not exist"),
        (["lab", "report", "/no/such/dir"], "is not a directory"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(argv + (["--out", str(tmp_path)] if argv[1] == "run" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("batchnorm: error:") and message in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_empty_report_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["lab", "run", "ioffe2015-fig1", "--seed", "-1"],
        ["lab", "run", "ioffe2015-fig1", "--quick", "--tiny"],
        ["lab", "run"],
        ["lab", "run", "all", "--jobs", "0"],
    ],
)
def test_bad_options_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Exit status 2, exactly one line on stderr, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("batchnorm: error:") and "Traceback" not in err, err
    return err


@pytest.fixture()
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any experiment starts: the checks must come first."""
    from batchnorm.lab import runner

    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("training started before the checks"))


def test_out_that_cannot_be_created_fails_before_training(
    no_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    err = one_line_error(capsys, ["lab", "run", "bias", "--quick", "--out", "/proc/nope"])
    assert "--out '/proc/nope': cannot write there" in err


def test_out_under_a_file_fails_before_training(
    no_training: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "some_file").write_text("x")
    err = one_line_error(capsys, ["lab", "run", "bias", "--quick", "--out", str(tmp_path / "some_file" / "sub")])
    assert "lies under" in err and "which is a file, not a folder" in err
    err = one_line_error(capsys, ["lab", "run", "bias", "--quick", "--out", str(tmp_path / "some_file")])
    assert "is a file, not a folder" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "bias").write_text("x")  # where the experiment's folder would go
    err = one_line_error(capsys, ["lab", "run", "bias", "--quick", "--out", str(tmp_path / "out")])
    assert "bias' is a file, not a folder" in err


@pytest.mark.parametrize("module, dist", [("matplotlib", "matplotlib"), ("sklearn", "scikit-learn"), ("tqdm", "tqdm")])
def test_missing_lab_dependency_names_the_install(
    module: str,
    dist: str,
    no_training: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    err = one_line_error(capsys, ["lab", "run", "bias", "--quick", "--out", str(tmp_path)])
    assert (
        f"needs {dist}, which is not installed: pip install '.[lab]' (in a clone of batchnorm) or pip install {dist}"
        in err
    )
    assert not any(tmp_path.iterdir())


def test_missing_mnist1d_only_matters_for_its_data(
    no_training: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    err = one_line_error(capsys, ["lab", "run", "bias", "--quick", "--data", "mnist1d", "--out", str(tmp_path)])
    assert "needs mnist1d" in err and "pip install '.[lab]' (in a clone of batchnorm)" in err


def test_missing_dependency_inside_a_run_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchnorm.lab import runner

    def fails(*args: object, **kwargs: object) -> None:
        import mnist1d  # noqa: F401  (made unimportable below)

    monkeypatch.setattr(runner, "run_one", fails)
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    assert main(["lab", "run", "bias", "--quick", "--out", str(tmp_path)]) == 2
    started, err = capsys.readouterr().err.splitlines()  # the progress line, then one line of error
    assert started.startswith("[1/1] bias started | experiment 0 s") and "Traceback" not in err
    assert (
        "this command needs mnist1d, which is not installed: pip install '.[lab]' (in a clone of batchnorm) or pip install mnist1d"
        in err
    )


def test_report_without_matplotlib_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = one_line_error(capsys, ["lab", "report", str(tmp_path)])
    assert "needs matplotlib" in err


def test_one_line_as_each_experiment_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With stderr not a terminal (as under pytest), each finished experiment is reported at once."""
    from batchnorm.lab import runner
    from batchnorm.lab.results import save_results

    seen_before: dict[str, str] = {}

    def fake_run_one(experiment_id: str, cfg: object, progress: object = None, **kwargs: object) -> dict[str, object]:
        seen_before[experiment_id] = capsys.readouterr().out
        results = {
            "id": experiment_id,
            "claims": [{"claim": "c", "holds": True, "evidence": "e"}],
            "wall_time_s": 1.5,
            "run": {"mode": "quick", "seed": 0, "data": "digits"},
        }
        save_results(tmp_path / experiment_id, results)
        return results

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    assert main(["lab", "run", "bias", "dropout", "--quick", "--out", str(tmp_path)]) == 0
    rest = capsys.readouterr().out
    assert seen_before["bias"] == ""
    assert seen_before["dropout"].startswith("[1/2] bias: 1 replication holds, 1.5 s -> ")
    assert rest.startswith("[2/2] dropout: 1 replication holds") and "index: " in rest
    assert "all: 2 replications hold" in rest
    assert (tmp_path / "index.html").is_file()


def test_summary_counts_identities_apart_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchnorm.lab import runner
    from batchnorm.lab.results import save_results

    claims = [
        {"claim": "a", "verdict": "holds", "holds": True, "evidence": "e", "kind": "identity"},
        {"claim": "b", "verdict": "inconclusive", "holds": False, "evidence": "e", "why": "the interval contains 0"},
        {"claim": "c", "verdict": "does not hold", "holds": False, "evidence": "e"},
    ]

    def fake_run_one(experiment_id: str, cfg: object, progress: object = None, **kwargs: object) -> dict[str, object]:
        results = {
            "id": experiment_id,
            "claims": claims,
            "metrics": {"seeds": [0, 1, 2, 3]},
            "wall_time_s": 2.0,
            "run": {"mode": "quick", "seed": 0, "data": "digits"},
        }
        save_results(tmp_path / experiment_id, results)
        return results

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    assert main(["lab", "run", "bias", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    head = "[1/1] bias: 2 replications: 0 hold, 1 do not hold, 1 inconclusive; 1 identity holds; 4 seeds, 2.0 s"
    assert out.startswith(head), out
    assert "inconclusive: b (e; the interval contains 0)" in out


def test_jobs_run_experiments_in_parallel_with_the_same_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = ["bias", "goodfellow-chain"]
    assert main(["lab", "run", *ids, "--tiny", "--jobs", "2", "--out", str(tmp_path / "par")]) == 0
    out = capsys.readouterr().out
    assert sorted(line.split(":")[0] for line in out.splitlines() if line.startswith("[")) == [
        "[1/2] bias",
        "[2/2] goodfellow-chain",
    ]
    assert main(["lab", "run", *ids, "--tiny", "--out", str(tmp_path / "seq")]) == 0
    from batchnorm.lab.results import load_results

    for e in ids:
        par, seq = load_results(tmp_path / "par" / e), load_results(tmp_path / "seq" / e)
        assert par["metrics"] == seq["metrics"] and par["claims"] == seq["claims"]


def test_report_checks_it_can_write_before_redrawing(capsys: pytest.CaptureFixture[str]) -> None:
    """/proc is a folder nobody can create files in (root included): one line, exit 2."""
    err = one_line_error(capsys, ["lab", "report", "/proc"])
    assert "lab report /proc: cannot write there" in err
