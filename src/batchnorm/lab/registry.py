"""The list of experiments, in a fixed order, imported lazily.

Each module ``batchnorm.lab.experiments.<id with _>`` follows the contract of docs/lab.md
("Writing an experiment"): an ``EXPERIMENT`` instance of an ``experiment.Experiment`` subclass
(its ``ID`` is the module's name, its ``DESCRIPTION`` one line; ``run``, ``claims`` and
``figures``: see ``Experiment``), its prose in ``<module>.md`` beside it (package data, read by
``report.explanation``). Its ``--quick`` time is measured, in ``quick_seconds``. Adding an
experiment = one module and its Markdown file, and its id listed in ``EXPERIMENTS``. Ids whose
module does not exist are skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .experiment import Experiment

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


def ids() -> tuple[str, ...]:
    """Ids of the experiments whose module exists, in the fixed order."""
    return tuple(e for e in EXPERIMENTS if importlib.util.find_spec(module_name(e)) is not None)


def module_name(experiment_id: str) -> str:
    """The module implementing ``experiment_id`` ("a-b" -> "batchnorm.lab.experiments.a_b")."""
    return "batchnorm.lab.experiments." + experiment_id.replace("-", "_")


def get(experiment_id: str) -> Experiment:
    """The experiment's ``EXPERIMENT``; ValueError for an unknown id or a module without one."""
    if experiment_id not in ids():
        raise ValueError(f"unknown experiment {experiment_id!r}; known: {', '.join(ids())}")
    module = importlib.import_module(module_name(experiment_id))
    if not hasattr(module, "EXPERIMENT"):
        raise ValueError(f"experiment module {module.__name__} lacks EXPERIMENT")
    return module.EXPERIMENT
