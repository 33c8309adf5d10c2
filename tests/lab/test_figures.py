"""The figure helpers: the layout check finds what a reader would stumble on (titles running
together, tick labels over the neighbouring panel, text off the canvas) and passes a clean
figure; log axes get at least three labelled ticks; mean bands leave diverged runs out.

    PYTHONPATH=src python -m pytest -q tests/lab/test_figures.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchnorm.lab.figures import (
    bar_values,
    categories,
    dress,
    log_ticks,
    mean_band,
    pyplot,
    save,
    wrap,
)

from ._layout import checking_layout, layout_problems


@pytest.fixture
def plt() -> Any:
    return pyplot()


def test_clean_figure_has_no_problems(plt: Any) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax in axes:
        ax.plot([0, 1], [0, 1], label="a line")
        ax.set_title("short title")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.legend()
    assert layout_problems(fig) == []
    plt.close(fig)


def test_titles_running_together_are_found(plt: Any) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(6, 3), layout="none")
    axes[0].set_title("Gradients: the bias gets only rounding noise, always and everywhere")
    axes[1].set_title("Same weights, same batches: the same losses")
    problems = layout_problems(fig)
    assert any("Gradients" in p and "Same weights" in p for p in problems), problems
    plt.close(fig)


def test_titles_closer_than_a_space_are_found(plt: Any) -> None:
    fig = plt.figure(figsize=(4, 2), layout="none")
    fig.text(0.1, 0.5, "noise")
    box = fig.texts[0].get_window_extent(fig.canvas.get_renderer())
    fig.text((box.x1 + 2) / fig.bbox.width, 0.5, "Same")  # 2 px apart: reads as "noiseSame"
    assert any("runs into" in p for p in layout_problems(fig))
    plt.close(fig)


def test_tick_labels_over_the_neighbouring_panel_are_found(plt: Any) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(6, 3), layout="none")
    axes[1].barh(range(3), [1, 2, 3])
    axes[1].set_yticks(range(3))
    axes[1].set_yticklabels(["a very long category name indeed"] * 3)
    axes[0].set_title("left panel")
    problems = layout_problems(fig)
    assert any("plotting area of 'left panel'" in p for p in problems), problems
    plt.close(fig)


def test_text_off_the_canvas_is_found(plt: Any) -> None:
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.text(1.5, 0.5, "outside", transform=ax.transAxes)
    assert any("'outside' leaves the canvas" in p for p in layout_problems(fig))
    plt.close(fig)


def test_rotated_labels_count_by_their_box_so_wrapped_labels_are_used(plt: Any) -> None:
    names = ["BN", "BN + dropout 0.5", "BN + dropout 0.1", "BN, fixed batches"]
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(range(4), [1, 2, 3, 4])
    ax.set_xticks(range(4))
    ax.set_xticklabels(names, rotation=25, ha="right")
    assert layout_problems(fig)
    ax.set_xticklabels([wrap(n, 8) for n in names], rotation=0, ha="center")
    assert layout_problems(fig) == []
    plt.close(fig)
    assert wrap("LB + LR + GBN + RA", 10) == "LB + LR +\nGBN + RA"


def test_save_reports_problems_only_inside_checking_layout(plt: Any, tmp_path: Path) -> None:
    def draw() -> Any:
        fig = plt.figure(figsize=(3, 2))
        fig.text(1.2, 0.5, "gone")
        return fig

    save(draw(), tmp_path / "a.png")  # no check outside the block
    with checking_layout() as problems:
        save(draw(), tmp_path / "b.png")
    assert len(problems) == 1 and problems[0].startswith("b.png: 'gone' leaves the canvas")
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()


def _labelled_ticks(fig: Any, axis: Any) -> list[str]:
    fig.canvas.draw()
    view = sorted(axis.get_view_interval())
    return [
        t.label1.get_text()
        for t in axis.get_major_ticks()
        if t.label1.get_text() and view[0] * (1 - 1e-9) <= t.get_loc() <= view[1] * (1 + 1e-9)
    ]


@pytest.mark.parametrize(
    ("lo", "hi", "base", "expected"),
    [
        (2.0, 32.0, 10, ["2", "5", "10", "20"]),  # 1.2 decades: 1-2-5 instead of the one decade tick 10
        (0.025, 0.19, 10, ["0.03", "0.05", "0.1"]),  # under a decade: 1-2-3-5
        (1e-3, 10.0, 10, ["0.001", "0.01", "0.1", "1", "10"]),  # four decades: decades, in plain numbers
        (2.0, 4.0, 2, ["2", "3", "4"]),  # base 2: powers of two and their midpoints
    ],
)
def test_log_axes_get_at_least_three_readable_ticks(
    plt: Any, tmp_path: Path, lo: float, hi: float, base: int, expected: list[str]
) -> None:
    fig, ax = plt.subplots()
    ax.plot([lo, hi], [1, 2])
    ax.set_xscale("log", base=base)
    ax.set_xlim(lo, hi)
    seen = {}
    real_close = plt.close

    def spy(f: Any) -> None:
        seen["ticks"] = _labelled_ticks(f, ax.xaxis)
        real_close(f)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt, "close", spy)
        save(fig, tmp_path / "log.png")
    assert seen["ticks"] == expected


def test_log_ticks_keep_the_given_values(plt: Any, tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.plot([2, 32], [1, 2])
    ax.set_xscale("log", base=2)
    log_ticks(ax.xaxis, [32, 2, 8])
    assert _labelled_ticks(fig, ax.xaxis) == ["2", "8", "32"]
    plt.close(fig)


def test_mean_band_leaves_nan_runs_out_without_warnings(plt: Any) -> None:
    fig, ax = plt.subplots()
    runs = [[0.5, np.nan, np.nan], [0.7, 0.9, np.nan]]  # seed 0 diverged at the 2nd rate, both at the 3rd
    mean_band(ax, [1, 2, 3], runs, "arm")
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), [0.6, 0.9, np.nan])
    assert line.get_label() == "arm (mean ± std, up to 2 seeds)"
    plt.close(fig)


def _panels(plt: Any, shared: bool) -> Any:
    """Two panels, a bar chart and a log-scale line plot, finished with the shared helpers
    (``shared``) or with the calls they stand for written out."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].bar(range(3), [1, 2, 3], label="bars")
    axes[1].plot([1, 2, 3], [1, 10, 100], label="a line")
    if shared:
        bar_values(axes[0], [1, 2, 3], "{:.1f}", fontsize=8)
        categories(axes[0].xaxis, ["a", "b", "c"], fontsize=8)
        dress(axes[0], "bars", ylabel="height", grid="y", legend={"loc": "upper left"})
        dress(axes[1], "line", title_size=9, yscale="log", xlabel="x", grid=True, legend=True)
    else:
        for i, v in enumerate([1, 2, 3]):
            axes[0].text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        axes[0].set_xticks(range(3))
        axes[0].set_xticklabels(["a", "b", "c"], fontsize=8)
        axes[0].set_ylabel("height")
        axes[0].set_title("bars")
        axes[0].grid(alpha=0.3, axis="y")
        axes[0].legend(loc="upper left")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("x")
        axes[1].set_title("line", fontsize=9)
        axes[1].grid(alpha=0.3)
        axes[1].legend()
    return fig


def test_dress_categories_and_bar_values_draw_as_the_calls_written_out(plt: Any, tmp_path: Path) -> None:
    from matplotlib.image import imread

    shared = imread(save(_panels(plt, True), tmp_path / "shared.png"))
    written = imread(save(_panels(plt, False), tmp_path / "written.png"))
    assert shared.shape == written.shape and np.array_equal(shared, written)
