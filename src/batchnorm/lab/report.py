"""Self-contained HTML reports drawn from saved results (figures embedded as base64 PNG); what a
page shows: ``docs/lab.md``, "Figures and reports". Each page is a ``string.Template`` in
``templates/`` (package data) with the style sheet ``templates/style.css``. Keys that a claim
lacks are left out, so results from older runs still render.
"""

from __future__ import annotations

import base64
import html
import importlib.resources
import json
import math
import string
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def _page(name: str, **fields: str) -> str:
    """The page template ``templates/<name>.html`` filled in with ``fields`` (HTML) and the style sheet."""
    templates = importlib.resources.files(__name__.rpartition(".")[0]).joinpath("templates")
    page, style = (templates.joinpath(file).read_text(encoding="utf-8") for file in (f"{name}.html", "style.css"))
    return string.Template(page).substitute(fields, style=style)


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _paragraphs(text: str) -> str:
    """An experiment's Markdown prose as HTML (Python-Markdown); a leading ``# title`` line is
    dropped (the page has its own)."""
    import markdown  # the lab's dependency; imported when a report is written

    text = text.strip()
    if text.startswith("# ") and "\n" not in text.split("\n\n", 1)[0]:
        text = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    return str(markdown.markdown(text))


def _cell(value: Any) -> str:
    """A setting as HTML: a nested table for a dict, a table for a list of dicts (one row each,
    one column per key), a comma-separated list for a list of plain values, else the value."""
    if isinstance(value, dict):
        return _kv_table(value) if value else "-"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = list(dict.fromkeys(str(k) for v in value for k in v))
        head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
        rows = "".join("<tr>" + "".join(f"<td>{_cell(v.get(k, ''))}</td>" for k in keys) + "</tr>" for v in value)
        return f"<table class='nested'><tr>{head}</tr>{rows}</table>"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value) if value else "-"
    if isinstance(value, float):
        return _esc(f"{value:.6g}")
    return _esc(json.dumps(value) if isinstance(value, (bool, int)) or value is None else value)


def _kv_table(mapping: dict[str, Any]) -> str:
    """A two-column table of settings (nested settings as nested tables, never raw JSON)."""
    body = "\n".join(f"<tr><th>{_esc(k)}</th><td>{_cell(v)}</td></tr>" for k, v in mapping.items())
    return f"<table class='settings'>{body}</table>"


def _number(value: Any) -> float | None:
    """A saved number as a float (``"inf"``, ``"-inf"``, ``"nan"`` included); None if it is none."""
    try:
        return None if isinstance(value, bool) or value is None else float(value)
    except (TypeError, ValueError):
        return None


def _g(value: float) -> str:
    """A number in 3 significant digits (``-inf``/``inf`` spelled out)."""
    return f"{value:.3g}" if math.isfinite(value) else ("-inf" if value < 0 else "inf")


def _judged(claim: dict[str, Any]) -> tuple[float | None, str | None, Any]:
    """A claim's estimate (None: not judged over seeds), interval as ``[lo, hi]`` in 3 significant
    digits (None if there is none) and seed count (``n_seeds``, else how many it lists, else None)."""
    raw, seeds = claim.get("interval"), claim.get("seeds")
    lo, hi = (_number(v) for v in raw) if isinstance(raw, (list, tuple)) and len(raw) == 2 else (None, None)
    n = claim.get("n_seeds", len(seeds) if isinstance(seeds, list) else None)
    return _number(claim.get("estimate")), None if lo is None or hi is None else f"[{_g(lo)}, {_g(hi)}]", n


def _numbers_cell(claim: dict[str, Any]) -> str:
    """Estimate, interval (at its level), threshold, seeds, method and rule of a claim judged over seeds."""
    (estimate, interval, n), seeds = _judged(claim), claim.get("seeds")
    if estimate is None:
        return "<span class='muted'>not judged over seeds</span>"
    parts = [f"estimate <b>{_esc(_g(estimate))}</b>"]
    parts += [f"{_level(claim.get('confidence', 0.95))} interval {interval}"] if interval else []
    if claim.get("direction"):
        parts.append(f"claimed: <code>{_esc(claim['direction'])}</code>")
    elif claim.get("threshold") is not None:
        parts.append(f"threshold {_esc(claim['threshold'])}")
    listed = f" ({', '.join(str(s) for s in seeds)})" if isinstance(seeds, list) and seeds else ""
    parts.append(f"seeds: {_esc('-' if n is None else f'{n}{listed}')}")
    parts += [f"<span class='muted'>{_esc(claim['method'])}</span>"] if claim.get("method") else []
    parts += [f"<span class='muted'>rule: {_esc(claim['rule'])}</span>"] if claim.get("rule") else []
    return "<br>".join(parts)


