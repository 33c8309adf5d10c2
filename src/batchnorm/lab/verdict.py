"""Per-seed measurements judged into a verdict on a claim: ``holds`` / ``does not hold`` /
``inconclusive``, with the estimate and its interval.

    v = judge(bn_acc, plain_acc, seeds=[0, 1, 2], above=0.0)          # BN > plain (paired)
    v = judge(bn_err, gn_err, seeds=seeds, effect="ratio", above=2.0)  # BN's error > 2x GN's
    v = judge(spread_change, seeds=seeds, above=-0.1, below=0.1)      # value within a band

The effect is the mean over seeds of the value, of ``a_i - b_i``, or of ``log(a_i / b_i)``
(exponentiated), with Student's t interval (n - 1 degrees of freedom); ``judge_sequential`` judges
at a ``SeedPlan``'s looks, each at level ``1 - alpha / K``, and keeps the first decided look. The
rule, its reasons and its error control: ``docs/lab.md``, "Claims judged over seeds".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

__all__ = ["VERDICTS", "Part", "SeedPlan", "Verdict", "combine", "judge", "judge_sequential", "t_quantile"]

VerdictName = Literal["holds", "does not hold", "inconclusive"]
VERDICTS: tuple[str, ...] = get_args(VerdictName)


@dataclass(frozen=True)
class Verdict:
    """A judged claim: ``verdict``, ``estimate`` and ``interval`` (``confidence`` level), ``seeds``, ``method``."""

    verdict: VerdictName
    estimate: float
    interval: tuple[float, float]
    seeds: tuple[int, ...]
    method: str
    confidence: float = 0.95
    zero_spread: bool = False

    def to_json(self) -> dict[str, Any]:
        """The fields results.json stores beside a claim (``holds``: ``inconclusive`` is not a pass)."""
        return {
            "holds": self.verdict == "holds",
            **dataclasses.asdict(self),
            "interval": list(self.interval),
            "seeds": list(self.seeds),
        }


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` > 0 degrees of freedom (0.5 < p < 1)."""
    if not 0.5 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile: expected 0.5 < p < 1 and df > 0, got p={p!r}, df={df!r}")
    from scipy import stats  # the lab's dependency (with scikit-learn); imported when judging

    return float(stats.t.ppf(p, df))


def _as_values(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"judge: expected {name} to hold at least one value, got none")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"judge: expected finite values in {name}, got {arr.tolist()}")
    return arr


def _decide(lo: float, hi: float, above: float | None, below: float | None) -> VerdictName:
    """Holds when the whole interval lies on the claimed side, does not hold when wholly on the other."""
    if (above is None or lo >= above) and (below is None or hi <= below):
        return "holds"
    outside = (above is not None and hi < above) or (below is not None and lo > below)
    return "does not hold" if outside else "inconclusive"


def _level(confidence: float) -> str:
    """``0.95`` -> ``"95%"``, ``0.98333`` -> ``"98.3%"``."""
    return f"{100 * confidence:.3g}%" if 100 * confidence < 99.95 else f"{100 * confidence:.4g}%"


def judge(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray | None = None,
    *,
    seeds: Sequence[int],
    above: float | None = None,
    below: float | None = None,
    effect: Literal["difference", "ratio"] = "difference",
    confidence: float = 0.95,
) -> Verdict:
    """Judge "effect >= ``above``" and/or "effect <= ``below``" (a band) over ``seeds`` at the
    two-sided ``confidence`` level. ``a``, shape ``(n,)``: the first arm (or the value, ``b=None``)
    per seed; ``b[i]`` shares ``seeds[i]``'s initial weights and minibatch order with ``a[i]``.
    ``effect="ratio"`` judges ``a / b`` (arms > 0, ratio thresholds). A bound on a threshold counts
    as on the claimed side."""
    p = Part(a, b, above=above, below=below, effect=effect)
    if len(p.a) != len(seeds):
        raise ValueError(f"judge: expected one value of a per seed ({len(seeds)}), got {len(p.a)}")
    return p.judge(seeds, confidence)


def combine(verdicts: Sequence[Verdict]) -> VerdictName:
    """The verdict of parts that must all hold: ``does not hold`` if one does not, else ``inconclusive`` if one is."""
    if not verdicts:
        raise ValueError("combine: expected at least one verdict, got none")
    names = {v.verdict for v in verdicts}
    return next((name for name in ("does not hold", "inconclusive") if name in names), "holds")


