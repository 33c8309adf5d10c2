"""``batchnorm lab`` command line: listing, exit status 2 with one line for user errors.

    PYTHONPATH=src python -m pytest -q tests/lab/test_cli.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from batchnorm.cli import main
from batchnorm.lab import registry


def test_list_shows_every_experiment_with_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(registry.ids())
    assert all(" s quick " in line for line in lines)


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
def test_user_errors_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(argv + (["--out", str(tmp_path)] if argv[1] == "run" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("batchnorm: error:") and message in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_empty_report_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["lab", "run", "ioffe2015-fig1", "--seed", "-1"], ["lab", "run", "ioffe2015-fig1", "--quick", "--tiny"], ["lab", "run"]])
def test_bad_options_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
