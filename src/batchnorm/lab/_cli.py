"""``batchnorm lab ...`` sub-commands (thin: parse, then call the runner).

    batchnorm lab list
    batchnorm lab run ID... | all  [--quick] [--seed N] [--data digits|mnist1d|mnist:DIR] [--out DIR]
    batchnorm lab report DIR
    batchnorm lab replicate --data digits,mnist1d --seeds 0-4 [--quick] [--out DIR] [--resume]

Imported whenever the ``batchnorm`` parser is built, so it imports nothing heavy at the top.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..cli._util import CliError, check_output_dir, probe_write, require

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lab`` with its ``list``, ``run``, ``replicate`` and ``report`` sub-commands."""
    lab = subparsers.add_parser("lab", help="reproduce experiments from the batch-norm literature")
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    sub.add_parser(
        "list",
        help="list experiments with a quick-mode time estimate",
        description="List the experiments with their --quick wall time, measured by scripts/measure_lab_times.py "
        "(longer when other work shares the cores).",
    ).set_defaults(func=_cmd_list)

    run = sub.add_parser("run", help="run experiments (ids from `lab list`, or `all`)")
    run.set_defaults(func=_cmd_run)
    run.add_argument("ids", nargs="+", metavar="ID", help="experiment ids, or `all`")
    _add_mode(run, "scaled-down run (seconds to minutes each: seeds are added until the claims are settled)")
    run.add_argument("--seed", type=_count(0), default=0, help="random seed (default 0)")
    run.add_argument("--data", default="digits", help="digits (default) | mnist1d | mnist:DIR")
    run.add_argument(
        "--out",
        type=Path,
        default=Path("runs"),
        help="output root (default runs/): each experiment writes OUT/ID/ (results.json, figures, report.html); "
        "several write OUT/index.html",
    )
    run.add_argument(
        "--jobs",
        type=_count(1),
        default=1,
        help="experiments run at once, each in its own process with one thread (default 1; 2 on 2 cores "
        "halves `all`'s time; a line is printed as each finishes, no progress bars)",
    )

    rep = sub.add_parser("replicate", help="every experiment on several data sets and seeds: the replication matrix")
    rep.set_defaults(func=_cmd_replicate)
    rep.add_argument("--data", default="digits,mnist1d", help="comma-separated data sets (default digits,mnist1d)")
    rep.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 or 0,3,7 (default 0-4)")
    _add_mode(rep, "scaled-down runs")
    rep.add_argument("--only", default=None, help=argparse.SUPPRESS)
    rep.add_argument(
        "--resume",
        action="store_true",
        help="keep experiments already measured in OUT with the same mode, data and seeds (their claims are judged again)",
    )
    rep.add_argument(
        "--out",
        type=Path,
        default=Path("runs/replication"),
        help="output root (default runs/replication): runs go to OUT/DATA/ID/, the matrix to OUT/index.html",
    )

    report = sub.add_parser("report", help="redraw figures and reports from saved results.json")
    report.set_defaults(func=_cmd_report)
    report.add_argument("dir", type=Path, metavar="DIR", help="an output directory or one experiment's directory")


