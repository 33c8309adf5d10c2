"""``batchnorm build-ext``: compile the C++ eager step (`batchnorm._kernels.step_ext`)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ._util import CliError


def _build_ext(args: argparse.Namespace) -> int:
    from .._kernels import step_ext

    if args.status:
        print(step_ext.status())
        return 0
    print("batchnorm: compiling the C++ eager step (about half a minute)...", file=sys.stderr, flush=True)
    quiet = logging.getLogger("torch.utils.cpp_extension")  # its compiler warnings repeat what fails below
    level = quiet.level
    if not args.verbose:
        quiet.setLevel(logging.ERROR)
    try:
        path = step_ext.build(verbose=args.verbose)
    except (RuntimeError, OSError, ImportError) as err:  # no compiler, no ninja, a failed build
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if first.startswith("Error building extension"):
            first = "the compiler failed; --verbose shows its output"
        raise CliError(
            f"could not compile the C++ eager step ({first}); layers work the same without it, "
            "a little slower on small tensors (needs a C++ compiler and `pip install ninja`)"
        ) from err
    finally:
        quiet.setLevel(level)
    print(f"built {path}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``build-ext`` to the ``batchnorm`` command line."""
    p = subparsers.add_parser(
        "build-ext",
        help="compile the C++ eager step that makes small layer calls as cheap as torch's",
        description="Compile the C++ form of the eager batch-norm step into the cache directory "
        "($BATCHNORM_EXT_DIR, default ~/.cache/batchnorm/ext); every later process loads it. "
        "Without it the layers run the same step in Python.",
    )
    p.add_argument("--status", action="store_true", help="only say whether the compiled step is in use, and why not")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(func=_build_ext)
