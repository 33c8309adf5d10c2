"""The list of experiments, in a fixed order, imported lazily.

Each module ``batchnorm.lab.experiments.<id with _>`` exposes ``EXPERIMENT``, an
``experiment.Experiment``, with its prose in ``<module>.md`` beside it and its measured ``--quick``
time in ``quick_seconds.json`` (docs/lab.md, "Writing an experiment").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .experiment import Experiment

__all__ = ["EXPERIMENTS", "get", "module_name"]

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


def module_name(experiment_id: str) -> str:
    """The module implementing ``experiment_id`` ("a-b" -> "batchnorm.lab.experiments.a_b")."""
    return "batchnorm.lab.experiments." + experiment_id.replace("-", "_")


def get(experiment_id: str) -> Experiment:
    """The experiment's ``EXPERIMENT``; ValueError for an unknown id."""
    if experiment_id not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment_id!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(module_name(experiment_id)).EXPERIMENT
