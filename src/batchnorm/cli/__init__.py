"""The ``batchnorm`` command line (thin: parses arguments, calls the library).

    batchnorm lab list | lab run ID... [--quick] [--seed N] [--data SPEC] [--out DIR] | lab report DIR
    batchnorm inspect MODEL | fold MODEL -o OUT | recalibrate MODEL --data SPEC -o OUT
    batchnorm doctor MODEL [--data SPEC]   (exit status 3 when it finds something)
    batchnorm build-ext [--status]          (compile the C++ eager step; optional)

Each sub-command lives in its own module, which exposes ``register(subparsers)`` and sets
``func(args) -> int`` on its parser. User errors exit with status 2 and one clear line on
stderr, never a traceback: bad options (argparse), bad paths and files (checked before any work
starts), a missing optional dependency (the line names the install command). Anything else
(a bug) is one line too, with exit status 1; ``BATCHNORM_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from ._util import CliError, missing_dependency_message

# modules that each add sub-commands; imported when the parser is built, so they must be cheap
_COMMAND_MODULES = ("batchnorm.lab._cli", "batchnorm.cli.tools", "batchnorm.cli.doctor", "batchnorm.cli.ext")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"batchnorm: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available sub-command registered."""
    parser = _Parser(prog="batchnorm", description="Exact, fast and understandable batch normalization.")
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
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is caught below rather than at exit
        return status
    except BrokenPipeError:  # the reader went away (`batchnorm lab list | head`): stop quietly, like shell tools
        _drop_stdout()
        return 128 + 13  # as if killed by SIGPIPE
    except CliError as err:
        return _fail(str(err))
    except ModuleNotFoundError as err:
        message = missing_dependency_message(err)
        if message is None:
            return _internal_error(err)
        return _fail(message)
    except OSError as err:  # a write that the checks up front could not foresee (disk full, ...)
        where = f"{err.filename}: " if err.filename else ""
        return _fail(f"{where}{err.strerror or err}")
    except KeyboardInterrupt:
        print("batchnorm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours: still one line (the traceback on request)
        return _internal_error(err)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _internal_error(err: BaseException) -> int:
    """One line for an unexpected exception, exit status 1; ``BATCHNORM_TRACEBACK=1`` re-raises it."""
    if os.environ.get("BATCHNORM_TRACEBACK"):
        raise err
    message = " ".join(f"{type(err).__name__}: {err}".split())
    print(f"batchnorm: internal error: {message} (run with BATCHNORM_TRACEBACK=1 to see where)", file=sys.stderr)
    return 1


def _fail(message: str) -> int:
    print(f"batchnorm: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