@dataclass(frozen=True)
class Part:
    """One part of a claim: ``judge``'s arguments but the seeds (``a``, ``b`` kept as tuples of floats)."""

    a: Sequence[float] | np.ndarray
    b: Sequence[float] | np.ndarray | None = None
    _: dataclasses.KW_ONLY
    above: float | None = None
    below: float | None = None
    effect: Literal["difference", "ratio"] = "difference"

    def __post_init__(self) -> None:
        if self.above is None and self.below is None:
            raise ValueError("judge: expected a threshold: above=..., below=... or both, got neither")
        for name, t in (("above", self.above), ("below", self.below)):
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
                raise TypeError(f"judge: expected {name} to be a finite number, got {t!r}")
            if self.ratio and t is not None and t <= 0:
                raise ValueError(f"judge: a ratio threshold must be > 0, got {name}={t}")
        if self.above is not None and self.below is not None and self.above > self.below:
            raise ValueError(f"judge: expected a band with above <= below, got above={self.above}, below={self.below}")
        if self.effect not in ("difference", "ratio"):
            raise ValueError(f"judge: expected effect 'difference' or 'ratio', got {self.effect!r}")
        for name, arm in (("a", self.a), ("b", self.b)):
            if isinstance(arm, (str, bytes)) or not (arm is None or hasattr(arm, "__len__")):
                raise TypeError(f"judge: expected {name} to be a sequence of numbers, got {type(arm).__name__}")
            if arm is not None:
                object.__setattr__(self, name, tuple(np.asarray(arm, dtype=np.float64).reshape(-1).tolist()))
        if self.b is not None and len(self.a) != len(self.b):
            raise ValueError(f"judge: paired arms need one value each per seed, got {len(self.a)} and {len(self.b)}")

    @property
    def ratio(self) -> bool:
        """Whether the effect is the paired ratio ``a / b``."""
        return self.b is not None and self.effect == "ratio"

    @property
    def estimate(self) -> float:
        """``judge``'s estimate over all seeds, for evidence text."""
        return self.judge(range(len(self.a))).estimate

    @property
    def direction(self) -> str:
        """The claimed side in words: ``"a - b >= 0"``, ``"a / b >= 2"``, ``"-0.1 <= value <= 0.1"``."""
        quantity = "a / b" if self.ratio else ("a - b" if self.b is not None else "value")
        if self.above is not None and self.below is not None:
            return f"{self.above:g} <= {quantity} <= {self.below:g}"
        return f"{quantity} >= {self.above:g}" if self.above is not None else f"{quantity} <= {self.below:g}"

    def judge(self, seeds: Sequence[int], confidence: float = 0.95) -> Verdict:
        """The verdict on the first ``len(seeds)`` seeds' values (``judge``)."""
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"judge: expected 0 < confidence < 1, got {confidence!r}")
        if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds):
            raise TypeError(f"judge: expected seeds to be ints, got {list(seeds)!r}")
        seeds_t = tuple(int(s) for s in seeds)
        if len(set(seeds_t)) != len(seeds_t):
            raise ValueError(f"judge: expected distinct seeds, got {list(seeds_t)}")
        n = len(seeds_t)
        x = _as_values("a", self.a[:n])
        if x.size != n:
            raise ValueError(f"judge: expected one value of a per seed ({n}), got {x.size}")
        what = "mean"
        if self.b is not None:
            xb = _as_values("b", self.b[:n])
            if self.ratio and (np.any(x <= 0) or np.any(xb <= 0)):
                raise ValueError(f"judge: a ratio needs positive arms, got a={x.tolist()}, b={xb.tolist()}")
            x = np.log(x) - np.log(xb) if self.ratio else x - xb
            what = "geometric mean of paired ratios" if self.ratio else "mean of paired differences"
        what = f"{what} over {n} seeds"
        est = float(np.mean(x))
        half = t_quantile(0.5 + confidence / 2, n - 1) * float(np.std(x, ddof=1)) / math.sqrt(n) if n >= 2 else math.inf
        lo, hi = est - half, est + half
        method = f"{what}, {_level(confidence)} t interval" + (" on the log scale" if self.ratio else "")
        if self.ratio:
            est, lo, hi = math.exp(est), math.exp(lo), math.exp(hi)
        # the same value on every seed up to float64 rounding (a range of at most 1e-9 of the magnitude:
        # an identity of the math, or a value a grid fixes): no interval, the value is compared itself
        zero = n >= 2 and float(np.ptp(x)) <= 1e-9 * float(np.max(np.abs(x)))
        if zero:
            method = f"{what}: the same value on every seed (zero spread), no interval"
            lo = hi = est
        return Verdict(_decide(lo, hi, self.above, self.below), est, (lo, hi), seeds_t, method, confidence, zero)


