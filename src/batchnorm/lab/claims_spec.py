"""Claims and settings declared as data, in TOML files beside an experiment's module (package data).

``experiments/<name>.claims.toml`` holds one table per claim, in order, with its fixed fields
(``statement`` template, ``expected``, ``source``, ``effect``, ``kind``, thresholds
``above``/``below``); the module computes a, b and evidence; ``Claims`` joins them.

``experiments/<name>.settings.toml`` holds the experiment's constant settings (the choices it
records, claim thresholds), in the order results record them; in its ``[tiny]``, ``[quick]`` and
``[full]`` tables, the fields each mode sets (``Settings.of(mode)``); in its ``[text]`` table,
the fixed text of settings the code computes (``Settings.text``). Its ``Settings`` dataclass (a
``Declared``) declares only what the code computes or reads:

    @dataclass(frozen=True)
    class Settings(Declared):
        steps: int             # computed (by mode, data): passed to ``of``
        batch_size: int        # read by the code: its value comes from the file

    s = Settings.of(steps=500)   # or Settings.of(cfg.mode): steps from the file's [quick] table
    s.record()   # {"steps": 500, every setting of the file, in its order}: results' "config"
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.resources
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from .experiment import claim
from .verdict import Part

if sys.version_info >= (3, 11):
    import tomllib
else:  # the lab extra's backport on Python 3.10
    import tomli as tomllib

__all__ = ["Claims", "Col", "Declared", "load", "load_settings", "parse"]

Col = Sequence[float]
"""One number per seed."""
_REQUIRED = {"statement", "expected", "source"}
_KEYS = _REQUIRED | {"effect", "kind", "above", "below"}


def parse(text: str, where: str) -> dict[str, dict[str, Any]]:
    """Each claim's table by name, in file order; ``ValueError`` naming ``where`` for a file with
    no table, a table with a missing or unknown key, or a threshold neither number nor name."""
    data = tomllib.loads(text)  # invalid TOML: tomllib.TOMLDecodeError, a ValueError
    if not data or not all(isinstance(spec, dict) for spec in data.values()):
        raise ValueError(f"{where}: expected one [name] table per claim, got {list(data)}")
    for name, spec in data.items():
        if missing := sorted(_REQUIRED - spec.keys()):
            raise ValueError(f"{where}: [{name}] lacks {', '.join(missing)}")
        if unknown := sorted(spec.keys() - _KEYS):
            raise ValueError(f"{where}: [{name}] has unknown key(s) {', '.join(unknown)}; expected {sorted(_KEYS)}")
        if any(type(spec.get(k, "")) not in (str, int, float) for k in ("above", "below")):
            raise ValueError(f"{where}: [{name}] expected each threshold a number or a setting's name")
    return data


def _beside(module: str, kind: str) -> tuple[str, str]:
    """The text and file name of ``<name>.<kind>.toml`` beside module ``module``."""
    package, name = module.rsplit(".", 1)
    resource = importlib.resources.files(package).joinpath(f"{name}.{kind}.toml")
    return resource.read_text(encoding="utf-8"), f"{name}.{kind}.toml"


@functools.cache
def load(module: str) -> dict[str, dict[str, Any]]:
    """The claims file beside experiment module ``module`` (e.g. ``batchnorm.lab.experiments.bias``), read once."""
    return parse(*_beside(module, "claims"))


_TABLES = ("text", "tiny", "quick", "full")
"""The tables a settings file may hold: fixed text, and each mode's values of computed fields."""


@functools.cache
def _settings_file(module: str) -> dict[str, Any]:
    """The settings file beside experiment module ``module``, read once; ``ValueError`` for a table
    other than ``_TABLES`` or a ``[text]`` entry that is not a string."""
    text, where = _beside(module, "settings")
    data = tomllib.loads(text)
    if tables := [name for name, value in data.items() if isinstance(value, dict) and value and name not in _TABLES]:
        raise ValueError(f"{where}: expected settings as key = value lines and tables {_TABLES}, got table(s) {tables}")
    if not all(isinstance(v, str) for v in data.get("text", {}).values()):
        raise ValueError(f"{where}: expected every entry of [text] a string")
    return data


