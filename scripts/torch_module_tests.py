"""Run PyTorch's module test runner (``test/test_modules.py``) on our BatchNorm1d/2d/3d.

    .venv/bin/python scripts/torch_module_tests.py PATH/TO/pytorch/test/test_modules.py [--torch] [-v]

PyTorch's repository is not part of this project: give the path of a ``test_modules.py`` that
matches the installed torch (it imports ``torch.testing._internal``, which also needs the
``expecttest`` package: ``.venv/bin/pip install expecttest``).

What it does, on CPU only:

1. keeps, in ``torch.testing._internal.common_modules.module_db``, only the entries of
   ``torch.nn.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm`` where the installed torch lists it;
   the Lazy variants are left out);
2. sets each entry's ``module_cls`` to ours (``batchnorm.BatchNorm1d/2d/3d``; SyncBatchNorm to
   ``batchnorm.SyncBatchNorm``), unless ``--torch`` is given (torch's own classes: the baseline);
   the functions that make the entries' inputs still see torch's class, so every test gets the
   inputs PyTorch gives its own layer (they choose input shapes by comparing the class);
3. imports the test file (its ``@modules(module_db)`` tests are generated for these entries
   only) and runs every generated CPU test with ``unittest``.

It prints one line per test (``passed``, ``FAILED``, ``ERROR``, ``skipped``, ``xfail``) and the
counts; with ``-v`` the traceback of each failure. The exit status is 1 when a test failed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any

_OURS = {"BatchNorm1d": "BatchNorm1d", "BatchNorm2d": "BatchNorm2d", "BatchNorm3d": "BatchNorm3d"}
_SYNC = "SyncBatchNorm"


def _torch_view_inputs(func: Callable[..., Any], torch_info: Any) -> Callable[..., Any]:
    """``func`` (an inputs function of a ModuleInfo) called with the entry as PyTorch wrote it."""

    def inputs(module_info: Any, *args: Any, **kwargs: Any) -> Any:
        return func(torch_info, *args, **kwargs)

    return inputs


def substitute(use_torch: bool) -> list[str]:
    """Restrict ``module_db`` to torch's BatchNorm entries and put our classes in them.

    Returns the names (``nn.BatchNorm1d`` ...) of the entries kept. Must run before the test
    file is imported (its decorators read ``module_db`` at import).
    """
    import torch
    from torch.testing._internal import common_modules

    import batchnorm

    wanted = {getattr(torch.nn, name): name for name in (*_OURS, _SYNC) if hasattr(torch.nn, name)}
    kept = []
    names = []
    for info in common_modules.module_db:
        name = wanted.get(info.module_cls)
        if name is None or info.is_lazy:
            continue
        names.append(info.name)
        if not use_torch:
            torch_info = copy.copy(info)
            info.module_inputs_func = _torch_view_inputs(info.module_inputs_func, torch_info)
            if info.module_error_inputs_func is not None:
                info.module_error_inputs_func = _torch_view_inputs(info.module_error_inputs_func, torch_info)
            info.module_cls = getattr(batchnorm, _OURS.get(name, name))
        kept.append(info)
    common_modules.module_db[:] = kept
    return names


def _accelerator_type_value() -> None:
    """Newer test files read ``common_utils.ACCELERATOR_TYPE.value``; give older torch's lazy
    value that attribute (the accelerator's type, or None) so either version imports."""
    from torch.testing._internal import common_utils

    lazy = common_utils.ACCELERATOR_TYPE
    if not hasattr(lazy, "value"):
        import torch

        acc = torch.accelerator.current_accelerator(check_available=True)
        type(lazy).value = property(lambda self: acc.type if acc is not None else None)


def load_tests(path: Path) -> unittest.TestSuite:
    """Import the test file as a module and collect its generated CPU test cases."""
    _accelerator_type_value()
    spec = importlib.util.spec_from_file_location("torch_test_modules", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cases = [obj for name, obj in vars(module).items() if name.endswith("CPU") and isinstance(obj, type)]
    if not cases:
        raise ValueError(f"{path} generated no CPU test class (is it PyTorch's test/test_modules.py?)")
    loader = unittest.TestLoader()
    return unittest.TestSuite(loader.loadTestsFromTestCase(case) for case in cases)


class _Outcomes(unittest.TestResult):
    """A TestResult that keeps one outcome per test id, in the order run."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: dict[str, str] = {}
        self.details: dict[str, str] = {}

    def addSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802 (unittest's name)
        self.outcomes[test.id()] = "passed"

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:  # noqa: N802
        super().addFailure(test, err)
        self.outcomes[test.id()] = "FAILED"
        self.details[test.id()] = self.failures[-1][1]

    def addError(self, test: unittest.TestCase, err: Any) -> None:  # noqa: N802
        super().addError(test, err)
        self.outcomes[test.id()] = "ERROR"
        self.details[test.id()] = self.errors[-1][1]

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:  # noqa: N802
        self.outcomes[test.id()] = "skipped"

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:  # noqa: N802
        self.outcomes[test.id()] = "xfail"

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
        self.outcomes[test.id()] = "FAILED"
        self.details[test.id()] = "unexpected success of a test marked as an expected failure\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("test_file", type=Path, help="PyTorch's test/test_modules.py (matching the installed torch)")
    parser.add_argument("--torch", action="store_true", help="run torch's own classes (the baseline)")
    parser.add_argument("-k", dest="pattern", default="", help="only tests whose name contains this string")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the traceback of each failure")
    args = parser.parse_args(argv)
    if not args.test_file.is_file():
        parser.error(f"expected the path of PyTorch's test/test_modules.py, got {args.test_file} (not a file)")
    os.environ["PYTORCH_TESTING_DEVICE_ONLY_FOR"] = "cpu"

    names = substitute(args.torch)
    suite = load_tests(args.test_file)
    tests = [t for t in _flatten(suite) if args.pattern in t.id()]
    result = _Outcomes()
    for test in tests:
        test(result)

    for test_id, outcome in result.outcomes.items():
        print(f"{outcome:8s} {test_id.rsplit('.', 1)[-1]}")
        if args.verbose and test_id in result.details:
            print("    " + result.details[test_id].rstrip().replace("\n", "\n    "))
    counts: dict[str, int] = {}
    for outcome in result.outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    classes = "torch's classes" if args.torch else "batchnorm's classes"
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"\n{len(result.outcomes)} tests of {', '.join(names)} with {classes}: {summary}")
    return 1 if counts.get("FAILED", 0) + counts.get("ERROR", 0) else 0


def _flatten(suite: unittest.TestSuite) -> list[unittest.TestCase]:
    out: list[unittest.TestCase] = []
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


if __name__ == "__main__":
    sys.exit(main())
