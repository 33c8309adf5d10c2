# .venv/bin/python -m pytest -q tests/lab/test_replicate.py
"""The replication matrix: seed parsing, the CLI's one-line errors, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from batchnorm.cli import main
from batchnorm.lab.replicate import parse_seeds


def test_parse_seeds() -> None:
    assert parse_seeds("0-4") == (0, 1, 2, 3, 4)
    assert parse_seeds("0,3,7") == (0, 3, 7)
    assert parse_seeds("0-2,9") == (0, 1, 2, 9)
    for bad in ("", "4-0", "a", "1,1", "-1", "0-2,2"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)


@pytest.mark.parametrize("argv", [["--seeds", "4-0"], ["--data", "cifar"], ["--data", ","], ["--seeds", "x"]])
def test_bad_options_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["lab", "replicate", "--tiny", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1


def test_tiny_matrix_counts_each_experiments_verdicts(tmp_path: Path) -> None:
    code = main(
        [
            "lab",
            "replicate",
            "--tiny",
            "--data",
            "digits,mnist1d",
            "--seeds",
            "0-1",
            "--only",
            "ioffe2015-fig1,bias,goodfellow-chain",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    matrix = json.loads((tmp_path / "replication.json").read_text())
    assert matrix["data"] == ["digits", "mnist1d"] and matrix["seeds"] == [0, 1]
    assert [r["id"] for r in matrix["rows"]] == ["ioffe2015-fig1", "bias", "goodfellow-chain"]
    # the chain ignores --data: measured once, counted in the first data set's column only
    assert matrix["data_independent"] == ["goodfellow-chain"]
    assert list(matrix["rows"][2]["cells"]) == ["digits"] and not (tmp_path / "mnist1d" / "goodfellow-chain").exists()
    for row in matrix["rows"]:
        for data, cell in row["cells"].items():
            saved = json.loads((tmp_path / data / row["id"] / "results.json").read_text())
            # replications and identities of the math are counted apart (bias: identities only)
            replications = [c for c in saved["claims"] if c["kind"] == "replication"]
            assert cell["holds"] + cell["does_not_hold"] + cell["inconclusive"] == len(replications)
            assert cell["holds"] == sum(c["holds"] for c in replications)
            assert sum(cell["identities"].values()) == len(saved["claims"]) - len(replications)
            assert (row["id"] == "bias") == (len(replications) == 0)
    assert matrix["rows"][0]["cells"]["digits"]["seeds"] == [0, 1]  # judged over both seeds
    assert matrix["rows"][1]["cells"]["digits"]["seeds"] == [0, 1]  # bias is judged over seeds too
    assert "Replication matrix" in (tmp_path / "index.html").read_text()


def test_out_that_is_a_file_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.write_text("x")
    assert main(["lab", "replicate", "--tiny", "--seeds", "0", "--out", str(out / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]
    assert out.read_text() == "x"


def _matrix(verdicts: dict[str, list[str]]) -> dict:
    return {
        "rows": [
            {"id": i, "cells": {"digits": {"claims": [{"claim": f"{i} {k}", "verdict": v} for k, v in enumerate(vs)]}}}
            for i, vs in verdicts.items()
        ]
    }


def test_compare_matrices_flags_only_holds_against_does_not_hold() -> None:
    path = Path(__file__).resolve().parents[2] / "scripts" / "compare_replications.py"
    spec = importlib.util.spec_from_file_location("compare_replications", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    compare_matrices = script.compare_matrices
    a = _matrix({"x": ["holds", "holds", "inconclusive", "does not hold"], "only-a": ["holds"]})
    b = _matrix({"x": ["holds", "does not hold", "does not hold", "holds"], "only-b": ["holds"]})
    rows = compare_matrices(a, b)
    assert [(r["id"], r["index"], r["flip"]) for r in rows] == [
        ("x", 0, False),
        ("x", 1, True),
        ("x", 2, False),
        ("x", 3, True),
    ]
    assert rows[1]["first"] == "holds" and rows[1]["second"] == "does not hold"
