"""Progress reporting for experiments: a terminal bar (tqdm) or nothing.

Experiments receive a ``Progress`` and open one task per training arm:

    with progress.task("BN", total=steps) as tick:
        train(..., tick=tick)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from .training import Tick

__all__ = ["NullProgress", "Progress", "TqdmProgress"]


class Progress:
    """Base class: ``task(desc, total)`` yields a ``Tick``; this one shows nothing."""

    prefix: str = ""

    @contextlib.contextmanager
    def task(self, desc: str, total: int) -> Iterator[Tick]:
        """A progress task of ``total`` steps."""
        yield Tick()


NullProgress = Progress


class _TqdmTick(Tick):
    def __init__(self, bar: object) -> None:
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)  # type: ignore[attr-defined]


class TqdmProgress(Progress):
    """A tqdm bar per task on stderr (hidden when stderr is not a terminal, unless ``force``)."""

    def __init__(self, prefix: str = "", force: bool = False) -> None:
        self.prefix = prefix
        self.force = force

    @contextlib.contextmanager
    def task(self, desc: str, total: int) -> Iterator[Tick]:
        from tqdm import tqdm

        label = f"{self.prefix} {desc}".strip()
        disable = False if self.force else not sys.stderr.isatty()
        bar = tqdm(total=total, desc=label, unit="step", leave=False, file=sys.stderr, disable=disable, mininterval=0.2)
        try:
            yield _TqdmTick(bar)
        finally:
            bar.close()
