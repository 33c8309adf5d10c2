"""Progress where no terminal is: one line per task with the time spent and what
remains (``LineProgress``), for ``lab run`` and ``lab replicate`` alike.

    PYTHONPATH=src python -m pytest -q tests/lab/test_progress.py
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from batchnorm.cli import main
from batchnorm.lab.progress import LineProgress, Progress, TqdmProgress, duration, for_stderr


class Clock:
    """A hand-moved clock (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(progress: LineProgress) -> list[str]:
    """What ``progress`` has written to its ``io.StringIO`` stream."""
    assert isinstance(progress.stream, io.StringIO)
    return progress.stream.getvalue().splitlines()


def test_duration_reads_as_words() -> None:
    assert [duration(s) for s in (0.4, 42, 185, 3720)] == ["0 s", "42 s", "3 min 05 s", "1 h 02 min"]


def test_time_left_rescales_the_expected_times_by_the_finished_items() -> None:
    clock = Clock()
    progress = LineProgress("abc", [10, 20, 30], stream=io.StringIO(), clock=clock)
    assert progress.left() == 60  # trusted: the expected times as they are
    progress.start(0)
    clock.now = 5.0
    assert progress.left() == 55  # 5 s left of item 0
    clock.now = 20.0  # the first item overran: twice its estimate so far
    assert progress.scale() == 2.0 and progress.left() == 100  # 0 left of item 0, (20 + 30) * 2
    progress.start(1)
    assert progress.scale() == 2.0 and progress.left() == 100  # (20 + 30) * 2
    assert progress.expected_s == 40  # item 1's 20 s at the current scale
    clock.now = 30.0
    assert progress.left() == 90  # 30 s left of item 1, 60 of item 2
    progress.start(2)  # item 1 took 10 s of its 20: scale (20 + 10) / (10 + 20) = 1
    assert progress.scale() == 1.0 and progress.left() == 30
    assert lines(progress)[-1] == "c started | experiment 0 s, ~30 s left; all 30 s, ~30 s left"


def test_items_kept_from_earlier_are_skipped_and_time_left_is_unknown_until_calibrated() -> None:
    clock = Clock()
    progress = LineProgress("abcd", [10, 10, 10, 10], trusted=False, stream=io.StringIO(), clock=clock)
    progress.start(2)  # items 0 and 1 resumed from saved results: never run
    assert progress.left() is None and progress.expected_s is None
    clock.now = 5.0
    progress.start(3)
    assert progress.scale() == 0.5 and progress.left() == 5.0
    assert lines(progress) == [
        "c started | experiment 0 s; all 0 s, time left known after the first experiment",
        "d started | experiment 0 s, ~5 s left; all 5 s, ~5 s left",
    ]
    with pytest.raises(ValueError, match="expected an item in 0..3, got 4"):
        progress.start(4)


def test_line_progress_writes_one_line_per_task_with_times() -> None:
    clock = Clock()
    progress = LineProgress(["[1/2] demo", "[2/2] next"], [40, 60], stream=io.StringIO(), every_s=1000, clock=clock)
    progress.start(0)
    with progress.task("BN", total=100) as tick:
        for _ in range(100):
            tick.update()
        clock.now = 12.0
    with progress.task("seeds 0-2", total=3) as tick:
        clock.now = 50.0
        tick.update(3)
    assert lines(progress) == [
        "[1/2] demo started | experiment 0 s, ~40 s left; all 0 s, ~1 min 40 s left",
        "[1/2] demo BN: 100 steps in 12 s | experiment 12 s, ~28 s left; all 12 s, ~1 min 28 s left",
        "[1/2] demo seeds 0-2: 3 steps in 38 s | experiment 50 s, past its estimate of 40 s; all 50 s, ~1 min 15 s left",
    ]


def test_line_progress_reports_inside_a_long_task() -> None:
    clock = Clock()
    progress = LineProgress(["x"], [100], trusted=False, overall=False, stream=io.StringIO(), every_s=30, clock=clock)
    with progress.start(0).task("plain", total=400) as tick:
        for step in range(400):
            clock.now = step * 0.25  # 4 steps per second: the task takes 100 s
            tick.update()
    written = lines(progress)
    assert written[1] == "x plain: step 121/400 after 30 s, ~1 min 09 s left | experiment 30 s"
    assert len(written) == 5 and written[-1].startswith("x plain: 400 steps in 1 min 40 s")


def test_displays_by_where_stderr_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert isinstance(for_stderr(["p"], [1.0], trusted=True)(0), LineProgress)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert isinstance(for_stderr(["p"], [1.0], trusted=True)(0), TqdmProgress)
    with Progress().task("nothing", 3) as tick:  # shows nothing
        tick.update()


def test_lab_run_reports_progress_lines_on_a_redirected_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lab", "run", "bias", "goodfellow-chain", "--tiny", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[1/2] bias started | experiment 0 s")
    assert any(line.startswith("[1/2] bias with bias: 20 steps in ") for line in err)
    second = [line for line in err if line.startswith("[2/2] goodfellow-chain")]
    assert second and all(" left" in line for line in second)  # the first experiment calibrated the estimate


def test_lab_replicate_reports_progress_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "lab",
        "replicate",
        "--tiny",
        "--data",
        "digits",
        "--seeds",
        "0-1",
        "--only",
        "bias",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[1/1] digits bias started | experiment 0 s; all 0 s")
    assert any(line.startswith("[1/1] digits bias without bias: 20 steps in ") for line in err)
    assert main([*args, "--resume"]) == 0  # nothing trained again: no progress lines
    assert capsys.readouterr().err == ""
