"""Plot helpers shared by the experiments' ``figures`` functions.

matplotlib is imported inside ``pyplot()``, which selects the non-interactive Agg backend and
readable font sizes; nothing here touches matplotlib at import time. ``save`` writes figures
atomically (mode 0644 under umask 022), cropped to their content so no label is clipped, with bar
axes that start at 0 and log axes labelled in one format.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._files import write_bytes_atomic

__all__ = ["mean_band", "pyplot", "save"]


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
}
"""Font sizes that stay readable once the PNG is scaled to a report's width."""


def _tidy(fig: Any) -> None:
    """Bars start at 0 (no truncated bars), log axes show one tick format (no labelled minor ticks)."""
    from matplotlib.container import BarContainer
    from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

    for ax in fig.axes:
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        if bars and ax.get_yscale() == "linear":
            heights = [p.get_height() for c in bars for p in c.patches]
            if heights and min(heights) >= 0:
                ax.set_ylim(bottom=0)
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                axis.set_major_formatter(LogFormatterSciNotation())
                axis.set_minor_formatter(NullFormatter())


def save(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically, close it, return the path."""
    plt = pyplot()
    buf = io.BytesIO()
    _tidy(fig)
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())
    return Path(path)


def mean_band(ax: Any, x: Sequence[float], runs: Sequence[Sequence[float]], label: str, **kw: Any) -> None:
    """Plot the mean over runs (rows) with a shaded ±1 std band (no band for a single run)."""
    values = np.asarray(runs, dtype=float)  # (runs, len(x))
    if values.ndim == 1:
        values = values[None, :]
    mean = np.nanmean(values, axis=0)
    (line,) = ax.plot(
        x, mean, label=label if values.shape[0] == 1 else f"{label} (mean ± std, {values.shape[0]} seeds)", **kw
    )
    if values.shape[0] > 1:
        std = np.nanstd(values, axis=0)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
