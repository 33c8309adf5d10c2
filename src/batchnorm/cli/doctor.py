"""``batchnorm doctor``: batch-norm mistakes of a saved model, as a table (thin; see ``batchnorm.diagnose``).

    batchnorm doctor MODEL [--data SPEC] [--batch-size N] [--max-samples N] [--ignore CODES] [--trust]

MODEL is loaded as by ``batchnorm inspect`` (a ``torch.save(model)`` file needs ``--trust``; a
``torch.export`` ``.pt2`` program loads safely). Without ``--data`` the model alone is checked;
with it, the model also runs over the data in eval mode and its running statistics are compared
with the population statistics (``stale-statistics``). SPEC is as for ``recalibrate``.
"""

from __future__ import annotations

import argparse
import shutil
import textwrap
from typing import Any

from ._util import CliError

__all__ = ["register", "EXIT_STATUS"]

EXIT_STATUS = """\
exit status:
  0  no finding (findings of --ignore'd codes do not count)
  3  at least one finding: the table is on stdout
  2  user error (bad option, path, model file or data): one line on stderr
  1  internal error (a bug of batchnorm): one line on stderr"""

_WATCH_ONLY = ("small-batch", "train-mode-under-no-grad", "updated-in-backward", "non-finite-batch")
"""Codes only `batchnorm.watch` finds (they need the training code, not a saved model)."""


def _ignored(text: str | None) -> set[str]:
    from ..tools.doctor import CODES

    if not text:
        return set()
    codes = {c.strip() for c in text.split(",") if c.strip()}
    unknown = sorted(codes - set(CODES))
    if unknown:
        raise CliError(f"--ignore: unknown code(s) {', '.join(unknown)}; expected some of {', '.join(CODES)}")
    return codes


def _batches(loaded: Any, spec: str, batch_size: int, max_samples: int | None) -> list[Any]:
    """The inputs of ``--data`` cut into batches (an exported program: its own batch size, the rest dropped)."""
    from .tools import _model_dtype, load_data

    x = load_data(spec).to(_model_dtype(loaded.model))
    if max_samples is not None:
        x = x[:max_samples]
    if loaded.program is not None:
        from ..tools._exported import example_inputs

        batch_size = int(example_inputs(loaded.program)[0][0].shape[0])
        usable = (len(x) // batch_size) * batch_size
        if usable == 0:
            raise CliError(
                f"doctor: the exported program takes batches of {batch_size}, but --data has only {len(x)} samples"
            )
        x = x[:usable]
    return list(x.split(batch_size))


def _doctor(args: argparse.Namespace) -> int:
    from ..tools._dataflow import is_batchnorm
    from ..tools.doctor import diagnose, format_findings
    from .tools import _check_data_spec, _first_line, _load

    ignore = _ignored(args.ignore)
    for option, value in (("--batch-size", args.batch_size), ("--max-samples", args.max_samples)):
        if value is not None and value < 1:
            raise CliError(f"{option}: expected a positive int, got {value}")
    if args.data is not None:
        _check_data_spec(args.data)
    loaded = _load(args.model, args.trust)
    layers = sum(1 for m in loaded.model.modules() if is_batchnorm(m))
    batches = None if args.data is None else _batches(loaded, args.data, args.batch_size, args.max_samples)
    try:
        findings = diagnose(loaded.model, batches)
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:  # AssertionError: export guards
        if batches is None:
            raise
        shape = tuple(batches[0].shape) if batches else ()
        raise CliError(
            f"doctor: the model failed on --data {args.data} (batches of shape {shape}): {_first_line(err)}"
        ) from None
    findings = [f for f in findings if f.code not in ignore]
    if findings:
        print(format_findings(findings, width=max(80, shutil.get_terminal_size((120, 24)).columns)))
        print()
    named = {f.layer for f in findings}
    data = f"; statistics checked on {sum(len(b) for b in batches)} samples of --data" if batches else ""
    print(
        f"{len(findings)} finding(s) in {len(named)} of {layers} batch-norm layer(s){data}"
        if layers
        else "no batch-norm layers found"
    )
    loaded.print_notes()
    return 3 if findings else 0


def register(subparsers: Any) -> None:
    """Add ``doctor`` to the ``batchnorm`` command line."""
    from ..tools.doctor import CODES

    p = subparsers.add_parser(
        "doctor",
        help="find batch-norm mistakes in a saved model (exit status 3 when there are findings)",
        description=textwrap.fill(
            "Check every batch-norm layer of a saved model for the mistakes that silently cost accuracy "
            f"({', '.join(c for c in CODES if c not in _WATCH_ONLY)}) and print one row per finding: "
            "layer, code, message, fix. The codes found while training (" + ", ".join(_WATCH_ONLY) + ") "
            "need batchnorm.watch in Python.",
            78,
        ),
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="torch.save(model) file or torch.export .pt2")
    p.add_argument(
        "--data",
        metavar="SPEC",
        help="digits | digits-images | PATH.npy | PATH.pt (inputs): also compare the running statistics "
        "with the population statistics of this data (stale-statistics)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="batch size of the pass over --data (default 256)")
    p.add_argument("--max-samples", type=int, default=None, help="use only the first N samples of --data")
    p.add_argument("--ignore", metavar="CODES", help="comma-separated codes not to report, e.g. redundant-bias")
    p.add_argument(
        "--trust",
        action="store_true",
        help="allow loading a pickled whole module (torch.load weights_only=False): runs code from the file",
    )
    p.set_defaults(func=_doctor)
