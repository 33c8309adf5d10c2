"""What every experiment shares: the seeds it runs and the loop over them (``Experiment``; the
contract: docs/lab.md, "Writing an experiment"), and readers of one number per seed for a claim
(``column``) from ``metrics = {"seeds": [...], "per_seed": [m_0, ...]}``.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from .config import RunConfig
from .datasets import Dataset, load
from .figures import NamedFigures
from .progress import Progress
from .results import to_jsonable
from .verdict import SeedPlan

__all__ = [
    "SEED_PLANS",
    "Experiment",
    "PerSeed",
    "capped_log10",
    "column",
    "first_reaching",
    "load_for",
    "plan_for",
    "seeds_for",
]

PerSeed = list[dict[str, Any]]  # every seed's JSON-ready metrics, in seed order

SEED_PLANS: dict[str, SeedPlan] = {
    "tiny": SeedPlan((2,)),
    "quick": SeedPlan((4, 8, 16, 32), futility_from=16),
    "full": SeedPlan((5, 10, 20), futility_from=10),
}
"""Each mode's seed plan (``verdict.SeedPlan``), fixed before any run (tiny: a smoke test); the
levels and the stop rule in numbers: ``docs/lab.md``, "Claims judged over seeds"."""


def plan_for(cfg: RunConfig) -> SeedPlan:
    """The run's seed plan: one look over ``cfg.seeds`` when given, else the mode's plan."""
    return SEED_PLANS[cfg.mode] if cfg.seeds is None else SeedPlan((len(cfg.seeds),))


def seeds_for(cfg: RunConfig) -> tuple[int, ...]:
    """Every seed a run may train, in order: ``cfg.seeds`` when given, else the plan's cap of
    consecutive seeds from ``cfg.seed``."""
    return tuple(range(cfg.seed, cfg.seed + plan_for(cfg).cap)) if cfg.seeds is None else cfg.seeds


def load_for(cfg: RunConfig, seed: int) -> Dataset:
    """Seed ``seed``'s split of the run's data set (the small version in tiny mode)."""
    return load(cfg.data, seed, small=cfg.mode == "tiny")


def column(rows: Sequence[Any], *keys: str) -> list[float]:
    """One number per seed: ``[float(row[keys[0]][keys[1]]...) for row in rows]`` (``rows``:
    one mapping per seed, e.g. ``results["metrics"]["per_seed"]`` or quantities derived from it)."""
    return [float(functools.reduce(lambda value, key: value[key], keys, row)) for row in rows]


def capped_log10(v: float, floor: float, cap: float) -> float:
    """log10 of ``v`` clipped to [``floor``, ``cap``]; NaN counts as ``cap`` (an overflowed run's
    per-seed value stays finite for the verdict)."""
    return math.log10(cap if math.isnan(v) else min(max(v, floor), cap))


def first_reaching(steps: Sequence[int], values: Sequence[float], level: float) -> float:
    """The first checkpoint step (> 0) whose value is >= ``level``; a run that never reaches it
    counts as reaching it one checkpoint interval after its last checkpoint (a lower bound on
    its true step, so a speed-up measured against it is conservative)."""
    if not steps or len(steps) != len(values):
        raise ValueError(f"first_reaching: expected as many values as steps (>= 1), got {len(values)} and {len(steps)}")
    for step, v in zip(steps, values):
        if step > 0 and v >= level:
            return float(step)
    return float(steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1))


class Experiment:
    """Base class of the lab's experiments; a module exposes one instance as ``EXPERIMENT`` (the
    registry's contract), its prose in ``<module>.md`` beside it."""

    DESCRIPTION: ClassVar[str]
    """One line for ``lab list`` and results.json."""
    USES_DATA: ClassVar[bool] = True
    """False for an experiment on its own synthetic data that ignores ``--data``."""

    @property
    def ID(self) -> str:
        """The CLI name: the module's name with "-" for "_" (``ioffe2015_fig1`` -> ``ioffe2015-fig1``)."""
        return type(self).__module__.rsplit(".", 1)[-1].replace("_", "-")

    def settings(self, cfg: RunConfig) -> Any:
        """The frozen ``Settings`` dataclass for this run's mode and data (default: the module's
        ``Settings.of(cfg.mode)``)."""
        return sys.modules[type(self).__module__].Settings.of(cfg.mode)

    def run_seed(self, settings: Any, data: Dataset, seed: int, progress: Progress) -> dict[str, Any]:
        """Train and measure every arm on one seed (same initial weights and minibatch order
        across arms); returns the seed's JSON-ready metrics."""
        raise NotImplementedError

    def prepare(self, cfg: RunConfig, settings: Any, progress: Progress) -> Any:
        """The settings the seeds run with (default: ``settings(cfg)`` unchanged; an experiment
        that calibrates a setting on the calibration seed overrides this)."""
        return settings

    def load_seed(self, cfg: RunConfig, settings: Any, seed: int) -> Any:
        """Seed ``seed``'s data (default: ``load_for``; an experiment on its own synthetic data
        returns that)."""
        return load_for(cfg, seed)

    def describe_data(self, settings: Any, first: Any) -> dict[str, Any]:
        """What results.json records about the data (``first``: the first seed's)."""
        return {**first.describe(), "split": "each seed draws its own train/test split"}

    def run_seeds(
        self, settings: Any, data: Sequence[Any], seeds: Sequence[int], progress: Progress
    ) -> list[dict[str, Any]]:
        """Every seed's metrics (``data[k]``: seed ``seeds[k]``'s); by default ``run_seed`` per
        seed (experiments that train their seeds together override it)."""
        return [self.run_seed(settings, d, seed, progress) for d, seed in zip(data, seeds)]

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """The claims, judged only from saved results, each built with ``claims_spec.claim``."""
        raise NotImplementedError

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Figures drawn only from saved results: yields ``(file name, figure)`` pairs, which the
        report saves in order (``figures.save_all``)."""
        raise NotImplementedError

    def run(self, cfg: RunConfig, progress: Progress) -> dict[str, Any]:
        """``prepare``, then the seed plan's blocks of seeds (``plan_for``, ``seeds_for``) through
        ``load_seed`` and ``run_seeds``, the claims judged after each block while
        ``SeedPlan.needs_more``. Returns ``{"config", "data", "metrics": {"seeds", "per_seed", "plan"}}``."""
        s = self.settings(cfg)
        plan, seeds = plan_for(cfg), seeds_for(cfg)
        calibration = getattr(s, "calibration_seed", None)
        if calibration in seeds:
            raise ValueError(
                f"{self.ID}: seed {calibration} is the calibration seed; expected claim seeds other than it, got {list(seeds)}"
            )
        s = self.prepare(cfg, s, progress)
        per_seed: list[dict[str, Any]] = []
        first: Any = None
        out: dict[str, Any] = {}
        for n in plan.looks:
            block = seeds[len(per_seed) : n]
            data = [self.load_seed(cfg, s, seed) for seed in block]
            first = data[0] if not per_seed else first
            per_seed += self.run_seeds(s, data, block, progress)
            out = {
                "config": s.record(),
                "data": self.describe_data(s, first),
                "metrics": {"seeds": list(seeds[:n]), "per_seed": per_seed, "plan": plan.to_json()},
            }
            judged = [(c["verdict"], bool(c["could_settle"])) for c in self.claims(to_jsonable(out))]
            if not plan.needs_more(n, judged):
                break
        return out
