"""Self-contained HTML reports drawn from saved results (figures embedded as base64 PNG); what a
page shows: ``docs/lab.md``, "Figures and reports". This module computes what the pages say; the
markup is Jinja2 templates in ``templates/`` (package data): a page each, the pieces they share in
``macros.html``, the style sheet ``style.css``. Keys that a claim lacks are left out, so results
from older runs still render.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import markupsafe

from .._files import write_text_atomic
from .claims_spec import beside
from .results import count_claims, tally, verdict_of
from .verdict import _level

if TYPE_CHECKING:
    from .experiment import Experiment

__all__ = [
    "experiment_html",
    "explanation",
    "index_html",
    "matrix_html",
    "verdict_counts",
    "write_experiment_report",
    "write_index",
]


@functools.cache
def _environment() -> jinja2.Environment:
    """The pages' templates (``templates/``, package data), made once when a page is first drawn.
    Values are escaped as ``html.escape`` escapes them (``finalize``), so the pages stay as before."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(__name__.rpartition(".")[0]),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=lambda v: v if isinstance(v, markupsafe.Markup) else markupsafe.Markup(html.escape(str(v))),
    )
    env.filters.update(
        columns=lambda rows: list(dict.fromkeys(str(k) for row in rows for k in row)),
        numbers=_numbers,
        plain=_plain,
        verdict=verdict_of,
    )
    env.tests.update(
        list=lambda v: isinstance(v, list),
        rows=lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v),
    )
    return env


def _paragraphs(text: str) -> markupsafe.Markup:
    """An experiment's Markdown prose as HTML (Python-Markdown), less a leading ``# title`` line."""
    import markdown  # the lab's dependency; imported when a report is written

    text = text.strip()
    if text.startswith("# ") and "\n" not in text.split("\n\n", 1)[0]:
        text = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    return markupsafe.Markup(markdown.markdown(text))