def _add_mode(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """``--quick`` (and the hidden ``--tiny``) setting ``mode``, ``full`` by default."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help=quick_help)
    mode.add_argument("--tiny", action="store_const", const="tiny", dest="mode", help=argparse.SUPPRESS)
    parser.set_defaults(mode="full")


def _count(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (0: non-negative, 1: positive)."""

    def parse(text: str) -> int:
        if text.strip().lstrip("+-").isdigit() and int(text) >= low:
            return int(text)
        raise argparse.ArgumentTypeError(f"expected a {('non-negative', 'positive')[low]} integer, got {text!r}")

    return parse


def quick_seconds() -> dict[str, float]:
    """Each experiment's measured ``--quick`` wall time (``quick_seconds.json``, package data
    written by scripts/measure_lab_times.py)."""
    text = importlib.resources.files(__package__).joinpath("quick_seconds.json").read_text(encoding="utf-8")
    return dict(json.loads(text)["seconds"])


def _cmd_list(args: argparse.Namespace) -> int:
    from . import registry

    seconds = quick_seconds()
    for experiment_id in registry.EXPERIMENTS:
        description = registry.get(experiment_id).DESCRIPTION
        print(f"{experiment_id:<26} ~{seconds[experiment_id]:>4.0f} s quick   {description}")
    return 0


def _resolve_ids(requested: list[str]) -> list[str]:
    from . import registry

    if "all" in requested:
        if len(requested) > 1:
            raise CliError("`all` cannot be combined with other experiment ids")
        return list(registry.EXPERIMENTS)
    unknown = [i for i in requested if i not in registry.EXPERIMENTS]
    if unknown:
        raise CliError(f"unknown experiment {unknown[0]!r}; run `batchnorm lab list` to see the ids")
    return list(dict.fromkeys(requested))  # in order, without repeats


def _check_data(command: str, datasets: Sequence[str], seed: int, mode: str) -> None:
    """The lab's dependencies are installed and every data set loads: else one line, before any training."""
    require(("sklearn", "matplotlib", "tqdm") + (("mnist1d",) if "mnist1d" in datasets else ()), command)
    from .datasets import load

    try:
        for data in datasets:
            load(data, seed, small=mode == "tiny")
    except ValueError as err:
        raise CliError(str(err)) from None


def _cmd_run(args: argparse.Namespace) -> int:
    ids = _resolve_ids(args.ids)
    _check_data("batchnorm lab run", [args.data], args.seed, args.mode)
    from .config import RunConfig
    from .progress import for_stderr
    from .report import write_index
    from .results import count_claims, describe_counts, verdict_of
    from .runner import ExperimentFailed, run_many, saved_results

    check_output_dir(args.out, "--out")
    for target in (args.out / i for i in ids):
        if target.exists() and not target.is_dir():
            raise CliError(f"--out {str(args.out)!r}: {str(target)!r} is a file, not a folder")
    cfg = RunConfig(mode=args.mode, seed=args.seed, data=args.data, out=args.out)

    start, n = time.perf_counter(), len(ids)
    labels = [f"[{k + 1}/{n}] {i}" for k, i in enumerate(ids)]
    # quick-mode times are measured; other modes learn their scale from the first experiment
    progress_for = for_stderr(labels, [quick_seconds()[i] for i in ids], trusted=args.mode == "quick", overall=n > 1)
    failed, all_claims = 0, []
    for i, _, results in run_many(ids, cfg, args.jobs, progress_for):
        if isinstance(results, ExperimentFailed):  # one line; the other experiments still run
            failed += 1
            print(f"batchnorm: error: [{i + 1}/{n}] {' '.join(str(results).split())}", file=sys.stderr, flush=True)
            continue
        # one line as each experiment finishes (flushed: logs of CI and nohup runs show it at once)
        claims: list[dict[str, Any]] = results.get("claims", [])
        all_claims += claims
        n_seeds = len(results.get("metrics", {}).get("seeds") or [])
        seeds = f"; {n_seeds} seeds" if n_seeds else ""
        report = cfg.out / results["id"] / "report.html"
        counts = describe_counts(count_claims(claims))
        print(f"[{i + 1}/{n}] {results['id']}: {counts}{seeds}, {results['wall_time_s']:.1f} s -> {report}", flush=True)
        for c in claims:
            if verdict_of(c) != "holds":
                why = f"; {c['why']}" if c.get("why") else ""
                print(f"  {verdict_of(c)}: {c.get('claim')} ({c.get('evidence')}{why})", flush=True)
    if n > 1 or args.ids == ["all"]:
        index = write_index(cfg.out, saved_results(cfg.out))
        print(f"all: {describe_counts(count_claims(all_claims))}")
        print(f"index: {index} ({time.perf_counter() - start:.1f} s in all)", flush=True)
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    require(("matplotlib",), "batchnorm lab report")
    from .runner import redraw

    if args.dir.is_dir():  # figures and reports are rewritten there: checked before any work
        probe_write(args.dir, f"lab report {args.dir}: cannot write there")
    try:
        print(*redraw(args.dir), sep="\n")
    except ValueError as err:
        raise CliError(str(err)) from None
    return 0


def _cmd_replicate(args: argparse.Namespace) -> int:
    from .replicate import parse_seeds, replicate

    datasets = [d.strip() for d in args.data.split(",") if d.strip()]
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        raise CliError(str(err)) from None
    if not datasets:
        raise CliError(f"expected --data like digits,mnist1d, got {args.data!r}")
    _check_data("batchnorm lab replicate", datasets, seeds[0], args.mode)
    ids = _resolve_ids(args.only.split(",") if args.only else ["all"])
    check_output_dir(args.out, "--out")
    from .experiment import SEED_PLANS
    from .progress import for_stderr

    # quick times are measured under the seed plan, which trains at least its first look's seeds
    per_seed = len(seeds) / SEED_PLANS["quick"].looks[0]
    runs = [(d, i) for d in datasets for i in ids]  # the order replicate runs them in
    labels = [f"[{k + 1}/{len(runs)}] {d} {i}" for k, (d, i) in enumerate(runs)]
    progress_for = for_stderr(labels, [quick_seconds()[i] * per_seed for _, i in runs], trusted=args.mode == "quick")
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
