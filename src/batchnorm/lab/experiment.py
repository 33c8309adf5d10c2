"""What every experiment shares: the seeds it runs, the per-seed loop, and one way to build a
claim judged over seeds.

An experiment is a subclass of ``Experiment`` with a frozen ``Settings`` dataclass (every
choice and every claim threshold a named field whose docstring gives its source) and three
methods that do the experiment's own work:

    class Fig1(Experiment):
        ID = "ioffe2015-fig1"; DESCRIPTION = ...; QUICK_SECONDS = ...  # prose: ioffe2015_fig1.md
        def settings(self, cfg) -> Fig1Settings: ...           # from mode and data, by rule
        def run_seed(self, s, data, seed, progress) -> dict: ...  # one seed, all arms paired
        def claims(self, results) -> list[dict]: ...           # built with claim(...)

    EXPERIMENT = Fig1()
    run, claims, figures = EXPERIMENT.run, EXPERIMENT.claims, EXPERIMENT.figures

``Experiment.run`` loads the data for each seed (the split is part of what a seed varies),
calls ``run_seeds`` (by default ``run_seed`` per seed) and stores ``metrics = {"seeds": [...], "per_seed": [m_0, m_1, ...]}``;
``per_seed_values`` reads one number per seed back for a claim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from .config import RunConfig
from .datasets import Dataset, load
from .progress import Progress
from .verdict import Verdict, combine, judge

__all__ = ["Experiment", "SEEDS_PER_MODE", "claim", "load_for", "per_seed_values", "seeds_for"]

SEEDS_PER_MODE: dict[str, int] = {"tiny": 2, "quick": 3, "full": 5}
"""Seeds per claim: tiny 2 (a smoke test: the interval exists but is wide), quick 3, full 5."""


def seeds_for(cfg: RunConfig) -> tuple[int, ...]:
    """The seeds of a run: ``cfg.seeds`` when given, else ``SEEDS_PER_MODE[cfg.mode]``
    consecutive seeds from ``cfg.seed``."""
    if cfg.seeds is not None:
        return tuple(cfg.seeds)
    return tuple(range(cfg.seed, cfg.seed + SEEDS_PER_MODE[cfg.mode]))


def load_for(cfg: RunConfig, seed: int) -> Dataset:
    """Seed ``seed``'s split of the run's data set (the small version in tiny mode)."""
    return load(cfg.data, seed, small=cfg.mode == "tiny")


def per_seed_values(results: dict[str, Any], read: Callable[[dict[str, Any]], float]) -> list[float]:
    """``[read(metrics of seed i) for each seed]`` from saved results."""
    return [float(read(m)) for m in results["metrics"]["per_seed"]]


def claim(
    statement: str,
    *,
    results: dict[str, Any],
    a: Sequence[float],
    b: Sequence[float] | None = None,
    above: float | None = None,
    below: float | None = None,
    effect: Literal["difference", "ratio"] = "difference",
    paired: bool = True,
    expected: str,
    source: str,
    evidence: str,
    also: Sequence[Verdict] = (),
) -> dict[str, Any]:
    """One claim, judged over the run's seeds by ``verdict.judge`` (see there for the rule).

    Args:
        statement: the claim in words, with its direction and threshold.
        results: the saved results (its ``metrics["seeds"]`` are the seeds of ``a``, ``b``).
        a, b, above, below, effect, paired: passed to ``judge``.
        expected: the effect size the paper reports (e.g. "BN 3x fewer steps").
        source: where that number comes from (the paper's table or figure).
        evidence: what this run measured, in words.
        also: further parts of the same claim that must hold too (``judge`` results); the
            verdict is ``combine`` of all parts, the estimate and interval are the first part's.

    Returns:
        ``{"claim", "holds", "verdict", "estimate", "interval", "seeds", "method", "direction",
        "expected", "source", "evidence"}`` (``holds`` is True only for ``holds``).
    """
    seeds = [int(s) for s in results["metrics"]["seeds"]]
    main = judge(a, b, seeds=seeds, above=above, below=below, effect=effect, paired=paired)
    name = combine([main, *also]) if also else main.verdict
    quantity = "a / b" if (b is not None and effect == "ratio") else ("a - b" if b is not None else "value")
    if above is not None and below is not None:
        direction = f"{above:g} <= {quantity} <= {below:g}"
    elif above is not None:
        direction = f"{quantity} >= {above:g}"
    else:
        direction = f"{quantity} <= {below:g}"
    return {
        **main.to_json(),
        "claim": statement,
        "holds": name == "holds",
        "verdict": name,
        "direction": direction,
        "expected": expected,
        "source": source,
        "evidence": evidence,
    }


class Experiment:
    """Base class of the lab's experiments; a module exposes one instance's bound methods as
    its ``run``, ``claims`` and ``figures`` (the registry's contract)."""

    ID: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    QUICK_SECONDS: ClassVar[float]

    def settings(self, cfg: RunConfig) -> Any:
        """The frozen ``Settings`` dataclass for this run's mode and data."""
        raise NotImplementedError

    def run_seed(self, settings: Any, data: Dataset, seed: int, progress: Progress) -> dict[str, Any]:
        """Train and measure every arm on one seed (same initial weights and minibatch order
        across arms); returns the seed's JSON-ready metrics."""
        raise NotImplementedError

    def run_seeds(
        self, settings: Any, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress
    ) -> list[dict[str, Any]]:
        """Every seed's metrics (``data[k]`` is seed ``seeds[k]``'s split). The default calls
        ``run_seed`` once per seed; experiments that train their seeds together override it."""
        return [self.run_seed(settings, d, seed, progress) for d, seed in zip(data, seeds)]

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """The claims, judged only from saved results, each built with ``claim``."""
        raise NotImplementedError

    def figures(self, results: dict[str, Any], outdir: Path) -> list[Path]:
        """Figures drawn only from saved results."""
        raise NotImplementedError

    def run(self, cfg: RunConfig, progress: Progress) -> dict[str, Any]:
        """Every seed of ``seeds_for(cfg)``: load its data split, ``run_seed``; returns
        ``{"config", "data", "metrics": {"seeds", "per_seed"}}``."""
        s = self.settings(cfg)
        seeds = seeds_for(cfg)
        data = [load_for(cfg, seed) for seed in seeds]
        per_seed = self.run_seeds(s, data, seeds, progress)
        return {
            "config": dataclasses.asdict(s),
            "data": {**data[0].describe(), "split": "each seed draws its own train/test split"},
            "metrics": {"seeds": list(seeds), "per_seed": per_seed},
        }
