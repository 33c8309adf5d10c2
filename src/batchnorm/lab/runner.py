"""Run experiments end to end: train -> results.json (atomic) -> claims -> figures -> report
(``run_one``), or redraw from saved results (``redraw``); ``docs/lab.md`` has the commands. A run
seeds torch's global generator from ``cfg.seed`` and uses one torch thread, both restored after.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import registry
from .config import RunConfig
from .progress import Progress
from .report import write_experiment_report, write_index
from .results import RESULTS_NAME, load_results, save_results, to_jsonable, versions

__all__ = ["ExperimentFailed", "judge_and_save", "redraw", "run_one", "run_many", "saved_results"]


class ExperimentFailed(RuntimeError):
    """An experiment's training or the judging of its claims raised. The message is one line
    naming the experiment and the error; when the training had finished, its measurements were
    saved first (``batchnorm lab report`` judges them again)."""


def run_one(experiment_id: str, cfg: RunConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run one experiment and write ``cfg.out/<id>/``: figures, report.html and results.json, written
    atomically once the run has finished (an interrupted run leaves the previous results, or none)."""
    experiment = registry.get(experiment_id)
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            out = experiment.run(cfg, progress or Progress())
    except Exception as err:  # one experiment's failure must not cost the others' results
        raise ExperimentFailed(f"{experiment_id}: training failed ({type(err).__name__}: {err})") from err
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - start
    results: dict[str, Any] = {
        "id": experiment_id,
        "description": experiment.DESCRIPTION,
        "run": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"},
        **{key: out.get(key, {}) for key in ("config", "data", "metrics")},
        "versions": versions(),
        "threads": 1,
        "wall_time_s": round(wall, 3),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return judge_and_save(to_jsonable(results), cfg.out / experiment_id, save_measurements=True)


def judge_and_save(results: dict[str, Any], directory: Path, *, save_measurements: bool = False) -> dict[str, Any]:
    """``results`` with its claims judged (again) by the experiment's current code, saved in
    ``directory`` with its figures and report.

    If judging raises, the measurements are saved (with ``save_measurements``) with no claims and
    ``claims_error``, and ``ExperimentFailed`` names the experiment and how to judge them again.
    """
    experiment_id = str(results.get("id"))
    experiment = registry.get(experiment_id)
    try:
        claims = to_jsonable(experiment.claims(results))
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        if save_measurements:
            save_results(directory, {**results, "claims": [], "claims_error": error})
        raise ExperimentFailed(
            f"{experiment_id}: judging its claims failed ({error}); its measurements are in {directory} "
            f"(`batchnorm lab report {directory}` judges them again)"
        ) from err
    judged = {k: v for k, v in results.items() if k != "claims_error"}
    judged["claims"] = claims
    save_results(directory, judged)
    write_experiment_report(directory, judged, experiment)
    return judged


def _run_or_error(
    experiment_id: str, cfg: RunConfig, progress: Progress | None = None
) -> dict[str, Any] | ExperimentFailed:
    """``run_one``'s results, or its ``ExperimentFailed`` (returned, not raised)."""
    try:
        return run_one(experiment_id, cfg, progress)
    except ExperimentFailed as err:
        return err


def run_many(
    experiment_ids: Sequence[str], cfg: RunConfig, jobs: int = 1, progress_for: Callable[[int], Progress] | None = None
) -> Iterator[tuple[int, str, dict[str, Any] | ExperimentFailed]]:
    """``(position, id, results or ExperimentFailed)`` of each experiment as it finishes: one
    after another, the ``k``-th shown by ``progress_for(k)``, or ``jobs`` at a time, each in its
    own (spawned) process with one torch thread and no progress display. Every run seeds itself
    (``run_one``), so the results are those of running them one after another."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if jobs == 1 or len(experiment_ids) == 1:
        for k, experiment_id in enumerate(experiment_ids):
            yield k, experiment_id, _run_or_error(experiment_id, cfg, progress_for(k) if progress_for else None)
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_or_error, e, cfg): (k, e) for k, e in enumerate(experiment_ids)}
        for future in as_completed(futures):
            yield (*futures[future], future.result())


def saved_results(out: Path) -> list[dict[str, Any]]:
    """Every results.json under ``out/*/``, in registry order, then the rest by name."""
    order = {eid: i for i, eid in enumerate(registry.EXPERIMENTS)}
    found = [load_results(path.parent) for path in sorted(Path(out).glob(f"*/{RESULTS_NAME}"))]
    return sorted(found, key=lambda r: (order.get(r.get("id", ""), len(order)), str(r.get("id"))))


def redraw(directory: Path) -> list[Path]:
    """Re-judge claims and redraw figures and reports from saved results, without training.

    ``directory`` is one experiment's directory (with results.json) or an output root (with
    ``*/results.json``; its index.html is rewritten). Returns the reports written.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{str(directory)!r} is not a directory")
    root = not (directory / RESULTS_NAME).is_file()
    targets = sorted(p.parent for p in directory.glob(f"*/{RESULTS_NAME}")) if root else [directory]
    if not targets:
        raise ValueError(f"no {RESULTS_NAME} in {str(directory)!r} or its sub-directories")
    written = [_redraw_one(target) for target in targets]
    if root:
        written.append(write_index(directory, saved_results(directory)))
    return written


def _redraw_one(target: Path) -> Path:
    results = load_results(target)
    if not isinstance(results.get("id"), str):
        raise ValueError(f"{str(target / RESULTS_NAME)!r} has no experiment id")
    try:
        judge_and_save(results, target)
    except (ExperimentFailed, KeyError, IndexError, TypeError) as err:
        cause = err.__cause__ if isinstance(err, ExperimentFailed) else err
        raise ValueError(
            f"{str(target / RESULTS_NAME)!r} cannot be redrawn ({type(cause).__name__}: {cause}); it may come from an "
            f"older version of {results['id']}: run it again"
        ) from err
    return target / "report.html"
