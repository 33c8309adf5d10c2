"""Plot helpers shared by the experiments' ``figures`` (matplotlib is imported only inside
``pyplot()``); ``save`` writes a figure atomically, bar axes from 0 and log axes readably labelled
(the layout rules and their test: docs/lab.md, "Figures and reports").
"""

from __future__ import annotations

import io
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._files import write_bytes_atomic

__all__ = [
    "SAVE_CHECKS",
    "NamedFigures",
    "bar_values",
    "categories",
    "dress",
    "log_ticks",
    "mean_band",
    "pyplot",
    "save",
    "save_all",
    "wrap",
]


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the Agg backend (call inside ``figures``, never at import)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(_STYLE)
    return plt


_STYLE: dict[Any, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.framealpha": 0.8,
    "figure.constrained_layout.use": True,
}
"""Font sizes readable once the PNG is scaled to a report's width; constrained layout makes room
for every title, label and tick label inside the canvas."""


def _tidy(fig: Any) -> None:
    """Bars start at 0 (no truncated bars); every log axis is labelled by ``_log_axis``."""
    from matplotlib.container import BarContainer

    for ax in fig.axes:
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        upright = [p.get_height() for c in bars if c.orientation != "horizontal" for p in c.patches]
        if upright and min(upright) >= 0 and ax.get_yscale() == "linear":
            ax.set_ylim(bottom=0)
        sideways = [p.get_width() for c in bars if c.orientation == "horizontal" for p in c.patches]
        if sideways and min(sideways) >= 0 and ax.get_xscale() == "linear":
            ax.set_xlim(left=0)
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                _log_axis(axis)


def _log_axis(axis: Any) -> None:
    """Label a log axis so at least three ticks carry a label: decades, else decades with 1-2-5 (or
    1-2-3-5, or every multiple) between them; plain numbers (0.01, 2, 500) for a view inside
    [1e-3, 1e5), powers of ten outside. Axes given fixed ticks (``log_ticks``) are left alone."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatterSciNotation, LogLocator, NullFormatter

    if isinstance(axis.get_major_locator(), FixedLocator):
        return
    lo, hi = sorted(float(v) for v in axis.get_view_interval())
    if not (lo > 0 and np.isfinite(hi)):
        return
    base = float(getattr(axis.get_transform(), "base", 10.0))
    candidates = (
        ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0), tuple(float(k) for k in range(1, 10)))
        if base == 10
        else ((1.0,), (1.0, 1.5))  # base 2: powers of two, then their midpoints (2, 3, 4, 6, 8)
    )
    subs: tuple[float, ...] = (1.0,)
    for candidate in candidates:
        subs = candidate
        ticks = np.asarray(LogLocator(base=base, subs=candidate).tick_values(lo, hi), dtype=float)
        if np.count_nonzero((ticks >= lo * (1 - 1e-9)) & (ticks <= hi * (1 + 1e-9))) >= 3:
            break
    axis.set_major_locator(LogLocator(base=base, subs=subs))
    if 1e-3 <= lo and hi < 1e5:
        axis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    else:
        axis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(np.inf, np.inf)))
    axis.set_minor_formatter(NullFormatter())


def log_ticks(axis: Any, values: Sequence[float], base: float | None = None) -> None:
    """Major ticks of a log ``axis`` at ``values`` (a grid's sizes or rates) as plain numbers, no
    minor labels; ``base`` given, first make the axis logarithmic in that base."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    if base is not None:
        getattr(axis.axes, f"set_{axis.axis_name}scale")("log", base=base)
    axis.set_major_locator(FixedLocator(sorted(float(v) for v in values)))
    axis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def wrap(text: str, width: int = 14) -> str:
    """``text`` broken into lines of at most ``width`` characters (at spaces): category labels
    under bars stay horizontal and side by side instead of rotated into each other."""
    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


SAVE_CHECKS: list[Callable[[Any, Path], None]] = []
"""Called as ``check(fig, path)`` by ``save`` on every figure, tidied, before it is written (the
tests' layout check registers here: ``tests/lab/_layout.py``)."""


def save(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically, close it, return the path."""
    plt = pyplot()
    buf = io.BytesIO()
    _tidy(fig)
    for check in SAVE_CHECKS:
        check(fig, Path(path))
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())
    return Path(path)


NamedFigures = Iterator[tuple[str, Any]]
"""What an experiment's ``figures(results)`` yields: ``(file name, figure)`` pairs, in order."""


def save_all(figures: Iterable[tuple[str, Any]], outdir: Path) -> list[Path]:
    """``save`` each ``(file name, figure)`` as ``outdir/<file name>`` as it comes; the paths in order."""
    return [save(fig, Path(outdir) / name) for name, fig in figures]


def mean_band(ax: Any, x: Sequence[float], runs: Sequence[Sequence[float]], label: str, **kw: Any) -> None:
    """Plot the mean over runs (rows) with a shaded ±1 std band (no band for a single run).

    NaN entries (a run that diverged, a point not measured) are left out of that point's mean
    and std; a point with no finite value is a gap in the line."""
    values = np.atleast_2d(np.asarray(runs, dtype=float))  # (runs, len(x))
    finite = np.isfinite(values)
    with warnings.catch_warnings():  # a point with no finite value: mean and std NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, std = (f(np.where(finite, values, np.nan), axis=0) for f in (np.nanmean, np.nanstd))
    n = values.shape[0]
    seeds = f"{n} seeds" if finite.all() else f"up to {n} seeds"
    (line,) = ax.plot(x, mean, label=label if n == 1 else f"{label} (mean ± std, {seeds})", **kw)
    if n > 1:
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)


def dress(
    ax: Any,
    title: str | None = None,
    *,
    title_size: float | None = None,
    grid: bool | str = False,
    legend: bool | dict[str, Any] = False,
    **props: Any,
) -> None:
    """Finish a panel: ``ax.set(**props)``, then the title (at ``title_size`` points), a light grid
    (``True``: both axes, or ``"x"``/``"y"``) and the legend (``True``, or ``ax.legend`` options)."""
    ax.set(**props)
    if title is not None:
        ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
    if grid:
        ax.grid(alpha=0.3, **({} if grid is True else {"axis": grid}))
    if legend:
        ax.legend(**(legend if isinstance(legend, dict) else {}))


def categories(axis: Any, labels: Sequence[str], **kw: Any) -> None:
    """Label the positions 0, 1, ... of ``axis`` (bars drawn at ``range(n)``) with ``labels`` (``kw``: text options)."""
    axis.set_ticks(range(len(labels)))
    axis.set_ticklabels(labels, **kw)


def bar_values(ax: Any, values: Sequence[float], fmt: str = "{}", **kw: Any) -> None:
    """Write each value (``fmt.format(value)``) just above its bar at position 0, 1, ... (``kw``:
    text options), so a reader need not estimate heights from the axis."""
    for i, value in enumerate(values):
        ax.text(i, value, fmt.format(value), ha="center", va="bottom", **kw)
