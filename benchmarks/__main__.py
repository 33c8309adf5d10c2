"""Run every benchmark in turn: ``python -m benchmarks`` (or one: ``python -m benchmarks.NAME``)."""

from __future__ import annotations

import pkgutil
import runpy
import sys
from pathlib import Path


def main() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))
    for name in names:
        print(f"\n=== benchmarks.{name}", flush=True)
        sys.argv = [f"benchmarks.{name}"]
        runpy.run_module(f"benchmarks.{name}", run_name="__main__")


if __name__ == "__main__":
    main()
