"""Plot helpers shared by the experiments' ``figures`` functions.

matplotlib is imported inside ``pyplot()``, which selects the non-interactive Agg backend;
nothing here touches matplotlib at import time. Figures are saved atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .results import atomic_write_bytes

__all__ = ["mean_band", "pyplot", "save"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the Agg backend (call inside ``figures``, never at import)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically, close it, return the path."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def mean_band(ax: Any, x: Sequence[float], runs: Sequence[Sequence[float]], label: str, **kw: Any) -> None:
    """Plot the mean over runs (rows) with a shaded ±1 std band (no band for a single run)."""
    values = np.asarray(runs, dtype=float)  # (runs, len(x))
    if values.ndim == 1:
        values = values[None, :]
    mean = np.nanmean(values, axis=0)
    (line,) = ax.plot(x, mean, label=label if values.shape[0] == 1 else f"{label} (mean ± std, {values.shape[0]} seeds)", **kw)
    if values.shape[0] > 1:
        std = np.nanstd(values, axis=0)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
