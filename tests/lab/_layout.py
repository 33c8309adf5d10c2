"""The layout check of the lab's figures (no two texts overlap, none leaves the canvas):
``layout_problems`` lists what makes one figure hard to read; inside ``checking_layout()`` every
figure ``batchnorm.lab.figures.save`` writes is checked (through ``figures.SAVE_CHECKS``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchnorm.lab import figures


def _drawn_texts(fig: Any) -> list[tuple[str, Any, Any]]:
    """``(label, window extent in pixels, owning Axes or None)`` of every text the figure
    draws: titles, axis labels, legends, annotations and the tick labels inside each axis's
    view (visible and non-empty only). Draws the figure first so the layout is final."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    tick_labels: set[int] = set()
    texts: list[Any] = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                tick_labels.update((id(tick.label1), id(tick.label2)))
            for tick in axis._update_ticks():  # the ticks inside the view: those that are drawn
                texts += [(t, ax) for t in (tick.label1, tick.label2) if t.get_visible()]
    texts += [(t, t.axes) for t in fig.findobj(Text) if id(t) not in tick_labels and t.get_visible()]
    return [(repr(t.get_text()), t.get_window_extent(renderer), ax) for t, ax in texts if t.get_text().strip()]


def layout_problems(fig: Any, space_pt: float = 3.0) -> list[str]:
    """What makes a figure hard to read, one line each; ``[]`` for a clean layout:

    - two drawn text boxes that overlap, or stand side by side closer than ``space_pt``
      points (about a space: "noise" and "Same" of two titles would read as one line);
    - a text box over the plotting area of another axes (a tick label or title drawn over
      the neighbouring panel; twin axes sharing one area count as one);
    - a text box that leaves the figure's canvas.

    Boxes are the renderer's window extents (axis-aligned), so rotated tick labels count by
    their bounding box: label bars horizontally, on two lines where needed.
    """
    texts = _drawn_texts(fig)
    space = space_pt * fig.dpi / 72.0
    width, height = fig.bbox.width, fig.bbox.height
    problems = []
    for label, box, _ax in texts:
        if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > width + 0.5 or box.y1 > height + 0.5:
            problems.append(
                f"{label} leaves the canvas ({box.x0:.0f}..{box.x1:.0f} x {box.y0:.0f}..{box.y1:.0f} px "
                f"of {width:.0f} x {height:.0f})"
            )
    for i, (label_a, a, _) in enumerate(texts):
        for label_b, b, _ in texts[i + 1 :]:
            dx = min(a.x1, b.x1) - max(a.x0, b.x0)  # > 0: the boxes overlap horizontally
            dy = min(a.y1, b.y1) - max(a.y0, b.y0)
            if dy > 0.5 and dx > -space:
                what = "overlaps" if dx > 0.5 else f"runs into ({-dx:.0f} px apart)"
                problems.append(f"{label_a} {what} {label_b}")
    for label, box, owner in texts:
        for ax in fig.axes:
            if ax is owner or (owner is not None and ax.bbox.bounds == owner.bbox.bounds):
                continue
            dx = min(box.x1, ax.bbox.x1) - max(box.x0, ax.bbox.x0)
            dy = min(box.y1, ax.bbox.y1) - max(box.y0, ax.bbox.y0)
            if dx > 0.5 and dy > 0.5:
                title = ax.get_title() or ax.get_ylabel() or "another panel"
                problems.append(f"{label} is drawn over the plotting area of {title!r}")
    return problems


@contextlib.contextmanager
def checking_layout() -> Iterator[list[str]]:
    """While active, ``figures.save`` appends ``"<file name>: <problem>"`` to the yielded list for
    each of ``layout_problems`` of every figure it writes (drawing each figure once more)."""
    problems: list[str] = []

    def check(fig: Any, path: Path) -> None:
        problems.extend(f"{path.name}: {p}" for p in layout_problems(fig))

    figures.SAVE_CHECKS.append(check)
    try:
        yield problems
    finally:
        figures.SAVE_CHECKS.remove(check)