def _verdict_cell(claim: dict[str, Any], why: bool = True) -> str:
    """The verdict (CSS class: the verdict, ``fails`` for ``does not hold``) with, if ``why``, the
    claim's ``why`` and whether it is an identity of the math."""
    verdict = verdict_of(claim)
    lines = [_esc(verdict)] + ([f"<span class='why'>{_esc(claim['why'])}</span>"] if why and claim.get("why") else [])
    if why and claim.get("kind") == "identity":
        lines.append("<span class='why'>an identity of the math, checked numerically (not a replication)</span>")
    return f"<td class='{'fails' if verdict == 'does not hold' else verdict}'>" + "<br>".join(lines) + "</td>"


def _claim_rows(claims: Sequence[dict[str, Any]]) -> str:
    """The claims table's rows: statement and evidence, verdict and why, numbers, the paper."""
    rows = []
    for c in claims:
        measured = f"<br><span class='muted'>measured: {_esc(c['evidence'])}</span>" if c.get("evidence") else ""
        paper = f"{_esc(c.get('expected') or '')}<br><span class='muted'>{_esc(c.get('source') or '')}</span>"
        paper = paper if c.get("expected") or c.get("source") else "-"
        cells = f"{_verdict_cell(c)}<td>{_numbers_cell(c)}</td><td>{paper}</td>"
        rows.append(f"<tr><td>{_esc(c.get('claim', ''))}{measured}</td>{cells}</tr>")
    return "".join(rows)


def verdict_counts(claims: Sequence[dict[str, Any]]) -> str:
    """``"3 hold, 1 does not hold, 1 inconclusive (of 5)"``, identities of the math counted apart."""
    counts = count_claims(list(claims))
    text = {kind: f"{tally(counts[kind])} (of {sum(counts[kind].values())})" for kind in counts}
    if not sum(counts["identity"].values()):
        return text["replication"]
    identities = f"identities of the math: {text['identity']}"
    return f"replications: {text['replication']}; {identities}" if sum(counts["replication"].values()) else identities


_MODE_NOTE = {
    "quick": "quick mode: scaled down to run in about a minute on 2 CPU cores; each claim is judged over the seeds "
    "shown beside it.",
    "tiny": "tiny mode: a smoke test (seconds); claims are judged but not expected to hold.",
    "full": "full mode: the faithful, paper-sized version.",
}


