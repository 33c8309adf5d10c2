"""Saving and loading ``results.json`` (atomically, mode 0644 under umask 022) and the library
versions recorded in it.

Layout of one experiment's directory ``OUT/<id>/``:
    results.json   {"id", "description", "run", "config", "data", "metrics", "claims",
                    "versions", "wall_time_s", "finished_at"}
    *.png          figures drawn from results.json
    report.html    self-contained report (figures embedded)
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from pathlib import Path
from typing import Any

from ._files import write_bytes_atomic, write_text_atomic

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "load_results",
    "number",
    "save_results",
    "to_jsonable",
    "versions",
]

RESULTS_NAME = "results.json"


atomic_write_bytes = write_bytes_atomic
"""Write bytes to a path atomically, mode ``0o666 & ~umask`` (see ``lab._files``)."""
atomic_write_text = write_text_atomic
"""Write UTF-8 text to a path atomically, mode ``0o666 & ~umask`` (see ``lab._files``)."""


def to_jsonable(value: Any) -> Any:
    """Convert tensors, NumPy values, tuples, Paths and non-finite floats for JSON.

    Non-finite floats become the strings "nan", "inf", "-inf" (strict JSON has no NaN).
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "tolist"):  # torch.Tensor, numpy array or scalar
        return to_jsonable(value.tolist())
    raise TypeError(f"to_jsonable: cannot serialize {type(value).__name__}")


def save_results(directory: Path, results: dict[str, Any]) -> Path:
    """Write ``directory/results.json`` atomically; returns its path."""
    path = Path(directory) / RESULTS_NAME
    text = json.dumps(to_jsonable(results), indent=1, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return path


def load_results(directory: Path) -> dict[str, Any]:
    """Read ``directory/results.json``; ValueError if missing or not valid JSON."""
    path = Path(directory) / RESULTS_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError(f"no {RESULTS_NAME} in {str(directory)!r}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from err


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers."""
    import numpy
    import torch

    from .. import __version__

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "batchnorm": __version__,
        "platform": platform.platform(),
    }
    for dist in ("scikit-learn", "matplotlib", "mnist1d", "numba"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def number(value: Any) -> float:
    """Read back a float saved by ``to_jsonable`` ("nan"/"inf" strings included)."""
    if isinstance(value, str):
        return float(value)
    return float(value)
