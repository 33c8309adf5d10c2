"""Claims and settings declared as data in TOML files beside an experiment's module (their layout:
``docs/lab.md``, "Figures and reports"), and ``claim``, one claim of saved results judged over seeds.

``Claims`` judges the claims a claims file declares on the columns and values the module computes. A
``Settings`` dataclass (a ``Declared``) declares only the settings the code computes or a mode sets,
and reads the file's others as attributes:

    s = Settings.of(cfg.mode, steps=500)  # computed, then the file's [mode] table, then its values
    s.record()  # results' "config": the computed fields, then every setting of the file, in order
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.resources
import math
import string
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from typing_extensions import dataclass_transform

from .verdict import Part, SeedPlan, Verdict, VerdictName, _level, _margin, could_settle, judge_sequential

if TYPE_CHECKING:
    from importlib.abc import Traversable  # importlib.resources.abc from Python 3.11 on
if sys.version_info >= (3, 11):
    import tomllib
else:  # the lab extra's backport on Python 3.10
    import tomli as tomllib

__all__ = ["Claims", "Col", "Declared", "claim", "listed", "load", "load_settings", "parse", "unmeasured"]

Col = Sequence[float]  # one number per seed
_REQUIRED = {"statement", "expected", "source"}
_PART = {"a", "b", "above", "below", "effect"}  # a part: its columns' names, its threshold(s), its effect
_KEYS = _REQUIRED | _PART | {"kind", "evidence", "also"}


def parse(text: str, where: str) -> dict[str, dict[str, Any]]:
    """Each claim's table by name, in file order; ``ValueError`` naming ``where`` for a file with
    no table, a table or part (``also``) with a missing or unknown key, a column's name or the
    evidence not text, or a threshold neither number nor name."""
    data = tomllib.loads(text)  # invalid TOML: tomllib.TOMLDecodeError, a ValueError
    if not data or not all(isinstance(spec, dict) for spec in data.values()):
        raise ValueError(f"{where}: expected one [name] table per claim, got {list(data)}")
    for name, spec in data.items():
        if missing := sorted(_REQUIRED - spec.keys()):
            raise ValueError(f"{where}: [{name}] lacks {', '.join(missing)}")
        if unknown := sorted(spec.keys() - _KEYS):
            raise ValueError(f"{where}: [{name}] has unknown key(s) {', '.join(unknown)}; expected {sorted(_KEYS)}")
        also = spec.get("also", [])
        if not isinstance(also, list) or not all(isinstance(p, dict) for p in also):
            raise ValueError(f"{where}: [{name}] expected also an array of tables, one per further part")
        for k, p in enumerate(also, 1):
            if p.keys() - _PART or "a" not in p or not p.keys() & {"above", "below"}:
                expected = f"a, a threshold and keys of {sorted(_PART)}"
                raise ValueError(f"{where}: [{name}] also's part {k} expected {expected}, got {sorted(p)}")
        for table in (spec, *also):
            if any(type(table.get(k, "")) is not str for k in ("a", "b", "evidence")):
                raise ValueError(f"{where}: [{name}] expected a and b a column's name, evidence a template")
            if any(type(table.get(k, "")) not in (str, int, float) for k in ("above", "below")):
                raise ValueError(f"{where}: [{name}] expected each threshold a number or a setting's name")
    return data


def beside(module: str, suffix: str) -> Traversable:
    """The package data file ``<name><suffix>`` beside module ``module`` (``bias.claims.toml``, ``bias.md``)."""
    package, name = module.rsplit(".", 1)
    return importlib.resources.files(package).joinpath(name + suffix)


@functools.cache
def load(module: str) -> dict[str, dict[str, Any]]:
    """The claims file beside experiment module ``module`` (e.g. ``batchnorm.lab.experiments.bias``), read once."""
    resource = beside(module, ".claims.toml")
    return parse(resource.read_text(encoding="utf-8"), resource.name)


_TABLES = ("text", "tiny", "quick", "full")  # a settings file's tables: fixed text, each mode's values


def _parse_settings(text: str, where: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A settings file's values by name and its tables (``_TABLES``) by name, each in file order with
    arrays as tuples; ``ValueError`` naming ``where`` for another table or a ``[text]`` entry not a string."""
    data = tomllib.loads(text)
    tables = {name: value for name, value in data.items() if isinstance(value, dict) and (value or name in _TABLES)}
    if unknown := [name for name in tables if name not in _TABLES]:
        raise ValueError(
            f"{where}: expected settings as key = value lines and tables {_TABLES}, got table(s) {unknown}"
        )
    if not all(isinstance(v, str) for v in tables.get("text", {}).values()):
        raise ValueError(f"{where}: expected every entry of [text] a string")

    def values(table: dict[str, Any]) -> dict[str, Any]:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in table.items() if k not in tables}

    return values(data), {name: values(table) for name, table in tables.items()}


