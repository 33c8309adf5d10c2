"""``batchnorm lab ...`` sub-commands (thin: parse, then call the runner).

    batchnorm lab list
    batchnorm lab run ID... | all  [--quick] [--seed N] [--data digits|mnist1d|mnist:DIR] [--out DIR]
    batchnorm lab report DIR
    batchnorm lab replicate --data digits,mnist1d --seeds 0-4 [--quick] [--out DIR] [--resume]

Imported whenever the ``batchnorm`` parser is built, so it imports nothing heavy at the top.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..cli._util import CliError, check_output_dir, probe_write, require

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lab`` with its ``list``, ``run``, ``replicate`` and ``report`` sub-commands."""
    lab = subparsers.add_parser("lab", help="reproduce experiments from the batch-norm literature")
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    p_list = sub.add_parser(
        "list",
        help="list experiments with a quick-mode time estimate",
        description="List the experiments with their --quick wall time, measured by scripts/measure_lab_times.py "
        "(longer when other work shares the cores).",
    )
    p_list.set_defaults(func=_cmd_list)

    p_run = sub.add_parser("run", help="run experiments (ids from `lab list`, or `all`)")
    p_run.add_argument("ids", nargs="+", metavar="ID", help="experiment ids, or `all`")
    _add_mode(p_run, "scaled-down run (seconds to minutes each: seeds are added until the claims are settled)")
    p_run.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    p_run.add_argument("--data", default="digits", help="digits (default) | mnist1d | mnist:DIR")
    p_run.add_argument(
        "--out",
        type=Path,
        default=Path("runs"),
        help="output root (default runs/): each experiment writes OUT/ID/ (results.json, figures, report.html); "
        "several write OUT/index.html",
    )
    p_run.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        help="experiments run at once, each in its own process with one thread (default 1; 2 on 2 cores "
        "halves `all`'s time; a line is printed as each finishes, no progress bars)",
    )
    p_run.set_defaults(func=_cmd_run)

    p_rep = sub.add_parser("replicate", help="every experiment on several data sets and seeds: the replication matrix")
    p_rep.add_argument("--data", default="digits,mnist1d", help="comma-separated data sets (default digits,mnist1d)")
    p_rep.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 or 0,3,7 (default 0-4)")
    _add_mode(p_rep, "scaled-down runs")
    p_rep.add_argument("--only", default=None, help=argparse.SUPPRESS)
    p_rep.add_argument(
        "--resume",
        action="store_true",
        help="keep experiments already measured in OUT with the same mode, data and seeds (their claims are judged again)",
    )
    p_rep.add_argument(
        "--out",
        type=Path,
        default=Path("runs/replication"),
        help="output root (default runs/replication): runs go to OUT/DATA/ID/, the matrix to OUT/index.html",
    )
    p_rep.set_defaults(func=_cmd_replicate)

    p_report = sub.add_parser("report", help="redraw figures and reports from saved results.json")
    p_report.add_argument("dir", type=Path, metavar="DIR", help="an output directory or one experiment's directory")
    p_report.set_defaults(func=_cmd_report)


