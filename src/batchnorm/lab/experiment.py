"""What every experiment shares: the seeds it runs, the per-seed loop (``Experiment``), and one
way to build a claim judged over seeds (``claim``).

An experiment subclasses ``Experiment`` (the contract: ``registry``; an example: docs/lab.md,
"Writing an experiment") with a frozen ``Settings`` dataclass (a ``claims_spec.Declared``: its
constant choices and claim thresholds are data in ``<name>.settings.toml``). ``Experiment.run``
loads each seed's data (the split is part of what a seed varies), calls ``run_seeds`` (by
default ``run_seed`` per seed) and stores ``metrics = {"seeds": [...], "per_seed": [m_0, ...]}``;
``column`` and ``per_seed_values`` read one number per seed back for a claim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from .config import RunConfig
from .datasets import Dataset, load
from .progress import Progress
from .results import to_jsonable
from .verdict import Part, SeedPlan, Verdict, _level, could_settle, judge_sequential, part

__all__ = [
    "SEED_PLANS",
    "Experiment",
    "PerSeed",
    "claim",
    "column",
    "first_reaching",
    "load_for",
    "per_seed_values",
    "plan_for",
    "plan_of",
    "recorded",
    "seeds_for",
    "unmeasured",
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


def recorded(settings: Any) -> dict[str, Any]:
    """The settings as results record them (their ``"config"``): ``settings.record()`` for a
    ``claims_spec.Declared``, else every field of the dataclass."""
    return settings.record() if hasattr(settings, "record") else dataclasses.asdict(settings)


def per_seed_values(results: dict[str, Any], read: Callable[[dict[str, Any]], float]) -> list[float]:
    """``[read(metrics of seed i) for each seed]`` from saved results."""
    return [float(read(m)) for m in results["metrics"]["per_seed"]]


def column(rows: Sequence[Any], *keys: str) -> list[float]:
    """One number per seed: ``[float(row[keys[0]][keys[1]]...) for row in rows]`` (``rows``:
    one mapping per seed, e.g. ``results["metrics"]["per_seed"]`` or quantities derived from it)."""
    return [float(functools.reduce(lambda value, key: value[key], keys, row)) for row in rows]


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


def _direction(p: Part) -> str:
    """``"a - b >= 0"``-style statement of a part's claimed side."""
    quantity = "a / b" if (p.b is not None and p.effect == "ratio") else ("a - b" if p.b is not None else "value")
    if p.above is not None and p.below is not None:
        return f"{p.above:g} <= {quantity} <= {p.below:g}"
    if p.above is not None:
        return f"{quantity} >= {p.above:g}"
    return f"{quantity} <= {p.below:g}"


def _margin(p: Part, v: Verdict) -> float:
    """How far the estimate lies from the nearest threshold, in the effect's units: positive
    on the claimed side (inside the band), negative on the other."""
    sides = [v.estimate - t for t in (p.above,) if t is not None] + [
        t - v.estimate for t in (p.below,) if t is not None
    ]
    return float(min(sides))


def _why(name: str, parts: Sequence[Part], verdicts: Sequence[Verdict], plan: SeedPlan) -> tuple[str, Part, Verdict]:
    """Why the claim got its verdict, in words, and the part that decides it (the first part
    that does not hold; for an undecided claim the first undecided part that more seeds could
    not settle, else the first undecided part; the first part when all hold)."""
    k = next((i for i, v in enumerate(verdicts) if v.verdict == name), 0)
    if name == "inconclusive":
        k = next(
            (i for i, v in enumerate(verdicts) if v.verdict == name and not could_settle(parts[i], v, plan.cap)), k
        )
    p, v = parts[k], verdicts[k]
    n = len(v.seeds)
    which = f"part {k + 1} ({_direction(p)})" if len(parts) > 1 else _direction(p)
    if v.zero_spread:
        where = {"holds": "on the claimed side", "does not hold": "on the other side"}.get(name, "at the threshold")
        return f"{which}: the same value, {v.estimate:.4g}, on all {n} seeds (zero spread), {where}", p, v
    lo, hi = v.interval
    interval = f"the {_level(v.confidence)} interval [{lo:.4g}, {hi:.4g}] over {n} seeds"
    if name == "holds":
        every = "every part holds; " if len(parts) > 1 else ""
        return f"{every}{which}: {interval} lies on the claimed side", p, v
    if name == "does not hold":
        return f"{which}: {interval} lies entirely on the other side of the threshold", p, v
    margin = _margin(p, v)
    half = (hi - lo) / 2
    at_cap = f"no more seeds: at this spread even the plan's cap of {plan.cap} seeds would leave the threshold inside the interval"
    at_cap = "the seed plan's cap" if n >= plan.cap else at_cap
    side = "on the claimed side" if margin >= 0 else "on the other side"
    return (
        f"{which}: {interval} ({at_cap}) contains a threshold; the estimate {v.estimate:.4g} is {abs(margin):.3g} "
        f"{side} of it, {abs(margin) / half if half > 0 else math.inf:.2f} of the interval's half-width",
        p,
        v,
    )