@functools.cache
def _settings(module: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The settings file beside experiment module ``module``, parsed once (never handed out: callers get copies)."""
    resource = beside(module, ".settings.toml")
    return _parse_settings(resource.read_text(encoding="utf-8"), resource.name)


def load_settings(module: str) -> dict[str, Any]:
    """The settings file's values by name, in file order (arrays as tuples)."""
    return copy.deepcopy(_settings(module)[0])


_D = TypeVar("_D", bound="Declared")


@dataclass_transform(frozen_default=True)
class Declared:
    """Base of an experiment's ``Settings``, made a frozen dataclass by subclassing (the module
    docstring): its fields are only what the code computes or a mode sets; every other setting of
    its file is read as an attribute (``s.lr``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True)(cls)

    def __getattr__(self, name: str) -> Any:
        """A setting of the file that is not a field, as ``load_settings`` gives it (arrays as
        tuples), a copy: the file's values stay as read."""
        settings = _settings(type(self).__module__)[0]  # read in place: no table rebuilt per attribute
        if name not in settings:
            raise AttributeError(f"{type(self).__module__}.Settings has no setting {name!r}")
        return copy.deepcopy(settings[name])

    @classmethod
    def of(cls: type[_D], mode: str | None = None, /, **computed: Any) -> _D:
        """The settings from ``computed`` (and settings this run overrides), else the file's
        ``[mode]`` table, else its values."""
        by_mode = _settings(cls.__module__)[1].get(mode, {}) if mode else {}
        fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        if unknown := sorted((by_mode.keys() | computed.keys()) - set(fields)):
            raise ValueError(f"{cls.__module__}.Settings: no field(s) {unknown}")
        given = {**_settings(cls.__module__)[0], **by_mode, **computed}
        if missing := [name for name in fields if name not in given]:
            raise ValueError(f"{cls.__module__}.Settings: no value for {missing} (mode {mode!r})")
        return cls(**{name: copy.deepcopy(given[name]) for name in fields})

    @classmethod
    def text(cls, name: str, **values: Any) -> str:
        """The settings file's ``[text]`` entry ``name`` formatted with ``values``."""
        return str(_settings(cls.__module__)[1]["text"][name]).format(**values)

    def record(self) -> dict[str, Any]:
        """Results' ``config``: the fields the file lacks, then the file's settings in its order (a
        field's value replacing the file's)."""
        declared = _settings(type(self).__module__)[0]
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        first = {name: value for name, value in values.items() if name not in declared}
        return copy.deepcopy({**first, **{name: values.get(name, value) for name, value in declared.items()}})


def _why(name: VerdictName, parts: Sequence[Part], verdicts: Sequence[Verdict], k: int, margin: float, cap: int) -> str:
    """Why the claim got verdict ``name``, in words, from its deciding part ``k`` (``margin``: its ``_margin``)."""
    p, v = parts[k], verdicts[k]
    n = len(v.seeds)
    which = f"part {k + 1} ({p.direction})" if len(parts) > 1 else p.direction
    if v.zero_spread:
        where = {"holds": "on the claimed side", "does not hold": "on the other side"}.get(name, "at the threshold")
        return f"{which}: the same value, {v.estimate:.4g}, on all {n} seeds (zero spread), {where}"
    lo, hi = v.interval
    interval = f"the {_level(v.confidence)} interval [{lo:.4g}, {hi:.4g}] over {n} seeds"
    if name == "holds":
        every = "every part holds; " if len(parts) > 1 else ""
        return f"{every}{which}: {interval} lies on the claimed side"
    if name == "does not hold":
        return f"{which}: {interval} lies entirely on the other side of the threshold"
    half = (hi - lo) / 2
    at_cap = f"no more seeds: at this spread even the plan's cap of {cap} seeds would leave the threshold inside the interval"
    at_cap = "the seed plan's cap" if n >= cap else at_cap
    side = "on the claimed side" if margin >= 0 else "on the other side"
    return (
        f"{which}: {interval} ({at_cap}) contains a threshold; the estimate {v.estimate:.4g} is {abs(margin):.3g} "
        f"{side} of it, {abs(margin) / half if half > 0 else math.inf:.2f} of the interval's half-width"
    )


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
    """One claim of saved ``results`` judged over ``metrics["seeds"]`` by ``metrics["plan"]`` (else
    one look at every seed) with ``judge_sequential``: ``a`` to ``effect`` give the first ``Part``,
    ``also`` further parts that must hold too; ``kind="identity"``: a consequence of the math.

    Returns the first part's ``Verdict.to_json()`` at the deciding look with the claim's fields
    (``docs/lab.md``, "Claims judged over seeds"). The deciding part (its ``margin`` and ``why``) is
    the first that does not hold; for an undecided claim the first undecided part more seeds could
    not settle, else the first undecided; the first when all hold."""
    if kind not in ("replication", "identity"):
        raise ValueError(f"claim: expected kind 'replication' or 'identity', got {kind!r}")
    seeds = [int(s) for s in results["metrics"]["seeds"]]
    plan = SeedPlan(**(results["metrics"].get("plan") or {"looks": [len(seeds)]}))
    parts = [Part(a, b, above=above, below=below, effect=effect), *also]
    name, verdicts = judge_sequential(parts, seeds, plan)
    judged = [{**v.to_json(), "direction": p.direction} for p, v in zip(parts, verdicts)]
    settles = {i: could_settle(parts[i], v, plan.cap) for i, v in enumerate(verdicts) if v.verdict == "inconclusive"}
    k = next((i for i, v in enumerate(verdicts) if v.verdict == name), 0)
    if name == "inconclusive":
        k = next((i for i, settle in settles.items() if not settle), k)
    thresholds = [float(t) for t in (above, below) if t is not None]
    margin = _margin(parts[k], verdicts[k].estimate)
    return {
        **judged[0],
        "claim": statement,
        "holds": name == "holds",
        "verdict": name,
        "expected": expected,
        "source": source,
        "evidence": evidence,
        "kind": kind,
        "rule": plan.describe(),
        "n_seeds": len(verdicts[0].seeds),
        "threshold": thresholds if len(thresholds) > 1 else thresholds[0],
        "margin": margin,
        "why": _why(name, parts, verdicts, k, margin, plan.cap),
        "parts": judged,
        "could_settle": name == "inconclusive" and all(settles.values()),
    }


def listed(values: Iterable[float], fmt: str = "{:.1f}", sep: str = ", ") -> str:
    """Per-seed numbers as ``"a, b, c"`` (each ``fmt.format(float(v))``, joined by ``sep``), the
    form every claim's evidence uses so a reader sees the spread over seeds."""
    return sep.join(fmt.format(float(v)) for v in values)


class _Evidence(string.Formatter):
    """``str.format``, but a list formatted with a spec lists its items: ``{steps:g}`` -> "120, 95, 110"."""

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, (list, tuple)) and format_spec:
            return listed(value, "{:" + format_spec + "}")
        return super().format_field(value, format_spec)