def _add_mode(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """``--quick`` (and the hidden ``--tiny``) setting ``mode``, ``full`` by default."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help=quick_help)
    mode.add_argument("--tiny", action="store_const", const="tiny", dest="mode", help=argparse.SUPPRESS)
    parser.set_defaults(mode="full")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def quick_seconds(experiment_id: str) -> float:
    """The measured ``--quick`` wall time of an experiment (``quick_seconds.py``, which lists every one)."""
    from .quick_seconds import QUICK_SECONDS

    return QUICK_SECONDS[experiment_id]


def _cmd_list(args: argparse.Namespace) -> int:
    from . import registry

    for experiment_id in registry.ids():
        description = registry.get(experiment_id).DESCRIPTION
        print(f"{experiment_id:<26} ~{quick_seconds(experiment_id):>4.0f} s quick   {description}")
    return 0


def _resolve_ids(requested: list[str]) -> list[str]:
    from . import registry

    known = registry.ids()
    if "all" in requested:
        if len(requested) > 1:
            raise CliError("`all` cannot be combined with other experiment ids")
        return list(known)
    unknown = [i for i in requested if i not in known]
    if unknown:
        raise CliError(f"unknown experiment {unknown[0]!r}; run `batchnorm lab list` to see the ids")
    return list(dict.fromkeys(requested))  # in order, without repeats


_LAB_MODULES = ("sklearn", "matplotlib", "tqdm")  # what every run needs; mnist1d only for --data mnist1d


def _cmd_run(args: argparse.Namespace) -> int:
    ids = _resolve_ids(args.ids)
    require(_LAB_MODULES + (("mnist1d",) if args.data == "mnist1d" else ()), "batchnorm lab run")

    from .config import RunConfig
    from .datasets import load
    from .progress import Eta, for_stderr
    from .report import write_index
    from .results import count_claims, describe_counts
    from .runner import ExperimentFailed, experiment_dir, run_or_error, run_parallel

    try:  # load once up front: a bad data spec or path fails here with one line, before any training
        load(args.data, args.seed, small=args.mode == "tiny")
    except ValueError as err:
        raise CliError(str(err)) from None
    check_output_dir(args.out, "--out")
    for experiment_id in ids:
        target = experiment_dir(args.out, experiment_id)
        if target.exists() and not target.is_dir():
            raise CliError(f"--out {str(args.out)!r}: {str(target)!r} is a file, not a folder")
    cfg = RunConfig(mode=args.mode, seed=args.seed, data=args.data, out=args.out)

    start = time.perf_counter()
    failed = 0
    all_claims: list[dict[str, Any]] = []
    if args.jobs > 1 and len(ids) > 1:
        outcomes = run_parallel(ids, cfg, args.jobs)
    else:
        # quick-mode times are measured; other modes learn their scale from the first experiment
        eta = Eta([quick_seconds(i) for i in ids], trusted=args.mode == "quick")

        def sequential() -> Iterator[tuple[int, str, Any]]:
            for i, experiment_id in enumerate(ids):
                eta.start(i)
                progress = for_stderr(
                    f"[{i + 1}/{len(ids)}] {experiment_id}",
                    expected_s=eta.expected_s(i),
                    eta=eta if len(ids) > 1 else None,
                )
                progress.note("started")
                yield i, experiment_id, run_or_error(experiment_id, cfg, progress)

        outcomes = sequential()
    for i, _experiment_id, results in outcomes:
        if isinstance(results, ExperimentFailed):  # one line; the other experiments still run
            failed += 1
            print(
                f"batchnorm: error: [{i + 1}/{len(ids)}] {' '.join(str(results).split())}", file=sys.stderr, flush=True
            )
            continue
        # one line as each experiment finishes (flushed: logs of CI and nohup runs show it at once)
        claims = results.get("claims", [])
        all_claims.extend(claims)
        n_seeds = len(results.get("metrics", {}).get("seeds") or [])
        seeds = f"; {n_seeds} seeds" if n_seeds else ""
        print(
            f"[{i + 1}/{len(ids)}] {results['id']}: {describe_counts(count_claims(claims))}{seeds}, "
            f"{results['wall_time_s']:.1f} s -> {experiment_dir(cfg.out, results['id']) / 'report.html'}",
            flush=True,
        )
        for c in claims:
            if not c.get("holds"):
                why = f"; {c['why']}" if c.get("why") else ""
                print(f"  {c.get('verdict', 'does not hold')}: {c.get('claim')} ({c.get('evidence')}{why})", flush=True)
    if len(ids) > 1 or args.ids == ["all"]:
        index = write_index(cfg.out, _saved_results(cfg.out))
        print(f"all: {describe_counts(count_claims(all_claims))}")
        print(f"index: {index} ({time.perf_counter() - start:.1f} s in all)")
    sys.stdout.flush()
    return 1 if failed else 0


def _saved_results(out: Path) -> list[dict[str, object]]:
    """Every ``out/<id>/results.json`` of a known experiment, in the registry's order."""
    from . import registry
    from .results import RESULTS_NAME, load_results

    return [load_results(out / i) for i in registry.ids() if (out / i / RESULTS_NAME).is_file()]


def _cmd_report(args: argparse.Namespace) -> int:
    require(("matplotlib",), "batchnorm lab report")
    from .runner import redraw

    if Path(args.dir).is_dir():  # figures and reports are rewritten there: checked before any work
        probe_write(Path(args.dir), f"lab report {args.dir}: cannot write there")
    try:
        written = redraw(args.dir)
    except ValueError as err:
        raise CliError(str(err)) from None
    for path in written:
        print(path)
    return 0


def _cmd_replicate(args: argparse.Namespace) -> int:
    datasets = [d.strip() for d in args.data.split(",") if d.strip()]
    require(_LAB_MODULES + (("mnist1d",) if "mnist1d" in datasets else ()), "batchnorm lab replicate")
    from .datasets import load
    from .replicate import parse_seeds, replicate

    try:
        seeds = parse_seeds(args.seeds)
        if not datasets:
            raise ValueError(f"expected --data like digits,mnist1d, got {args.data!r}")
        for d in datasets:
            load(d, seeds[0], small=args.mode == "tiny")
    except ValueError as err:
        raise CliError(str(err)) from None
    ids = _resolve_ids(args.only.split(",")) if args.only else None
    check_output_dir(args.out, "--out")
    from .experiment import SEED_PLANS
    from .progress import Eta, Progress, for_stderr
    from .registry import ids as all_ids

    order = ids if ids is not None else list(all_ids())
    # quick times are measured under the seed plan, which trains at least its first look's seeds
    per_seed = len(seeds) / SEED_PLANS["quick"].looks[0]
    eta = Eta([quick_seconds(i) * per_seed for _ in datasets for i in order], trusted=args.mode == "quick")

    def progress_for(experiment_id: str, k: int, n: int) -> Progress:
        eta.start(k)
        data = datasets[k // len(order)]
        progress = for_stderr(f"[{k + 1}/{n}] {data} {experiment_id}", expected_s=eta.expected_s(k), eta=eta)
        progress.note("started")
        return progress

    start = time.perf_counter()
    matrix = replicate(datasets, seeds, args.mode, args.out, ids, progress_for, resume=args.resume)
    for row in matrix["rows"]:
        cells = "; ".join(
            f"{d}: {c['holds']} hold / {c['does_not_hold']} not / {c['inconclusive']} inconclusive"
            for d, c in row["cells"].items()
        )
        print(f"{row['id']}: {cells}")
    print(f"matrix: {args.out / 'index.html'} ({time.perf_counter() - start:.1f} s in all)")
    for failure in matrix["failed"]:
        print(f"batchnorm: error: {' '.join(failure.split())}", file=sys.stderr)
    return 1 if matrix["failed"] else 0
