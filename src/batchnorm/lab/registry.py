"""The list of experiments, in a fixed order, imported lazily.

Each module ``batchnorm.lab.experiments.<id with _>`` follows the contract of docs/lab.md
("Writing an experiment"): ``ID`` (the CLI name), ``DESCRIPTION`` (one line), ``QUICK_SECONDS``
(estimated --quick wall time on 2 cores), ``run(cfg, progress) -> {"config", "data", "metrics"}``
(``config``: every choice, those the paper leaves open included), ``claims(results) -> [{"claim",
"holds", "evidence"}]`` and ``figures(results, outdir) -> [Path]`` (both from the saved results
alone), and optionally ``USES_DATA = False`` for an experiment on its own synthetic data that
ignores ``--data``. Its prose is ``<module>.md`` beside it (package data, read by
``report.explanation``). Adding an experiment = one module and its Markdown file, and its id
listed in ``EXPERIMENTS``. Ids whose module does not exist are skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["EXPERIMENTS", "get", "ids", "module_name"]

# fixed order: the order of `lab list`, `lab run all` and the index report
EXPERIMENTS: tuple[str, ...] = (
    "ioffe2015-fig1",
    "goodfellow-chain",
    "lr-sweep",
    "dropout",
    "placement",
    "bias",
    "inference-stats",
    "small-batch",
    "ghost-bn",
    "santurkar2018-noisy",
    "santurkar2018-ics",
    "santurkar2018-landscape",
    "precise-bn",
)

_REQUIRED = ("ID", "DESCRIPTION", "QUICK_SECONDS", "run", "claims", "figures")


def ids() -> tuple[str, ...]:
    """Ids of the experiments whose module exists, in the fixed order."""
    return tuple(e for e in EXPERIMENTS if importlib.util.find_spec(module_name(e)) is not None)


def module_name(experiment_id: str) -> str:
    """The module implementing ``experiment_id`` ("a-b" -> "batchnorm.lab.experiments.a_b")."""
    return "batchnorm.lab.experiments." + experiment_id.replace("-", "_")


def get(experiment_id: str) -> ModuleType:
    """Import the experiment module; ValueError for an unknown id or a module missing the contract."""
    if experiment_id not in ids():
        raise ValueError(f"unknown experiment {experiment_id!r}; known: {', '.join(ids())}")
    module = importlib.import_module(module_name(experiment_id))
    missing = [name for name in _REQUIRED if not hasattr(module, name)]
    if missing:
        raise ValueError(f"experiment module {module.__name__} lacks {', '.join(missing)}")
    if module.ID != experiment_id:
        raise ValueError(f"experiment module {module.__name__} has ID {module.ID!r}, expected {experiment_id!r}")
    return module
