"""Progress of experiments: a tqdm bar per task on a terminal, else one line per task (logs), or nothing.

Experiments open one task per training arm (or block of seeds trained together):

    with progress.task("BN", total=steps) as tick:
        train(..., tick=tick)
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

from .training import Tick

__all__ = ["LineProgress", "Progress", "TqdmProgress", "duration", "for_stderr"]


class Progress:
    """Shows nothing: ``task(desc, total)`` yields a ``Tick`` that the training loop advances."""

    @contextlib.contextmanager
    def task(self, desc: str, total: int) -> Iterator[Tick]:
        """A progress task of ``total`` steps."""
        yield Tick()


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class _LineTick(Tick):
    """Counts a task's steps; every ``every_s`` seconds notes a line with its rate."""

    def __init__(self, owner: LineProgress, desc: str, total: int) -> None:
        self.owner, self.desc, self.total, self.steps = owner, desc, total, 0
        self.began = self.last = owner.clock()

    def update(self, n: int = 1) -> None:
        self.steps += n
        now = self.owner.clock()
        if now - self.last >= self.owner.every_s:
            self.last, spent = now, now - self.began
            left = duration(spent / max(self.steps, 1) * max(self.total - self.steps, 0))
            self.owner.note(f"{self.desc}: step {self.steps}/{self.total} after {duration(spent)}, ~{left} left")


class LineProgress(Progress):
    """The progress lines of a command running items (experiments) in order, labelled ``labels``
    (``"[3/13] lr-sweep"``), expected to take ``expected`` seconds: ``start(k)`` begins item ``k``
    and returns this display, which says so; then a line per finished task and one every ``every_s``
    seconds inside a long one, each flushed to ``stream`` (default: stderr) with the time spent and
    left of the item and, if ``overall``, of the whole command.

    Time left: the expected seconds of the items after the running one plus the running one's
    rest (0 once it overruns), times ``scale()``. Items before ``k`` never started are skipped
    (resumed from saved results). Before any item has finished it is unknown (None) unless the
    expected times are ``trusted`` (measured for this mode).
    """

    def __init__(
        self,
        labels: Sequence[str],
        expected: Sequence[float],
        *,
        trusted: bool = True,
        overall: bool = True,
        stream: TextIO | None = None,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.labels, self.expected = list(labels), [max(float(e), 1e-9) for e in expected]
        self.trusted, self.overall, self.stream, self.every_s, self.clock = trusted, overall, stream, every_s, clock
        self.began = self.started = clock()
        self.real: dict[int, float] = {}  # finished item -> its seconds
        self.current: int | None = None
        self.expected_s: float | None = None  # the running item's expected seconds, fixed as it starts

    def start(self, k: int) -> LineProgress:
        """Item ``k`` begins now (``0 <= k < len(expected)``): the running one has finished."""
        if not 0 <= k < len(self.expected):
            raise ValueError(f"LineProgress.start: expected an item in 0..{len(self.expected) - 1}, got {k}")
        if self.current is not None:
            self.real[self.current] = self.clock() - self.started
        self.current, self.started = k, self.clock()
        scale = self.scale()
        self.expected_s = None if scale is None else self.expected[k] * scale
        self.note("started")
        return self

    def scale(self) -> float | None:
        """``sum(real) / sum(expected)`` over the finished items (1, or None when not ``trusted``,
        before any finished), counting the running item too once it has overrun that scale (a
        busy machine shows at once)."""
        real, expected = sum(self.real.values()), sum(self.expected[j] for j in self.real)
        scale = real / expected if self.real else (1.0 if self.trusted else None)
        if scale is not None and self.current is not None:
            running = self.clock() - self.started
            if running > self.expected[self.current] * scale:
                scale = (real + running) / (expected + self.expected[self.current])
        return scale

    def left(self) -> float | None:
        """Expected seconds left of everything (None while unknown)."""
        scale = self.scale()
        if scale is None or self.current is None:
            return None if scale is None else sum(self.expected) * scale
        running_left = max(0.0, self.expected[self.current] * scale - (self.clock() - self.started))
        return sum(self.expected[self.current + 1 :]) * scale + running_left

    def note(self, text: str) -> None:
        """Write ``label text | item's times; all's times`` as one flushed line."""
        spent = self.clock() - self.started
        times = f"experiment {duration(spent)}"
        if self.expected_s is not None:
            left = self.expected_s - spent
            times += f", ~{duration(left)} left" if left > 0 else f", past its estimate of {duration(self.expected_s)}"
        if self.overall:
            left_all = self.left()
            rest = "time left known after the first experiment" if left_all is None else f"~{duration(left_all)} left"
            times += f"; all {duration(self.clock() - self.began)}, {rest}"
        head = f"{self.labels[self.current or 0]} {text}".strip()
        print(head, "|", times, file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def task(self, desc: str, total: int) -> Iterator[Tick]:
        tick = _LineTick(self, desc, total)
        yield tick
        self.note(f"{desc}: {tick.steps} steps in {duration(self.clock() - tick.began)}")


class TqdmProgress(Progress):
    """A tqdm bar per task on stderr, each labelled ``prefix desc``."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    @contextlib.contextmanager
    def task(self, desc: str, total: int) -> Iterator[Tick]:
        from tqdm import tqdm

        label = f"{self.prefix} {desc}".strip()
        with tqdm(total=total, desc=label, unit="step", leave=False, file=sys.stderr, mininterval=0.2) as bar:
            yield bar  # its update(n) is Tick's


def for_stderr(
    labels: Sequence[str], expected: Sequence[float], *, trusted: bool, overall: bool = True
) -> Callable[[int], Progress]:
    """Item ``k``'s progress display, made as it begins (``LineProgress``'s arguments): tqdm bars
    when stderr is a terminal; otherwise ``LineProgress`` lines (logs, CI, nohup)."""
    if sys.stderr.isatty():
        return lambda k: TqdmProgress(labels[k])
    return LineProgress(labels, expected, trusted=trusted, overall=overall).start