class Claims:
    """The claims of saved ``results`` as their file declares them, filled with ``results["config"]``,
    ``seed0`` (the first seed), ``n_seeds`` (how many seeds ``results`` hold) and ``values``
    (derived in Python: per-seed columns, e.g. ``steps_bn=[...]``, and numbers, e.g.
    ``tol_pp=100 * tol``). A part's ``a``/``b`` name columns of those; a threshold is a number, a
    name of those, or ``-name``; the statement and the evidence are templates of those (the
    evidence's lists formatted with a spec list their items)."""

    def __init__(self, module: str, results: dict[str, Any], **values: Any) -> None:
        self.specs = load(module)
        self.results = results
        seeds = results["metrics"]["seeds"]
        self.values: dict[str, Any] = {**results["config"], "seed0": seeds[0], "n_seeds": len(seeds), **values}

    def _threshold(self, value: float | str | None) -> float | None:
        """A table's ``above``/``below`` as a number (None when absent)."""
        if not isinstance(value, str):
            return None if value is None else float(value)
        return -float(self.values[value[1:]]) if value.startswith("-") else float(self.values[value])

    def _part(self, table: dict[str, Any]) -> dict[str, Any]:
        """The arguments of the ``Part`` a table (a claim's, or one of its ``also``) declares, its
        columns looked up by name."""
        a, b = (self.values[v] if isinstance(v, str) else v for v in (table["a"], table.get("b")))
        above, below = (self._threshold(table.get(k)) for k in ("above", "below"))
        return {"a": a, "b": b, "above": above, "below": below, "effect": table.get("effect", "difference")}

    def __call__(
        self, name: str, *, a: Col | None = None, b: Col | None = None, evidence: str = "", also: Sequence[Part] = ()
    ) -> dict[str, Any]:
        """Claim ``name`` (``claim``) as its table declares it; ``a`` (with ``b``), ``evidence`` and
        ``also`` given here replace the table's."""
        spec = self.specs[name]
        fixed = {key: spec[key] for key in ("expected", "source", "kind") if key in spec}
        return claim(
            spec["statement"].format(**self.values),
            results=self.results,
            **self._part({**spec, "a": a, "b": b} if a is not None else spec),
            evidence=evidence or _Evidence().format(spec["evidence"], **self.values),
            also=also or [Part(**self._part(table)) for table in spec.get("also", [])],
            **fixed,
        )

    def all(self, **made: dict[str, Any]) -> list[dict[str, Any]]:
        """Every claim of the file, in its order: as its table declares it, or as ``made`` gives it by name."""
        return [made[name] if name in made else self(name) for name in self.specs]


def unmeasured(make: Claims, name: str, evidence: str) -> dict[str, Any]:
    """Claim ``name`` of ``make`` the run could not measure: ``inconclusive``, no estimate, no more seeds."""
    spec = make.specs[name]
    return {
        **{key: spec[key] for key in ("expected", "source")},
        "claim": spec["statement"].format(**make.values),
        "holds": False,
        "verdict": "inconclusive",
        "estimate": math.nan,
        "interval": [math.nan, math.nan],
        "seeds": [int(s) for s in make.results["metrics"]["seeds"]],
        "method": "not measured",
        "evidence": evidence,
        "kind": spec.get("kind", "replication"),
        "could_settle": False,
    }