def _values(table: dict[str, Any]) -> dict[str, Any]:
    """A table's settings in file order, arrays as tuples (nested tables of ``_TABLES`` left out)."""
    return {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in table.items()
        if not (k in _TABLES and isinstance(v, dict))
    }


def load_settings(module: str) -> dict[str, Any]:
    """The settings of the file beside experiment module ``module``: each one's value by name, in
    file order (arrays as tuples)."""
    return _values(_settings_file(module))


_D = TypeVar("_D", bound="Declared")


class Declared:
    """Base of a frozen ``Settings`` dataclass whose constant settings are data (the module
    docstring): the dataclass's fields are what the code computes (no value in the file) or
    reads (its value from the file); the file's other settings are only recorded."""

    @classmethod
    def of(cls: type[_D], mode: str | None = None, /, **computed: Any) -> _D:
        """The settings with ``computed`` (fields the code computes, and any setting of the file
        this run overrides), then the file's ``[mode]`` table (fields set by mode), then its
        values for the rest."""
        by_mode = _values(_settings_file(cls.__module__).get(mode, {})) if mode else {}
        fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        if unknown := sorted((by_mode.keys() | computed.keys()) - set(fields)):
            raise ValueError(f"{cls.__module__}.Settings: no field(s) {unknown}")
        given = {**load_settings(cls.__module__), **by_mode, **computed}
        if missing := [name for name in fields if name not in given]:
            raise ValueError(f"{cls.__module__}.Settings: no value for {missing} (mode {mode!r})")
        return cls(**{name: copy.deepcopy(given[name]) for name in fields})

    @classmethod
    def text(cls, name: str, **values: Any) -> str:
        """The settings file's ``[text]`` entry ``name`` formatted with ``values``."""
        return str(_settings_file(cls.__module__)["text"][name]).format(**values)

    def record(self) -> dict[str, Any]:
        """Every setting as results record it: the fields the file does not give (in field
        order), then the file's settings in its order, a field's value replacing the file's."""
        declared = load_settings(type(self).__module__)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        first = {name: value for name, value in values.items() if name not in declared}
        return copy.deepcopy({**first, **{name: values.get(name, value) for name, value in declared.items()}})


class Claims:
    """The claims of one saved ``results``: a statement is formatted with the run's settings
    (``results["config"]``) and ``values`` (numbers derived in Python, e.g. ``tol_pp=100 * tol``);
    a threshold is a number, the name of one of those, or ``-name`` (its negative)."""

    def __init__(self, module: str, results: dict[str, Any], **values: Any) -> None:
        self.specs = load(module)
        self.results = results
        self.values: dict[str, Any] = {**results["config"], **values}

    def _threshold(self, value: float | str | None) -> float | None:
        """A table's ``above``/``below`` as a number (None when absent)."""
        if not isinstance(value, str):
            return None if value is None else float(value)
        return -float(self.values[value[1:]]) if value.startswith("-") else float(self.values[value])

    def __call__(
        self, name: str, *, a: Col, b: Col | None = None, evidence: str, also: Sequence[Part] = ()
    ) -> dict[str, Any]:
        """Claim ``name`` (``experiment.claim``): its table's fixed fields with the computed ``a``, ``b``,
        ``evidence`` and ``also``."""
        spec = self.specs[name]
        fixed = {key: spec[key] for key in ("expected", "source", "effect", "kind") if key in spec}
        above, below = (self._threshold(spec.get(key)) for key in ("above", "below"))
        statement = spec["statement"].format(**self.values)
        return claim(
            statement, results=self.results, a=a, b=b, above=above, below=below, evidence=evidence, also=also, **fixed
        )