def plan_of(results: dict[str, Any]) -> SeedPlan:
    """The seed plan saved in ``results`` (``metrics["plan"]``), else a fixed design over all the
    run's seeds."""
    saved = results["metrics"].get("plan") or {"looks": [len(results["metrics"]["seeds"])]}
    futility = saved.get("futility_from")
    looks = tuple(int(n) for n in saved["looks"])
    return SeedPlan(looks, float(saved.get("alpha", 0.05)), None if futility is None else int(futility))


def claim(
    statement: str,
    *,
    results: dict[str, Any],
    a: Sequence[float],
    b: Sequence[float] | None = None,
    above: float | None = None,
    below: float | None = None,
    effect: Literal["difference", "ratio"] = "difference",
    expected: str,
    source: str,
    evidence: str,
    also: Sequence[Part] = (),
    kind: Literal["replication", "identity"] = "replication",
) -> dict[str, Any]:
    """One claim, judged over the run's seeds by the saved seed plan (``verdict.judge_sequential``;
    see ``verdict`` for the rule and its error control).

    Args:
        statement: the claim in words, with its direction and threshold.
        results: the saved results (its ``metrics["seeds"]`` are the seeds of ``a``, ``b``, in
            order; ``metrics["plan"]`` the seed plan, else one look over all seeds).
        a, b, above, below, effect: the claim's first part (``verdict.part``; paired arms).
        expected: the effect size the paper reports (e.g. "BN 3x fewer steps").
        source: where that number comes from (the paper's table or figure).
        evidence: what this run measured, in words.
        also: further parts of the same claim that must hold too (``verdict.part``), judged at
            the same looks; the verdict is ``combine`` of all parts, the estimate and interval
            are the first part's.
        kind: ``"replication"`` (a measured effect that could come out either way) or
            ``"identity"`` (a consequence of the math, checked numerically); counted apart.

    Returns:
        ``{"claim", "holds", "verdict", "estimate", "interval", "seeds", "method", "confidence",
        "zero_spread", "direction", "expected", "source", "evidence", "kind", "rule", "n_seeds",
        "threshold", "margin", "why", "parts"}``: ``holds`` is True only for ``holds``;
        ``seeds``/``n_seeds`` the seeds of the deciding look; ``threshold`` the first part's
        (a number, or ``[above, below]`` for a band); ``margin`` the deciding part's estimate
        minus its nearest threshold (positive on the claimed side); ``why`` the verdict in
        words; ``parts`` every part's verdict and direction; ``could_settle`` whether an
        inconclusive claim's parts could still be decided by the plan's cap (``verdict.could_settle``).
    """
    if kind not in ("replication", "identity"):
        raise ValueError(f"claim: expected kind 'replication' or 'identity', got {kind!r}")
    seeds = [int(s) for s in results["metrics"]["seeds"]]
    plan = plan_of(results)
    parts = [part(a, b, above=above, below=below, effect=effect), *also]
    name, verdicts = judge_sequential(parts, seeds, plan)
    why, deciding, deciding_v = _why(name, parts, verdicts, plan)
    main = verdicts[0]
    thresholds = [float(t) for t in (above, below) if t is not None]
    return {
        **main.to_json(),
        "claim": statement,
        "holds": name == "holds",
        "verdict": name,
        "direction": _direction(parts[0]),
        "expected": expected,
        "source": source,
        "evidence": evidence,
        "kind": kind,
        "rule": plan.describe(),
        "n_seeds": len(main.seeds),
        "threshold": thresholds if len(thresholds) > 1 else thresholds[0],
        "margin": _margin(deciding, deciding_v),
        "why": why,
        "parts": [{**v.to_json(), "direction": _direction(p)} for p, v in zip(parts, verdicts)],
        "could_settle": name == "inconclusive"
        and all(could_settle(p, v, plan.cap) for p, v in zip(parts, verdicts) if v.verdict == "inconclusive"),
    }


def unmeasured(make: Any, name: str, evidence: str) -> dict[str, Any]:
    """Claim ``name`` of a ``claims_spec.Claims`` with nothing to judge (the run could not
    measure it): ``inconclusive`` with no estimate or interval, and no more seeds asked for."""
    spec, seeds = make.specs[name], [int(s) for s in make.results["metrics"]["seeds"]]
    return {
        **{key: spec[key] for key in ("expected", "source")},
        "claim": spec["statement"].format(**make.values),
        "holds": False,
        "verdict": "inconclusive",
        "estimate": math.nan,
        "interval": [math.nan, math.nan],
        "seeds": seeds,
        "method": "not measured",
        "evidence": evidence,
        "kind": spec.get("kind", "replication"),
        "could_settle": False,
    }


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
        """The frozen ``Settings`` dataclass for this run's mode and data."""
        raise NotImplementedError

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
        """The claims, judged only from saved results, each built with ``claim``."""
        raise NotImplementedError

    def figures(self, results: dict[str, Any], outdir: Path) -> list[Path]:
        """Figures drawn only from saved results."""
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
                "config": recorded(s),
                "data": self.describe_data(s, first),
                "metrics": {"seeds": list(seeds[:n]), "per_seed": per_seed, "plan": plan.to_json()},
            }
            judged = [(c["verdict"], bool(c["could_settle"])) for c in self.claims(to_jsonable(out))]
            if not plan.needs_more(n, judged):
                break
        return out
