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

from ._files import write_text_atomic

__all__ = [
    "count_claims",
    "describe_counts",
    "load_results",
    "number",
    "save_results",
    "to_jsonable",
    "versions",
]

RESULTS_NAME = "results.json"


def count_claims(claims: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """How many claims hold / do not hold / are inconclusive, replications and identities apart:
    ``{"replication": {"holds": h, "does not hold": d, "inconclusive": i}, "identity": {...}}``
    (a claim without ``kind`` is a replication; without ``verdict``, ``holds`` decides)."""
    counts = {kind: {"holds": 0, "does not hold": 0, "inconclusive": 0} for kind in ("replication", "identity")}
    for c in claims:
        verdict = c.get("verdict") or ("holds" if c.get("holds") else "does not hold")
        counts["identity" if c.get("kind") == "identity" else "replication"][str(verdict)] += 1
    return counts


def describe_counts(counts: dict[str, dict[str, int]]) -> str:
    """``"12 replications: 10 hold, 1 does not hold, 1 inconclusive; 4 identities hold"``-style."""
    parts = []
    for kind, plural in (("replication", "replications"), ("identity", "identities")):
        c = counts[kind]
        total = sum(c.values())
        if total == 0:
            continue
        name = kind if total == 1 else plural
        if c["holds"] == total:
            parts.append(f"{total} {name} {'holds' if total == 1 else 'hold'}")
        else:
            parts.append(
                f"{total} {name}: {c['holds']} hold, {c['does not hold']} do not hold, {c['inconclusive']} inconclusive"
            )
    return "; ".join(parts) if parts else "no claims"


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
    write_text_atomic(path, text + "\n")
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
    return float(value)
