"""Tests for ``batchnorm doctor`` (batchnorm.cli.doctor).

PYTHONPATH=src python -m pytest -q tests/test_doctor_cli.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
import batchnorm.cli as cli


@pytest.fixture(autouse=True)
def _only_doctor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the parser from our command module alone (other command modules may be absent)."""
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("batchnorm.cli.doctor",))


def digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().data.astype(np.float32) / 16.0)  # (1797, 64), as --data digits


def healthy(ours: bool) -> nn.Sequential:
    """Bias-free layers before batch norm, statistics exact on digits: nothing to find."""
    torch.manual_seed(0)
    bn = batchnorm.BatchNorm1d if ours else nn.BatchNorm1d
    model = nn.Sequential(nn.Linear(64, 16, bias=False), bn(16), nn.ReLU(), nn.Linear(16, 10, bias=False), bn(10))
    batchnorm.recompute_statistics(model.eval(), digits().split(256), passes=2)
    return model


def sick() -> nn.Sequential:
    """Several problems: a Keras momentum and a redundant bias (layer 1), NaN statistics (layer 4)."""
    model = healthy(ours=True)
    biased = nn.Linear(64, 16)
    with torch.no_grad():
        biased.weight.copy_(model[0].weight)
        biased.bias.zero_()  # same function, so the statistics stay exact
    model[0] = biased
    model[1].momentum = 0.99
    with torch.no_grad():
        model[4].running_var[2] = float("nan")
    return model


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("doctor")
    paths = {name: tmp / f"{name}.pt" for name in ("torch", "ours", "sick", "plain", "state", "garbage")}
    torch.save(healthy(ours=False), paths["torch"])
    torch.save(healthy(ours=True), paths["ours"])
    torch.save(sick(), paths["sick"])
    torch.save(nn.Sequential(nn.Linear(64, 10)), paths["plain"])
    torch.save(healthy(ours=True).state_dict(), paths["state"])
    paths["garbage"].write_bytes(b"not a model" * 20)
    paths["export"] = tmp / "healthy.pt2"
    torch.export.save(torch.export.export(healthy(ours=False), (digits()[:100],)), paths["export"])
    paths["export_sick"] = tmp / "sick.pt2"
    torch.export.save(torch.export.export(sick(), (digits()[:100],)), paths["export_sick"])
    np.save(tmp / "wide.npy", np.zeros((10, 65), dtype=np.float32))
    paths["wide"] = tmp / "wide.npy"
    return paths


@pytest.mark.parametrize("kind", ["torch", "ours"])
def test_healthy_model_exits_0(saved: dict[str, Path], capsys: pytest.CaptureFixture[str], kind: str) -> None:
    code, out, err = run(capsys, "doctor", str(saved[kind]), "--trust", "--data", "digits")
    assert (code, err) == (0, "")
    assert out == "0 finding(s) in 0 of 2 batch-norm layer(s); statistics checked on 1797 samples of --data\n"


def test_findings_are_a_table_and_exit_3(saved: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "doctor", str(saved["sick"]), "--trust", "--data", "digits")
    assert (code, err) == (3, "")
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "code", "message", "fix"]
    table = lines[2 : lines.index("")]
    rows = [line.split()[:2] for line in table if not line.startswith(" ")]
    assert rows == [["1", "keras-momentum"], ["1", "redundant-bias"], ["4", "non-finite-stats"]]
    assert lines[-1] == "3 finding(s) in 2 of 2 batch-norm layer(s); statistics checked on 1797 samples of --data"


def test_ignore_codes(saved: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "doctor", str(saved["sick"]), "--trust", "--ignore", "keras-momentum, redundant-bias")
    assert code == 3 and "non-finite-stats" in out and "keras-momentum" not in out
    ignore_all = "keras-momentum,redundant-bias,non-finite-stats"
    code, out, _ = run(capsys, "doctor", str(saved["sick"]), "--trust", "--ignore", ignore_all)
    assert code == 0 and out.startswith("0 finding(s)")
    code, _, err = run(capsys, "doctor", str(saved["sick"]), "--trust", "--ignore", "small-batch,typo")
    assert code == 2 and "unknown code(s) typo" in err and err.count("\n") == 1


def test_stale_statistics_from_data(saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    moved = tmp_path / "moved.npy"
    np.save(moved, digits().numpy() * 3 + 1)
    code, out, _ = run(capsys, "doctor", str(saved["ours"]), "--trust", "--data", str(moved), "--batch-size", "100")
    assert code == 3 and "stale-statistics" in out
    assert "1797 values per channel" in out  # every sample, whatever the batch size
    code, out, _ = run(capsys, "doctor", str(saved["ours"]), "--trust", "--data", str(moved), "--max-samples", "500")
    assert code == 3 and "500 values per channel" in out


def test_exported_programs_need_no_trust(saved: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "doctor", str(saved["export"]), "--data", "digits")
    assert (code, err) == (0, "")
    # the program takes batches of exactly 100: 1700 of the 1797 samples are used
    assert out == "0 finding(s) in 0 of 2 batch-norm layer(s); statistics checked on 1700 samples of --data\n"
    code, out, _ = run(capsys, "doctor", str(saved["export_sick"]))
    # an inference program keeps no momentum: the other two problems are found
    assert code == 3 and "redundant-bias" in out and "non-finite-stats" in out and "keras-momentum" not in out


def test_model_without_batch_norm(saved: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "doctor", str(saved["plain"]), "--trust")
    assert (code, out) == (0, "no batch-norm layers found\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{ours}"], "Pass --trust if you trust its source"),
        (["{state}", "--trust"], "state_dict, not a model"),
        (["{garbage}", "--trust"], "neither a torch.save file nor a torch.export"),
        (["{missing}", "--trust"], "no such file"),
        (["{dir}", "--trust"], "is a directory"),
        (["{ours}", "--trust", "--data", "{missing}.npy"], "no such file"),
        (["{ours}", "--trust", "--data", "mnist"], "--data: "),
        (["{ours}", "--trust", "--data", "{wide}"], "the model failed on --data"),
        (["{ours}", "--trust", "--data", "digits", "--batch-size", "0"], "--batch-size: expected a positive int"),
        (["{ours}", "--trust", "--max-samples", "-3"], "--max-samples: expected a positive int"),
        (["{ours}", "--trust", "--no-such-option"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    saved: dict[str, Path], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    names = {k: str(v) for k, v in saved.items()}
    names.update(missing=str(saved["ours"].parent / "missing.pt"), dir=str(saved["ours"].parent))
    args = [a.format(**names) for a in argv]
    try:
        code, out, err = run(capsys, "doctor", *args)
    except SystemExit as stop:  # argparse's own errors exit from inside main
        code = int(stop.code or 0)
        out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_help_documents_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["doctor", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for line in ("0  no finding", "3  at least one finding", "2  user error", "1  internal error"):
        assert line in out
    assert "stale-statistics" in out and "batchnorm.watch" in out
