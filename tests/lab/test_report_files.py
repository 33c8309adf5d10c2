"""Reports and figures as a reader gets them: settings as HTML tables (never raw JSON), files
written 0644 under umask 022, atomically.

    .venv/bin/python -m pytest -q tests/lab/test_report_files.py
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

from batchnorm.lab import report


def synthetic_results() -> dict[str, object]:
    return {
        "id": "demo",
        "description": "a synthetic experiment",
        "run": {"mode": "tiny", "seed": 0, "data": "digits"},
        "config": {
            "lr": 0.1,
            "arms": [{"name": "BN", "p": 0.5}, {"name": "plain", "p": 0.0}],
            "steps": [10, 20],
            "opt": {"kind": "sgd"},
        },
        "data": {"name": "digits", "train": 1437},
        "versions": {"python": "3"},
        "claims": [{"claim": "c", "holds": True, "evidence": "e"}],
        "wall_time_s": 1.0,
    }


def figures(results: dict[str, object], outdir: Path) -> list[Path]:
    from batchnorm.lab.figures import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.bar(["a", "b"], [0.95, 0.97])
    ax.set_ylabel("a long y label that must not be clipped")
    return [save(fig, outdir / "bars.png")]


MODULE = types.SimpleNamespace(figures=figures, EXPLANATION="Why.\n\nHow.")


def test_settings_render_as_tables_not_json() -> None:
    page = report.experiment_html(synthetic_results(), [], "x")
    assert "<th>arms</th><td><table class='nested'><tr><th>name</th><th>p</th></tr>" in page
    assert "<td>BN</td><td>0.5</td>" in page
    assert "<th>opt</th><td><table class='settings'><tr><th>kind</th><td>sgd</td></tr></table>" in page
    assert "<td>10, 20</td>" in page
    assert '{"' not in page and "[{" not in page  # no JSON dump anywhere


def test_report_and_figures_are_0644_under_umask_022(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = report.write_experiment_report(tmp_path, synthetic_results(), MODULE)  # type: ignore[arg-type]
        index = report.write_index(tmp_path, [synthetic_results()])
    finally:
        os.umask(old)
    for p in (path, index, tmp_path / "bars.png"):
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png", "index.html", "report.html"]  # no temporaries


def test_bar_axes_start_at_zero(tmp_path: Path) -> None:
    from batchnorm.lab.figures import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.bar(["a", "b"], [0.95, 0.97])
    seen = {}
    real_close = plt.close

    def spy(f: object) -> None:
        seen["ylim"] = ax.get_ylim()
        real_close(f)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt, "close", spy)
        save(fig, tmp_path / "b.png")
    assert seen["ylim"][0] == 0


def test_results_and_replication_json_are_0644_under_umask_022(tmp_path: Path) -> None:
    from batchnorm.lab.replicate import write_matrix
    from batchnorm.lab.results import save_results

    old = os.umask(0o022)
    try:
        results = save_results(tmp_path, synthetic_results())
        write_matrix({"seeds": [0], "mode": "tiny", "data": ["digits"], "rows": []}, tmp_path)
    finally:
        os.umask(old)
    for name in ("results.json", "replication.json", "index.html"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert results == tmp_path / "results.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "replication.json", "results.json"]


def test_report_and_index_show_three_valued_verdicts() -> None:
    results = synthetic_results()
    results["claims"] = [
        {"claim": "a", "holds": True, "verdict": "holds", "evidence": ""},
        {"claim": "b", "holds": False, "verdict": "inconclusive", "evidence": ""},
        {"claim": "c", "holds": False, "verdict": "does not hold", "evidence": ""},
        {"claim": "d", "holds": False, "evidence": ""},  # single-seed claim: no saved verdict
    ]
    for page in (report.experiment_html(results, [], "x"), report.index_html([results])):
        assert "<td>a</td><td class='holds'>holds</td>" in page
        assert "<td>b</td><td class='inconclusive'>inconclusive</td>" in page
        assert "<td>c</td><td class='fails'>does not hold</td>" in page
        assert "<td>d</td><td class='fails'>does not hold</td>" in page
