"""Saving and loading ``OUT/<id>/results.json`` (atomically, mode 0644 under umask 022; keys
``id``, ``description``, ``run``, ``config``, ``data``, ``metrics``, ``claims``, ``versions``,
``wall_time_s``, ``finished_at``), the library versions recorded in it, and its claims counted."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import platform
from pathlib import Path
from typing import Any

from .._files import write_text_atomic
from .verdict import VERDICTS

__all__ = ["count_claims", "describe_counts", "load_results", "save_results", "to_jsonable", "versions"]

RESULTS_NAME = "results.json"


def verdict_of(claim: dict[str, Any]) -> str:
    """A claim's saved ``verdict``, else (results from before verdicts were three-valued) from ``holds``."""
    verdict = claim.get("verdict")
    return str(verdict) if verdict in VERDICTS else ("holds" if claim.get("holds") else "does not hold")


def count_claims(claims: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``{"replication": {"holds": h, "does not hold": d, "inconclusive": i}, "identity": {...}}``
    (a claim without ``kind`` is a replication)."""
    counts = {kind: dict.fromkeys(VERDICTS, 0) for kind in ("replication", "identity")}
    for c in claims:
        counts["identity" if c.get("kind") == "identity" else "replication"][verdict_of(c)] += 1
    return counts


def tally(counts: dict[str, int]) -> str:
    """``"10 hold, 1 do not hold, 1 inconclusive"``: one kind's ``count_claims``."""
    return f"{counts['holds']} hold, {counts['does not hold']} do not hold, {counts['inconclusive']} inconclusive"


def describe_counts(counts: dict[str, dict[str, int]]) -> str:
    """``"12 replications: 10 hold, 1 do not hold, 1 inconclusive; 4 identities hold"``-style."""
    parts = []
    for kind, plural in (("replication", "replications"), ("identity", "identities")):
        total = sum(counts[kind].values())
        name = kind if total == 1 else plural
        if total and counts[kind]["holds"] == total:
            parts.append(f"{total} {name} {'holds' if total == 1 else 'hold'}")
        elif total:
            parts.append(f"{total} {name}: {tally(counts[kind])}")
    return "; ".join(parts) if parts else "no claims"


def to_jsonable(value: Any) -> Any:
    """Tensors, NumPy values, tuples and Paths as JSON values; non-finite floats as the strings
    "nan", "inf", "-inf" (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (str, int, float)) or value is None:  # bool is an int
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy array or scalar
        return to_jsonable(value.tolist())
    raise TypeError(f"to_jsonable: cannot serialize {type(value).__name__}")


def write_json(path: Path, value: Any) -> Path:
    """Write ``to_jsonable(value)`` to ``path`` as strict JSON, atomically; returns the path."""
    write_text_atomic(path, json.dumps(to_jsonable(value), indent=1, allow_nan=False) + "\n")
    return Path(path)


def save_results(directory: Path, results: dict[str, Any]) -> Path:
    """Write ``directory/results.json`` atomically; returns its path."""
    return write_json(Path(directory) / RESULTS_NAME, results)


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
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    return found
