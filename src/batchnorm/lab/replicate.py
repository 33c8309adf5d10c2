"""The replication matrix: every experiment on every data set over the same seeds, one row per
(experiment, data set) with its claims holding / not holding / inconclusive and our effect
sizes beside the papers'.

    matrix = replicate(["digits", "mnist1d"], seeds=(0, 1, 2, 3, 4), mode="quick", out=Path("runs/rep"))
    # runs/rep/<data>/<id>/... (each run as `lab run` writes it), runs/rep/replication.json,
    # runs/rep/index.html
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .._files import write_text_atomic
from .config import Mode, RunConfig
from .progress import Progress
from .report import matrix_html, write_index
from .results import count_claims, load_results, verdict_of, write_json
from .runner import ExperimentFailed, judge_and_save, run_one

__all__ = ["parse_seeds", "replicate", "write_matrix"]


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0-4"`` -> (0, 1, 2, 3, 4); ``"0,3,7"`` -> (0, 3, 7); ranges and lists mix (``"0-2,9"``)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if found is None or int(found[1]) > int(found[2] or found[1]):
            raise ValueError(f"expected seeds like 0-4 or 0,3,7 (non-negative, ascending ranges), got {text!r}")
        seeds.extend(range(int(found[1]), int(found[2] or found[1]) + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"expected distinct non-negative seeds like 0-4 or 0,3,7, got {text!r}")
    return tuple(seeds)


# what the matrix keeps of each claim, in this order ("zero_spread" and "confidence" where present)
_CLAIM_KEYS = "claim kind n_seeds why verdict estimate interval direction expected source evidence".split()


def _cell(results: dict[str, Any]) -> dict[str, Any]:
    """One (experiment, data set) cell: replications counted in ``holds`` / ``does_not_hold`` /
    ``inconclusive``, identities of the math apart in ``identities`` (``results.count_claims``)."""
    claims = results.get("claims", [])
    counts = count_claims(claims)
    return {
        **{verdict.replace(" ", "_"): n for verdict, n in counts["replication"].items()},
        "identities": counts["identity"],
        "seeds": results.get("metrics", {}).get("seeds"),  # every run records them (``Experiment.run``)
        "claims": [
            {
                **{k: c.get(k) for k in _CLAIM_KEYS},
                "kind": c.get("kind", "replication"),
                "verdict": verdict_of(c),
                **{k: c[k] for k in ("zero_spread", "confidence") if k in c},
            }
            for c in claims
        ],
    }


def write_matrix(matrix: dict[str, Any], out: Path) -> Path:
    """Write ``out/replication.json`` and ``out/index.html``; returns the HTML path."""
    write_json(Path(out) / "replication.json", matrix)
    write_text_atomic(Path(out) / "index.html", matrix_html(matrix))
    return Path(out) / "index.html"


def _saved_run(directory: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The results saved in ``directory`` if they were measured with ``cfg``'s mode, data and seeds."""
    try:
        saved = load_results(directory)
    except ValueError:  # none, or not readable
        return None
    run = saved.get("run", {})
    same = (run.get("mode"), run.get("data"), run.get("seeds")) == (cfg.mode, cfg.data, list(cfg.seeds or ()))
    return saved if same and saved.get("metrics") else None


def replicate(
    datasets: Sequence[str],
    seeds: Sequence[int],
    mode: Mode,
    out: Path,
    ids: Sequence[str] | None = None,
    progress_for: Callable[[int], Progress] | None = None,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``ids`` (default: all) on every data set with ``seeds`` into ``out/<data>/`` and
    write the matrix (``write_matrix``); returns it.

    With ``resume``, results in ``out/<data>/<id>/`` measured with the same mode, data set and
    seeds are judged again, not trained again. An experiment that ignores ``--data``
    (``USES_DATA`` false) runs for the first data set only (listed in ``"data_independent"``);
    one that fails leaves its cell empty and a line in ``"failed"``, and the others still run.
    ``progress_for(k)`` makes the display of the ``k``-th run (data sets in order, experiments
    within each), not called for a run kept by ``resume``.
    """
    from . import registry

    experiment_ids = list(ids) if ids is not None else list(registry.EXPERIMENTS)
    uses_data = {i: registry.get(i).USES_DATA for i in experiment_ids}  # a bad id fails before any training
    by_data: dict[str, dict[str, dict[str, Any]]] = {}  # data set -> id -> results
    failed: list[str] = []
    for d, data in enumerate(datasets):
        cfg = RunConfig(
            mode=mode, seed=int(seeds[0]), seeds=tuple(int(s) for s in seeds), data=data, out=Path(out) / data
        )
        by_data[data] = {}
        for i, experiment_id in enumerate(experiment_ids):
            if d > 0 and not uses_data[experiment_id]:
                continue  # it ignores --data: measured once, in the first data set's column only
            directory = cfg.out / experiment_id
            saved = _saved_run(directory, cfg) if resume else None
            try:
                if saved is not None:
                    by_data[data][experiment_id] = judge_and_save(saved, directory)
                else:
                    progress = progress_for(d * len(experiment_ids) + i) if progress_for else None
                    by_data[data][experiment_id] = run_one(experiment_id, cfg, progress)
            except ExperimentFailed as err:
                failed.append(f"{data}: {err}")
        if by_data[data]:
            write_index(cfg.out, list(by_data[data].values()))
    rows = [{"id": i, "cells": {d: _cell(rs[i]) for d, rs in by_data.items() if i in rs}} for i in experiment_ids]
    matrix = {
        "seeds": list(seeds),
        "mode": mode,
        "data": list(by_data),
        "rows": [row for row in rows if row["cells"]],
        "failed": failed,
        "data_independent": [i for i in experiment_ids if not uses_data[i]],
    }
    write_matrix(matrix, Path(out))
    return matrix
