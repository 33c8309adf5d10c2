"""Run the benchmarks in turn: ``python -m benchmarks`` (or one: ``python -m benchmarks.NAME``); see ``ALONE``."""

from __future__ import annotations

import pkgutil
import runpy
import sys
from pathlib import Path

ALONE = {
    "integration_matrix": "one subprocess per (point, layer): hours on 2 cores",
    "under_load": "starts busy processes on every core",
    "bn_cuda": "needs a CUDA device",
}
"""Benchmarks not run by ``python -m benchmarks`` (run each on its own), and why."""


def main() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))
    for name in names:
        if name in ALONE:
            print(f"\n=== benchmarks.{name}: not run here ({ALONE[name]}); python -m benchmarks.{name}", flush=True)
            continue
        print(f"\n=== benchmarks.{name}", flush=True)
        sys.argv = [f"benchmarks.{name}"]
        runpy.run_module(f"benchmarks.{name}", run_name="__main__")


if __name__ == "__main__":
    main()
