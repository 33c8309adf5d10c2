"""``batchnorm lab ...`` sub-commands (thin: parse, then call the runner).

    batchnorm lab list
    batchnorm lab run ID... | all  [--quick] [--seed N] [--data digits|mnist1d|mnist:DIR] [--out DIR]
    batchnorm lab report DIR
    batchnorm lab replicate --data digits,mnist1d --seeds 0-4 [--quick] [--out DIR]

Imported whenever the ``batchnorm`` parser is built, so it imports nothing heavy at the top.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .._cli_util import CliError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lab`` with its ``list``, ``run`` and ``report`` sub-commands."""
    lab = subparsers.add_parser("lab", help="reproduce experiments from the batch-norm literature")
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    p_list = sub.add_parser("list", help="list experiments with a quick-mode time estimate")
    p_list.set_defaults(func=_cmd_list)

    p_run = sub.add_parser("run", help="run experiments (ids from `lab list`, or `all`)")
    p_run.add_argument("ids", nargs="+", metavar="ID", help="experiment ids, or `all`")
    mode = p_run.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help="scaled-down run (about a minute each)")
    mode.add_argument("--tiny", action="store_const", const="tiny", dest="mode", help=argparse.SUPPRESS)
    p_run.set_defaults(mode="full")
    p_run.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    p_run.add_argument("--data", default="digits", help="digits (default) | mnist1d | mnist:DIR")
    p_run.add_argument("--out", type=Path, default=Path("runs"), help="output directory (default runs/)")
    p_run.set_defaults(func=_cmd_run)

    p_rep = sub.add_parser("replicate", help="every experiment on several data sets and seeds: the replication matrix")
    p_rep.add_argument("--data", default="digits,mnist1d", help="comma-separated data sets (default digits,mnist1d)")
    p_rep.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 or 0,3,7 (default 0-4)")
    rep_mode = p_rep.add_mutually_exclusive_group()
    rep_mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help="scaled-down runs")
    rep_mode.add_argument("--tiny", action="store_const", const="tiny", dest="mode", help=argparse.SUPPRESS)
    p_rep.set_defaults(mode="full")
    p_rep.add_argument("--only", default=None, help=argparse.SUPPRESS)
    p_rep.add_argument("--out", type=Path, default=Path("runs/replication"), help="output directory (default runs/replication)")
    p_rep.set_defaults(func=_cmd_replicate)

    p_report = sub.add_parser("report", help="redraw figures and reports from saved results.json")
    p_report.add_argument("dir", type=Path, metavar="DIR", help="an output directory or one experiment's directory")
    p_report.set_defaults(func=_cmd_report)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _cmd_list(args: argparse.Namespace) -> int:
    from . import registry

    for experiment_id in registry.ids():
        module = registry.get(experiment_id)
        print(f"{experiment_id:<26} ~{module.QUICK_SECONDS:>4.0f} s quick   {module.DESCRIPTION}")
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
    seen: list[str] = []
    for i in requested:
        if i not in seen:
            seen.append(i)
    return seen


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import RunConfig
    from .datasets import load, parse_spec
    from .progress import TqdmProgress
    from .runner import experiment_dir, run_many

    ids = _resolve_ids(args.ids)
    try:
        parse_spec(args.data)
        # load once up front: a bad data path fails here with one line, before any training
        load(args.data, args.seed, small=args.mode == "tiny")
    except ValueError as err:
        raise CliError(str(err)) from None
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {str(args.out)!r} exists and is not a directory")
    cfg = RunConfig(mode=args.mode, seed=args.seed, data=args.data, out=args.out)

    def progress_for(experiment_id: str, i: int, n: int) -> TqdmProgress:
        return TqdmProgress(prefix=f"[{i + 1}/{n}] {experiment_id}")

    start = time.perf_counter()
    all_results = run_many(ids, cfg, progress_for, index=args.ids == ["all"] or None)
    for results in all_results:
        claims = results.get("claims", [])
        held = sum(1 for c in claims if c.get("holds"))
        print(
            f"{results['id']}: {held}/{len(claims)} claims hold, {results['wall_time_s']:.1f} s -> "
            f"{experiment_dir(cfg.out, results['id']) / 'report.html'}"
        )
        for c in claims:
            if not c.get("holds"):
                print(f"  {c.get('verdict', 'does not hold')}: {c.get('claim')} ({c.get('evidence')})")
    if len(all_results) > 1 or args.ids == ["all"]:
        print(f"index: {cfg.out / 'index.html'} ({time.perf_counter() - start:.1f} s in all)")
    sys.stdout.flush()
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .runner import redraw

    try:
        written = redraw(args.dir)
    except ValueError as err:
        raise CliError(str(err)) from None
    for path in written:
        print(path)
    return 0


def _cmd_replicate(args: argparse.Namespace) -> int:
    from .datasets import load, parse_spec
    from .replicate import parse_seeds, replicate

    try:
        seeds = parse_seeds(args.seeds)
        datasets = [d.strip() for d in args.data.split(",") if d.strip()]
        if not datasets:
            raise ValueError(f"expected --data like digits,mnist1d, got {args.data!r}")
        for d in datasets:
            parse_spec(d)
            load(d, seeds[0], small=args.mode == "tiny")
    except ValueError as err:
        raise CliError(str(err)) from None
    ids = _resolve_ids(args.only.split(",")) if args.only else None
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {str(args.out)!r} exists and is not a directory")
    start = time.perf_counter()
    matrix = replicate(datasets, seeds, args.mode, args.out, ids)
    for row in matrix["rows"]:
        cells = "; ".join(
            f"{d}: {c['holds']} hold / {c['does_not_hold']} not / {c['inconclusive']} inconclusive" for d, c in row["cells"].items()
        )
        print(f"{row['id']}: {cells}")
    print(f"matrix: {args.out / 'index.html'} ({time.perf_counter() - start:.1f} s in all)")
    return 0
