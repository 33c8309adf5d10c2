"""Reports and figures as a reader gets them: settings as HTML tables (never raw JSON), files
written 0644 under umask 022, atomically.

    .venv/bin/python -m pytest -q tests/lab/test_report_files.py
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def figures(results: dict[str, object]) -> Iterator[tuple[str, Any]]:
    from batchnorm.lab.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.bar(["a", "b"], [0.95, 0.97])
    ax.set_ylabel("a long y label that must not be clipped")
    yield "bars.png", fig


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


def judged(verdict: str, estimate: float, interval: list[float], direction: str, **extra: object) -> dict[str, object]:
    """A claim as ``claims_spec.claim`` saves it."""
    return {
        "claim": "BN trains faster",
        "holds": verdict == "holds",
        "verdict": verdict,
        "estimate": estimate,
        "interval": interval,
        "seeds": [0, 1, 2],
        "method": "mean of paired differences over 3 seeds, 95% t interval",
        "confidence": 0.95,
        "direction": direction,
        "expected": "BN 14x fewer steps",
        "source": "Ioffe & Szegedy 2015, Fig. 2",
        "evidence": "steps per seed: 10, 11, 12",
        **extra,
    }


STRADDLES = "a - b at least 0: the 95% interval [-1.9, 4.9] over 3 seeds contains a threshold"


def test_verdict_cell_gives_the_claims_own_reason() -> None:
    results = synthetic_results()
    results["claims"] = [judged("inconclusive", 1.5, [-1.9, 4.9], "a - b >= 0", why=STRADDLES)]
    page = report.experiment_html(results, [], "x")
    assert f"<td class='inconclusive'>inconclusive<br><span class='why'>{STRADDLES}</span></td>" in page
    results["claims"] = [judged("holds", 2.0, [1.0, 3.0], "a - b >= 0.5")]  # older results: no why
    assert "<td class='holds'>holds</td>" in report.experiment_html(results, [], "x")


def test_claims_table_shows_numbers_threshold_seeds_and_source() -> None:
    results = synthetic_results()
    results["claims"] = [judged("inconclusive", 1.5, [-1.9, 4.9], "a - b >= 0", why=STRADDLES)]
    page = report.experiment_html(results, [], "x")
    for text in (
        "estimate <b>1.5</b>",
        "95% interval [-1.9, 4.9]",
        "claimed: <code>a - b &gt;= 0</code>",
        "seeds: 3 (0, 1, 2)",
        STRADDLES,
        "BN 14x fewer steps",
        "Ioffe &amp; Szegedy 2015, Fig. 2",
        "measured: steps per seed: 10, 11, 12",
        "0 hold, 0 do not hold, 1 inconclusive (of 1)",
    ):
        assert text in page, text
    index = report.index_html([results])
    assert "1.5 [-1.9, 4.9] (95%); claimed a - b &gt;= 0; 3 seeds" in index


def test_pages_state_the_level_each_claim_was_judged_at() -> None:
    """A sequential plan judges at more than 95% (e.g. 98.75% at each of 4 looks): no page
    text may say 95% for such a claim, and both pages show its level."""
    results = synthetic_results()
    results["claims"] = [judged("holds", 2.0, [1.0, 3.0], "a - b >= 0.5", confidence=0.9875)]
    page, index = report.experiment_html(results, [], "x"), report.index_html([results])
    assert "98.8% interval [1, 3]" in page and "2 [1, 3] (98.8%)" in index
    assert "95%" not in page.replace(results["claims"][0]["method"], "") and "95%" not in index
    assert "<col style='width:8rem'>" in index  # the one-word verdict column stays narrow


def test_new_claim_keys_render_when_present() -> None:
    claim = judged(
        "holds",
        1.0,
        [1.0, 1.0],
        "value >= 0.5",
        kind="identity",
        zero_spread=True,
        rule="sequential",
        n_seeds=3,
        why="value >= 0.5: the same value, 1, on all 3 seeds (zero spread), on the claimed side",
    )
    results = synthetic_results()
    results["claims"] = [claim, judged("holds", 2.0, [1.0, 3.0], "a - b >= 0.5")]
    page = report.experiment_html(results, [], "x")
    assert (
        "an identity of the math" in page
        and "rule: sequential" in page
        and "(zero spread), on the claimed side" in page
    )
    assert "replications: 1 hold, 0 do not hold, 0 inconclusive (of 1); identities of the math: 1 hold" in page


def test_empty_data_choice_is_not_a_settings_row() -> None:
    results = synthetic_results()
    results["config"] = {"steps": 10, "mnist1d_choice": None}
    assert "mnist1d_choice" not in report.experiment_html(results, [], "x")
    results["config"] = {"steps": 10, "mnist1d_choice": "a 1-D CNN"}
    assert "<th>mnist1d_choice</th><td>a 1-D CNN</td>" in report.experiment_html(results, [], "x")


def test_explanation_is_the_markdown_beside_the_module_rendered_as_paragraphs() -> None:
    from batchnorm.lab import registry

    module = registry.get("bias")
    text = report.explanation(module)
    assert text.startswith("# bias\n\n") and not hasattr(module, "EXPLANATION")
    page = report.experiment_html(synthetic_results(), [], text)
    assert "<p># bias</p>" not in page and "<p>Batch normalization subtracts" in page
    assert report.explanation(MODULE) == "Why.\n\nHow."  # a module without a file (a test double)
    assert "<p>a <code>x * y</code> and <em>more</em> than y * s</p>" in report.experiment_html(
        synthetic_results(), [], "a ``x * y`` and *more* than y * s"
    )


def test_matrix_lists_each_claim_with_numbers_and_why(tmp_path: Path) -> None:
    cell = {
        "holds": 0,
        "does_not_hold": 0,
        "inconclusive": 1,
        "seeds": [0, 1, 2],
        "claims": [judged("inconclusive", 1.5, [-1.9, 4.9], "a - b >= 0", why=STRADDLES)],
    }
    page = report.matrix_html(
        {"seeds": [0, 1, 2], "mode": "quick", "data": ["digits"], "rows": [{"id": "x", "cells": {"digits": cell}}]}
    )
    assert "<a href='digits/x/report.html'>0 hold, 0 do not, 1 inconclusive</a> (seeds 0, 1, 2)" in page
    assert "ours 1.5 [-1.9, 4.9] (95%); claimed a - b &gt;= 0; 3 seeds" in page and STRADDLES in page


def test_no_experiment_prose_turns_a_product_into_emphasis() -> None:
    """A ``*`` used as a product (``a*b ... c*d``) must not pair into an emphasis across words."""
    import re

    from batchnorm.lab import registry

    for experiment_id in registry.EXPERIMENTS:
        page = report._paragraphs(report.explanation(registry.get(experiment_id)))
        for kind, inner in re.findall(r"<(em|strong)>(.*?)</\1>", page, re.S):
            assert len(inner.split()) <= 3, f"{experiment_id}: <{kind}>{inner[:60]}</{kind}>"