def _plain(value: Any) -> str:
    """A plain setting's text: a float in 6 significant digits, JSON for a bool, an int or None."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (bool, int)) or value is None else str(value)


def _number(value: Any) -> float | None:
    """A saved number as a float (``"inf"``, ``"-inf"``, ``"nan"`` included); None if it is none."""
    try:
        return None if isinstance(value, bool) or value is None else float(value)
    except (TypeError, ValueError):
        return None


def _g(value: float) -> str:
    """A number in 3 significant digits (``-inf``/``inf`` spelled out)."""
    return f"{value:.3g}" if math.isfinite(value) else ("-inf" if value < 0 else "inf")


def _numbers(claim: dict[str, Any]) -> dict[str, Any] | None:
    """A claim's numbers (None if it is not judged over seeds): estimate and interval ``[lo, hi]`` (or None)
    in 3 significant digits, level, seed count (``n_seeds``, else how many it lists, or None), seeds listed."""
    estimate, raw, seeds = _number(claim.get("estimate")), claim.get("interval"), claim.get("seeds")
    if estimate is None:
        return None
    lo, hi = (_number(v) for v in raw) if isinstance(raw, (list, tuple)) and len(raw) == 2 else (None, None)
    return {
        "estimate": _g(estimate),
        "interval": None if lo is None or hi is None else f"[{_g(lo)}, {_g(hi)}]",
        "level": _level(claim.get("confidence", 0.95)),
        "n": claim.get("n_seeds", len(seeds) if isinstance(seeds, list) else None),
        "listed": ", ".join(str(s) for s in seeds) if isinstance(seeds, list) else "",
    }


def verdict_counts(claims: Sequence[dict[str, Any]]) -> str:
    """``"3 hold, 1 does not hold, 1 inconclusive (of 5)"``, identities of the math counted apart."""
    counts = count_claims(list(claims))
    text = {kind: f"{tally(counts[kind])} (of {sum(counts[kind].values())})" for kind in counts}
    if not sum(counts["identity"].values()):
        return text["replication"]
    identities = f"identities of the math: {text['identity']}"
    return f"replications: {text['replication']}; {identities}" if sum(counts["replication"].values()) else identities


def _figure(path: Path) -> dict[str, str]:
    """A PNG figure to embed in the page (base64), with its file name as caption."""
    return {"stem": path.stem, "name": path.name, "data": base64.b64encode(path.read_bytes()).decode("ascii")}


def experiment_html(results: dict[str, Any], figures: Sequence[Path], explanation: str) -> str:
    """The report page for one experiment (figures are read from disk and embedded); a data-specific
    choice left empty on other data (``*_choice``) is not shown."""
    claims = results.get("claims", [])
    run = results.get("run", {})
    config = results.get("config", {}) if isinstance(results.get("config"), dict) else {}
    flag = {"quick": " --quick", "tiny": " --tiny"}.get(run.get("mode", "full"), "")
    reproduce = f"batchnorm lab run {results.get('id')}{flag} --seed {run.get('seed', 0)}"
    return (
        _environment()
        .get_template("experiment.html")
        .render(
            **{key: results.get(key) for key in ("id", "wall_time_s", "threads")},
            **{key: results.get(key, "") for key in ("description", "finished_at")},
            **{key: run.get(key) for key in ("data", "seed")},
            mode=run.get("mode", ""),
            counts=verdict_counts(claims),
            reproduce=f"{reproduce} --data {run.get('data', 'digits')}",
            choice=config.get("mnist1d_choice"),
            explanation=_paragraphs(explanation),
            claims=claims,
            figures=[_figure(Path(p)) for p in figures],
            settings={k: v for k, v in config.items() if not (k.endswith("_choice") and v in (None, "", [], {}))},
            data_table=results.get("data", {}),
            versions=results.get("versions", {}),
        )
    )


def explanation(experiment: Experiment) -> str:
    """An experiment's prose: the Markdown file beside its module (``experiments/<name>.md``), else
    (a test double) its ``EXPLANATION``."""
    name = type(experiment).__module__
    if "." in name and (resource := beside(name, ".md")).is_file():
        return resource.read_text(encoding="utf-8")
    text = getattr(experiment, "EXPLANATION", None)
    if text is None:
        raise ValueError(f"experiment {type(experiment).__module__!r} has no Markdown file beside it")
    return str(text)


def write_experiment_report(directory: Path, results: dict[str, Any], module: Experiment) -> Path:
    """Draw ``module.figures(results, directory)`` and write ``directory/report.html``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "report.html"
    write_text_atomic(path, experiment_html(results, list(module.figures(results, directory)), explanation(module)))
    return path


def index_html(all_results: Sequence[dict[str, Any]]) -> str:
    """The index page: one row per claim, grouped by experiment, linking each report."""
    experiments = []
    for results in all_results:
        run = results.get("run", {})
        info = f"{run.get('mode')}, {run.get('data')}, seed {run.get('seed')}, {results.get('wall_time_s')} s"
        claims = results.get("claims", []) or [{"claim": "(no claims)", "holds": True, "evidence": ""}]
        experiments.append({"id": str(results.get("id")), "info": info, "claims": claims})
    every = [c for results in all_results for c in results.get("claims", [])]
    return _environment().get_template("index.html").render(counts=verdict_counts(every), experiments=experiments)


def matrix_html(matrix: dict[str, Any]) -> str:
    """The replication matrix page: a row per experiment, a column per data set; each cell links the
    run's report, counts its verdicts and lists its claims (numbers, why, the paper's expectation)."""
    fields = {k: matrix[k] for k in ("mode", "seeds", "data", "rows")}
    return _environment().get_template("matrix.html").render(fields, failures=matrix.get("failed"))


def write_index(out: Path, all_results: Sequence[dict[str, Any]]) -> Path:
    """Write ``out/index.html`` atomically; returns its path."""
    path = Path(out) / "index.html"
    write_text_atomic(path, index_html(all_results))
    return path