def _count(n: object) -> bool:
    """Whether ``n`` is a positive int seed count (not a bool)."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


@dataclass(frozen=True)
class SeedPlan:
    """The seed counts a claim is judged at (``looks``, e.g. ``(4, 8, 16, 32)``), fixed in advance;
    ``futility_from``: the fewest seeds to stop at with a claim the cap could not settle (``None``: the first look)."""

    looks: tuple[int, ...]
    alpha: float = 0.05
    futility_from: int | None = None

    def __post_init__(self) -> None:
        looks = tuple(self.looks)
        if not looks or not all(map(_count, looks)) or any(b <= a for a, b in zip(looks, looks[1:])):
            raise ValueError(f"SeedPlan: expected increasing positive int seed counts, got {self.looks!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"SeedPlan: expected 0 < alpha < 1, got {self.alpha!r}")
        if self.futility_from is not None and not _count(self.futility_from):
            raise ValueError(
                f"SeedPlan: expected futility_from a positive int seed count or None, got {self.futility_from!r}"
            )
        object.__setattr__(self, "looks", looks)

    @property
    def min_futility(self) -> int:
        """``futility_from``, else the first look."""
        return self.futility_from or self.looks[0]

    @property
    def confidence(self) -> float:
        """Each look's interval level, ``1 - alpha / K``."""
        return 1.0 - self.alpha / len(self.looks)

    @property
    def cap(self) -> int:
        """The most seeds a claim is judged on."""
        return self.looks[-1]

    def needs_more(self, n: int, claims: Sequence[tuple[VerdictName, bool]]) -> bool:
        """Whether a run with ``claims`` (verdict, ``could_settle``) on its first ``n`` seeds trains the next
        block: below the cap, a claim inconclusive and, from ``min_futility`` seeds on, one that could settle."""
        undecided = [settle for verdict, settle in claims if verdict == "inconclusive"]
        return n < self.cap and bool(undecided) and (n < self.min_futility or any(undecided))

    def describe(self) -> str:
        """The rule in words."""
        level = _level(self.confidence)
        if len(self.looks) == 1:
            return f"{level} t interval over {self.cap} seeds (fixed)"
        late = self.min_futility > self.looks[0]
        futility = f"; no stop for an undecided claim before {self.min_futility} seeds" if late else ""
        return (
            f"judged on the first {', '.join(map(str, self.looks))} seeds, stopping at the first decided look; "
            f"{level} t intervals ({1 - self.alpha:.0%} over all {len(self.looks)} looks, Bonferroni){futility}"
        )

    def to_json(self) -> dict[str, Any]:
        """The plan as results' ``metrics["plan"]`` (``futility_from`` only where set);
        ``SeedPlan(**saved)`` reads it back."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None} | {"looks": list(self.looks)}


def judge_sequential(parts: Sequence[Part], seeds: Sequence[int], plan: SeedPlan) -> tuple[VerdictName, list[Verdict]]:
    """The ``combine``d verdict of ``parts`` at the first decided look of ``plan`` (else the last
    look up to ``len(seeds)``), with the parts' verdicts at that look."""
    looks = [n for n in plan.looks if n <= len(seeds)]
    if not looks:
        raise ValueError(
            f"judge_sequential: expected at least {plan.looks[0]} seeds for {plan.describe()}, got {len(seeds)}"
        )
    for n in looks:
        verdicts = [p.judge(seeds[:n], plan.confidence) for p in parts]
        name = combine(verdicts)
        if name != "inconclusive":
            break
    return name, verdicts


def _margin(p: Part, estimate: float, f: Callable[[float], float] = float) -> float:
    """``estimate``'s distance (through ``f``) to ``p``'s nearest threshold, positive on the claimed side."""
    sides = [f(estimate) - f(p.above)] if p.above is not None else []
    return min(sides + ([f(p.below) - f(estimate)] if p.below is not None else []))


def could_settle(p: Part, v: Verdict, cap: int) -> bool:
    """Whether part ``p``, ``inconclusive`` as ``v``, could be decided by ``cap`` seeds: its interval's
    half-width projected to ``cap`` seeds (same spread and level) is below its ``_margin`` (log scale
    for a ratio). Only stops adding seeds; it never enters a verdict."""
    n = len(v.seeds)
    lo, hi = v.interval
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return n < cap
    f = math.log if p.ratio else float
    p_level = 0.5 + v.confidence / 2
    spread = (f(hi) - f(lo)) / 2 * math.sqrt(n) / t_quantile(p_level, n - 1)
    return cap > n and t_quantile(p_level, cap - 1) * spread / math.sqrt(cap) < abs(_margin(p, v.estimate, f))
