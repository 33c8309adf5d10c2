"""The typed configuration every experiment receives (``RunConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

Mode = Literal["tiny", "quick", "full"]
MODES: tuple[str, ...] = get_args(Mode)


def _is_seed(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class RunConfig:
    """What the user chose for one experiment run (the experiment records its own choices).

    Experiments scale their work by ``mode`` and give every random choice a generator seeded
    from the run's seeds, so the same config reproduces the same numbers.
    """

    mode: Mode = "full"
    """``"full"``: the faithful version (paper-sized step counts; minutes to hours on CPU).
    ``"quick"``: the same experiment scaled so that it runs in under a minute on 2 cores and
    still shows every claim. ``"tiny"``: a smoke test for the test suite (seconds; claims are
    judged but not expected to hold)."""

    seed: int = 0
    """The base seed: the first of the seeds a run judges its claims on (each seed fixes its data
    split, initialization and minibatch order)."""

    data: str = "digits"
    """Dataset spec for ``batchnorm.lab.datasets.load``: ``digits``, ``mnist1d`` or
    ``mnist:DIR``. Experiments that need a particular kind of data may ignore it (they say
    so in their results)."""

    out: Path = field(default_factory=lambda: Path("runs"))
    """Output root; the experiment's files go to ``out/<experiment id>/``."""

    seeds: tuple[int, ...] | None = None
    """The seeds every claim is judged over (distinct, non-negative), in one look at 95%.
    ``None``: the mode's seed plan (``experiment.SEED_PLANS``), consecutive seeds from ``seed``
    added in blocks until the claims are settled."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RunConfig: expected mode in {MODES}, got {self.mode!r}")
        if not _is_seed(self.seed):
            raise ValueError(f"RunConfig: expected seed to be a non-negative int, got {self.seed!r}")
        if self.seeds is not None:
            seeds = tuple(self.seeds)
            if not seeds or not all(_is_seed(v) for v in seeds) or len(set(seeds)) != len(seeds):
                raise ValueError(f"RunConfig: expected seeds to be distinct non-negative ints, got {self.seeds!r}")
            object.__setattr__(self, "seeds", seeds)
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"RunConfig: expected data to be a non-empty str, got {self.data!r}")
        object.__setattr__(self, "out", Path(self.out))