def _figure(path: Path) -> str:
    """A PNG figure embedded in the page, with its file name as caption."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<figure><img alt='{_esc(path.stem)}' src='data:image/png;base64,{data}'><figcaption class='muted'>{_esc(path.name)}</figcaption></figure>"


def experiment_html(results: dict[str, Any], figures: Sequence[Path], explanation: str) -> str:
    """The report page for one experiment (figures are read from disk and embedded); a data-specific
    choice left empty on other data (``*_choice``) is not shown."""
    claims = results.get("claims", [])
    run = results.get("run", {})
    config = results.get("config", {}) if isinstance(results.get("config"), dict) else {}
    choice = config.get("mnist1d_choice")
    mode = {"quick": " --quick", "tiny": " --tiny"}.get(run.get("mode", "full"), "")
    reproduce = f"batchnorm lab run {results.get('id')}{mode} --seed {run.get('seed', 0)}"
    text = {
        **{key: results.get(key) for key in ("id", "wall_time_s", "threads")},
        **{key: results.get(key, "") for key in ("description", "finished_at")},
        **{key: run.get(key) for key in ("data", "seed")},
        "mode_note": _MODE_NOTE.get(run.get("mode", ""), ""),
        "counts": verdict_counts(claims),
        "reproduce": f"{reproduce} --data {run.get('data', 'digits')}",
    }
    return _page(
        "experiment",
        **{k: _esc(v) for k, v in text.items()},
        data_note=f"<p><b>Setup changed for this data:</b> {_esc(choice)}</p>" if choice else "",
        explanation=_paragraphs(explanation),
        claims=_claim_rows(claims),
        figures="".join(_figure(Path(p)) for p in figures) or "<p>No figures.</p>",
        settings=_kv_table(
            {k: v for k, v in config.items() if not (k.endswith("_choice") and v in (None, "", [], {}))}
        ),
        data_table=_kv_table(results.get("data", {})),
        versions=_kv_table(results.get("versions", {})),
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
    figures = list(module.figures(results, directory))
    path = directory / "report.html"
    write_text_atomic(path, experiment_html(results, figures, explanation(module)))
    return path


def _short_numbers(claim: dict[str, Any]) -> str:
    """``est [lo, hi]; claimed a - b >= 0.5; 3 seeds`` for the index (``-`` for a claim not judged over seeds)."""
    estimate, interval, n = _judged(claim)
    if estimate is None:
        return "-"
    text = _g(estimate) + (f" {interval} ({_level(claim.get('confidence', 0.95))})" if interval else "")
    text += f"; claimed {claim['direction']}" if claim.get("direction") else ""
    return text + (f"; {n} seeds" if n is not None else "")


def index_html(all_results: Sequence[dict[str, Any]]) -> str:
    """The index page: one row per claim, grouped by experiment, linking each report."""
    rows = []
    for results in all_results:
        eid = str(results.get("id"))
        claims = results.get("claims", [])
        run = results.get("run", {})
        info = f"{_esc(run.get('mode'))}, {_esc(run.get('data'))}, seed {_esc(run.get('seed'))}, {_esc(results.get('wall_time_s'))} s"
        head = f"<td rowspan='{max(len(claims), 1)}'><a href='{_esc(eid)}/report.html'>{_esc(eid)}</a><br><span class='muted'>{info}</span></td>"
        for c in claims or [{"claim": "(no claims)", "holds": True, "evidence": ""}]:
            rows.append(
                f"<tr>{head}<td>{_esc(c.get('claim', ''))}</td>{_verdict_cell(c, why=False)}"
                f"<td>{_esc(_short_numbers(c))}</td><td>{_esc(c.get('evidence', ''))}</td></tr>"
            )
            head = ""
    every = [c for results in all_results for c in results.get("claims", [])]
    return _page("index", counts=_esc(verdict_counts(every)), rows="".join(rows))


def matrix_html(matrix: dict[str, Any]) -> str:
    """The replication matrix page: a row per experiment, a column per data set; each cell links the
    run's report, counts its verdicts and lists its claims (numbers, why, the paper's expectation)."""
    rows = []
    for row in matrix["rows"]:
        tds = []
        for d in matrix["data"]:
            c = row["cells"].get(d)
            if c is None:
                tds.append("<td>-</td>")
                continue
            items = []
            for x in c["claims"]:
                judged = _number(x.get("estimate")) is not None
                numbers = f" — ours {_esc(_short_numbers({**x, 'seeds': c['seeds']}))}" if judged else ""
                reason = f"<br><span class='why'>{_esc(x['why'])}</span>" if judged and x.get("why") else ""
                paper = f" ({_esc(x.get('evidence', ''))})"
                paper = f"; paper: {_esc(x['expected'])} ({_esc(x.get('source', ''))})" if x.get("expected") else paper
                items.append(f"<li><b>{_esc(x['verdict'])}</b>: {_esc(x['claim'])}{numbers}{paper}{reason}</li>")
            tds.append(
                f"<td><a href='{_esc(d)}/{_esc(row['id'])}/report.html'>{c['holds']} hold, {c['does_not_hold']} do not, "
                f"{c['inconclusive']} inconclusive</a> (seeds {_esc(', '.join(str(v) for v in c['seeds']))})"
                f"<details><summary>claims</summary><ul>{''.join(items)}</ul></details></td>"
            )
        rows.append(f"<tr><td>{_esc(row['id'])}</td>{''.join(tds)}</tr>")
    failed = matrix.get("failed") or []
    return _page(
        "matrix",
        mode=_esc(matrix["mode"]),
        seeds=_esc(", ".join(str(v) for v in matrix["seeds"])),
        head="".join(f"<th>{_esc(d)}</th>" for d in matrix["data"]),
        rows="".join(rows),
        failures="<h2>Failed</h2><ul>" + "".join(f"<li>{_esc(f)}</li>" for f in failed) + "</ul>" if failed else "",
    )


def write_index(out: Path, all_results: Sequence[dict[str, Any]]) -> Path:
    """Write ``out/index.html`` atomically; returns its path."""
    path = Path(out) / "index.html"
    write_text_atomic(path, index_html(all_results))
    return path
