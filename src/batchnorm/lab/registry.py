"""The list of experiments, in a fixed order, imported lazily.

The experiment contract — each module ``batchnorm.lab.experiments.<id with _>`` exposes:

    ID: str                 the CLI name, e.g. "ioffe2015-fig1"
    DESCRIPTION: str        one line
    QUICK_SECONDS: float    estimated --quick wall time on 2 cores
    run(cfg: RunConfig, progress: Progress) -> dict
        trains and measures; returns JSON-serializable {"config": {...every choice, including
        those the paper does not state: optimizer, lr, init std...}, "data": {...},
        "metrics": {...}}
    claims(results: dict) -> list[dict]
        judged ONLY from the saved results: [{"claim": str, "holds": bool, "evidence": str}]
    figures(results: dict, outdir: Path) -> list[Path]
        drawn ONLY from the saved results (matplotlib via ``batchnorm.lab.figures.pyplot()``)
    USES_DATA: bool         optional (default True); False for an experiment on its own
                            synthetic data that ignores ``--data``

Beside each module, ``<module>.md`` (shipped as package data) holds its prose for a newcomer:
what is measured and why, the setup, what the paper found (Markdown; blank lines separate
paragraphs); ``report.explanation`` reads it.

Adding an experiment = one module and its Markdown file, and its id listed in ``EXPERIMENTS``. Ids whose module
does not exist are skipped.
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
