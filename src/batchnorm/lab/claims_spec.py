"""Claims declared as data: ``experiments/<name>.claims.toml`` (package data) holds one table per
claim, in order, with its fixed fields (``statement`` template, ``expected``, ``source``, ``effect``,
``kind``, thresholds ``above``/``below``); the module computes a, b and evidence; ``Claims`` joins them."""

from __future__ import annotations

import functools
import importlib.resources
import sys
from collections.abc import Sequence
from typing import Any

from .experiment import claim
from .verdict import Part

if sys.version_info >= (3, 11):
    import tomllib
else:  # the lab extra's backport on Python 3.10
    import tomli as tomllib

__all__ = ["Claims", "Col", "load", "parse"]

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


@functools.cache
def load(module: str) -> dict[str, dict[str, Any]]:
    """The claims file beside experiment module ``module`` (e.g. ``batchnorm.lab.experiments.bias``), read once."""
    package, name = module.rsplit(".", 1)
    resource = importlib.resources.files(package).joinpath(f"{name}.claims.toml")
    return parse(resource.read_text(encoding="utf-8"), f"{name}.claims.toml")


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
