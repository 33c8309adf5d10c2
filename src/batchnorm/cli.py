"""The ``batchnorm`` command line (thin: parses arguments, calls the library).

    batchnorm lab list | lab run ID... [--quick] [--seed N] [--data SPEC] [--out DIR] | lab report DIR
    batchnorm inspect MODEL | fold MODEL -o OUT | recalibrate MODEL --data SPEC -o OUT

Each sub-command lives in its own module, which exposes ``register(subparsers)`` and sets
``func(args) -> int`` on its parser. User errors exit with status 2 and one clear line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ._cli_util import CliError

# modules that each add sub-commands; imported when the parser is built, so they must be cheap
_COMMAND_MODULES = ("batchnorm.lab._cli", "batchnorm._tools_cli")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="batchnorm", description="Exact, fast and understandable batch normalization."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
                continue  # that sub-command's package is not installed
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``batchnorm`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as err:
        print(f"batchnorm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batchnorm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
