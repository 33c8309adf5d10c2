"""Self-contained HTML reports drawn from saved results (figures embedded as base64 PNG).

``write_experiment_report(dir, results, module)`` draws the experiment's figures from
``results`` into ``dir`` and writes ``dir/report.html``: what the experiment shows and why
(for a newcomer, from the Markdown file beside the experiment's module), the claims table,
the figures, every recorded choice, the data, how to reproduce it, and the library versions.
``write_index(out, all_results)`` writes ``out/index.html`` with one claims table linking each
experiment's report; ``matrix_html(matrix)`` renders the replication matrix.

Each claim is shown with what was measured (its evidence), the verdict and the claim's own
reason for it (``why``, from ``experiment.claim``), the estimate, the interval, the claimed
direction with its threshold, the seeds, and the paper's expectation with its source (figure or
table). Keys that a claim lacks are left out, so results from older runs still render.
"""

from __future__ import annotations

import base64
import html
import importlib.resources
import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._files import write_text_atomic
from .results import count_claims

if TYPE_CHECKING:
    from .experiment import Experiment

__all__ = [
    "experiment_html",
    "explanation",
    "index_html",
    "matrix_html",
    "reproduce_command",
    "verdict_counts",
    "write_experiment_report",
    "write_index",
]

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2rem; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0; font-size: .92rem; }
table.settings > tbody > tr > th, table.settings > tr > th { width: 14rem; }
table.nested { font-size: .85rem; margin: 0; }
th, td, p, h1, figcaption { overflow-wrap: anywhere; }
table { table-layout: fixed; }
th, td { border: 1px solid #ccc; padding: .3rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.holds { color: #0a6b2a; font-weight: 600; } td.fails { color: #a11; font-weight: 600; }
td.inconclusive { color: #8a5a00; font-weight: 600; }
td .why { color: #444; font-weight: normal; font-size: .85rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
code, pre { background: #f6f6f6; padding: .1rem .3rem; border-radius: 3px; }
pre { padding: .6rem; overflow-x: auto; }
.muted { color: #666; font-size: .9rem; }
body.wide { max-width: 84rem; }
"""


def reproduce_command(results: dict[str, Any]) -> str:
    """The shell command that reproduces these results."""
    run = results.get("run", {})
    mode = {"quick": ["--quick"], "tiny": ["--tiny"]}.get(run.get("mode", "full"), [])
    parts = ["batchnorm", "lab", "run", str(results.get("id")), *mode, "--seed", str(run.get("seed", 0))]
    return " ".join([*parts, "--data", str(run.get("data", "digits"))])


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
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            keys: list[str] = []
            for v in value:
                keys += [str(k) for k in v if str(k) not in keys]
            head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
            rows = "".join("<tr>" + "".join(f"<td>{_cell(v.get(k, ''))}</td>" for k in keys) + "</tr>" for v in value)
            return f"<table class='nested'><tr>{head}</tr>{rows}</table>"
        return ", ".join(_cell(v) for v in value) if value else "-"
    if isinstance(value, float):
        return _esc(f"{value:.6g}")
    if isinstance(value, (bool, int)) or value is None:
        return _esc(json.dumps(value))
    return _esc(value)


def _kv_table(mapping: dict[str, Any]) -> str:
    """A two-column table of settings (nested settings as nested tables, never raw JSON)."""
    body = "\n".join(f"<tr><th>{_esc(k)}</th><td>{_cell(v)}</td></tr>" for k, v in mapping.items())
    return f"<table class='settings'>{body}</table>"


_VERDICT_CLASS = {"holds": "holds", "does not hold": "fails", "inconclusive": "inconclusive"}
"""CSS class of each verdict's table cell."""


def _claim_verdict(claim: dict[str, Any]) -> str:
    """A claim's verdict: its saved ``verdict`` (claims judged over seeds), else from ``holds``."""
    verdict = claim.get("verdict")
    return str(verdict) if verdict in _VERDICT_CLASS else ("holds" if claim.get("holds") else "does not hold")


def _number(value: Any) -> float | None:
    """A saved number as a float (``"inf"``, ``"-inf"``, ``"nan"`` included); None if it is none."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _g(value: float) -> str:
    """A number in 3 significant digits (``-inf``/``inf`` spelled out)."""
    return f"{value:.3g}" if math.isfinite(value) else ("-inf" if value < 0 else "inf")


def _interval(claim: dict[str, Any]) -> tuple[float, float] | None:
    raw = claim.get("interval")
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        return None
    lo, hi = (_number(v) for v in raw)
    return None if lo is None or hi is None else (lo, hi)


def _seed_count(claim: dict[str, Any], listed: bool = True) -> str | None:
    """How many seeds judged the claim (``n_seeds``, else its listed ``seeds``), with the seeds
    in parentheses when ``listed``; None when the claim says neither."""
    seeds = claim.get("seeds")
    n = claim.get("n_seeds", len(seeds) if isinstance(seeds, list) else None)
    if n is None or not listed:
        return None if n is None else str(n)
    return f"{n}" + (f" ({', '.join(str(s) for s in seeds)})" if isinstance(seeds, list) and seeds else "")


def _numbers_cell(claim: dict[str, Any]) -> str:
    """Estimate, interval, threshold, seeds, method and rule of one claim (what is shown
    where the claim was judged over seeds)."""
    interval, estimate, level = _interval(claim), _number(claim.get("estimate")), claim.get("confidence", 0.95)
    if estimate is None:
        return "<span class='muted'>not judged over seeds</span>"
    parts = [f"estimate <b>{_esc(_g(estimate))}</b>"]
    parts += (
        [f"{100 * float(level):g}% interval [{_esc(_g(interval[0]))}, {_esc(_g(interval[1]))}]"] if interval else []
    )
    if claim.get("direction"):
        parts.append(f"claimed: <code>{_esc(claim['direction'])}</code>")
    elif claim.get("threshold") is not None:
        parts.append(f"threshold {_esc(claim['threshold'])}")
    parts.append(f"seeds: {_esc(_seed_count(claim) or '-')}")
    parts += [f"<span class='muted'>{_esc(claim['method'])}</span>"] if claim.get("method") else []
    parts += [f"<span class='muted'>rule: {_esc(claim['rule'])}</span>"] if claim.get("rule") else []
    return "<br>".join(parts)


def _verdict_cell(claim: dict[str, Any]) -> str:
    """The verdict, the claim's reason for it (``why``: where the interval lies against the
    threshold, and for an undecided claim how far the estimate is from it and why more seeds
    would not settle it) and whether it is an identity of the math."""
    verdict = _claim_verdict(claim)
    lines = [_esc(verdict)] + ([f"<span class='why'>{_esc(claim['why'])}</span>"] if claim.get("why") else [])
    if claim.get("kind") == "identity":
        lines.append("<span class='why'>an identity of the math, checked numerically (not a replication)</span>")
    return f"<td class='{_VERDICT_CLASS[verdict]}'>" + "<br>".join(lines) + "</td>"


def _paper_cell(claim: dict[str, Any]) -> str:
    expected, source = claim.get("expected"), claim.get("source")
    if not expected and not source:
        return "<td>-</td>"
    return f"<td>{_esc(expected or '')}<br><span class='muted'>{_esc(source or '')}</span></td>"


def _claims_table(claims: Sequence[dict[str, Any]]) -> str:
    """One row per claim: the statement with what this run measured, the verdict with why,
    the numbers it rests on, and the paper's figure or table it comes from."""
    rows = [
        f"<tr><td>{_esc(c.get('claim', ''))}"
        + (f"<br><span class='muted'>measured: {_esc(c['evidence'])}</span>" if c.get("evidence") else "")
        + f"</td>{_verdict_cell(c)}<td>{_numbers_cell(c)}</td>{_paper_cell(c)}</tr>"
        for c in claims
    ]
    return (
        "<table class='claims'><colgroup><col style='width:38%'><col style='width:22%'><col style='width:22%'>"
        "<col style='width:18%'></colgroup><tr><th>claim (and what this run measured)</th><th>verdict and why</th>"
        "<th>estimate, interval, threshold, seeds</th><th>the paper (source)</th></tr>" + "".join(rows) + "</table>"
    )


def verdict_counts(claims: Sequence[dict[str, Any]]) -> str:
    """``"3 hold, 1 does not hold, 1 inconclusive (of 5)"``, identities of the math counted apart."""
    counts = count_claims(list(claims))

    def counted(c: dict[str, int]) -> str:
        return f"{c['holds']} hold, {c['does not hold']} do not hold, {c['inconclusive']} inconclusive (of {sum(c.values())})"

    replications, identities = counts["replication"], counts["identity"]
    if not sum(identities.values()):
        return counted(replications)
    if not sum(replications.values()):
        return f"identities of the math: {counted(identities)}"
    return f"replications: {counted(replications)}; identities of the math: {counted(identities)}"


_MODE_NOTE = {
    "quick": "quick mode: scaled down to run in about a minute on 2 CPU cores; each claim is judged over the seeds "
    "shown beside it.",
    "tiny": "tiny mode: a smoke test (seconds); claims are judged but not expected to hold.",
    "full": "full mode: the faithful, paper-sized version.",
}


def _settings(config: Any) -> dict[str, Any]:
    """The recorded choices to show: a data-specific choice left empty on other data is left out."""
    if not isinstance(config, dict):
        return {}
    return {k: v for k, v in config.items() if not (k.endswith("_choice") and v in (None, "", [], {}))}


def experiment_html(results: dict[str, Any], figures: Sequence[Path], explanation: str) -> str:
    """The report page for one experiment (figures are read from disk and embedded)."""
    claims = results.get("claims", [])
    run = results.get("run", {})
    figs = [
        f"<figure><img alt='{_esc(Path(p).stem)}' src='data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode('ascii')}'>"
        f"<figcaption class='muted'>{_esc(Path(p).name)}</figcaption></figure>"
        for p in figures
    ]
    mode_note = _MODE_NOTE.get(run.get("mode", ""), "")
    data_choice = results.get("config", {}).get("mnist1d_choice") if isinstance(results.get("config"), dict) else None
    data_note = f"<p><b>Setup changed for this data:</b> {_esc(data_choice)}</p>" if data_choice else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(results.get("id"))} — batchnorm lab</title>
<style>{_STYLE}</style></head><body>
<h1>{_esc(results.get("id"))}</h1>
<p>{_esc(results.get("description", ""))}</p>
<p class="muted">{_esc(mode_note)} Data: {_esc(run.get("data"))}; seed {_esc(run.get("seed"))};
wall time {_esc(results.get("wall_time_s"))} s on {_esc(results.get("threads"))} thread(s); {_esc(results.get("finished_at", ""))}.</p>
{data_note}
<h2>What this experiment does</h2>
{_paragraphs(explanation)}
<h2>Claims — {_esc(verdict_counts(claims))}</h2>
<p class="muted">A claim holds when the whole 95% interval of its effect lies on the claimed side of its threshold,
does not hold when the whole interval lies on the other side, and is inconclusive when the interval straddles the threshold.</p>
{_claims_table(claims)}
<h2>Figures</h2>
{"".join(figs) if figs else "<p>No figures.</p>"}
<h2>Every choice made (including those the paper does not state)</h2>
{_kv_table(_settings(results.get("config", {})))}
<h2>Data</h2>
{_kv_table(results.get("data", {}))}
<h2>Reproduce</h2>
<pre>{_esc(reproduce_command(results))}</pre>
<p class="muted">Redraw this report from results.json without retraining: <code>batchnorm lab report DIR</code>.</p>
<h2>Versions</h2>
{_kv_table(results.get("versions", {}))}
</body></html>
"""


def explanation(module: Experiment) -> str:
    """An experiment's prose for a newcomer: the Markdown file beside its module
    (``experiments/<name>.md``, shipped as package data); a module without one (a test
    double) may carry it as ``EXPLANATION``."""
    spec = getattr(inspect.getmodule(module), "__spec__", None)
    if spec is not None and spec.name and "." in spec.name:
        package, name = spec.name.rsplit(".", 1)
        resource = importlib.resources.files(package).joinpath(f"{name}.md")
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    text = getattr(module, "EXPLANATION", None)
    if text is None:
        raise ValueError(f"experiment module {getattr(module, '__name__', module)!r} has no Markdown file beside it")
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
    """``est [lo, hi]; a - b >= 0.5; 3 seeds`` for the index (``-`` for a claim not judged over seeds)."""
    estimate, interval, n = _number(claim.get("estimate")), _interval(claim), _seed_count(claim, listed=False)
    if estimate is None:
        return "-"
    text = _g(estimate) + (f" [{_g(interval[0])}, {_g(interval[1])}]" if interval else "")
    text += f"; claimed {claim['direction']}" if claim.get("direction") else ""
    return text + (f"; {n} seeds" if n is not None else "")


def index_html(all_results: Sequence[dict[str, Any]]) -> str:
    """The index page: one row per claim, grouped by experiment, linking each report."""
    rows = []
    every: list[dict[str, Any]] = []
    for results in all_results:
        eid = str(results.get("id"))
        claims = results.get("claims", [])
        every += claims
        link = f"<a href='{_esc(eid)}/report.html'>{_esc(eid)}</a>"
        run = results.get("run", {})
        info = f"{_esc(run.get('mode'))}, {_esc(run.get('data'))}, seed {_esc(run.get('seed'))}, {_esc(results.get('wall_time_s'))} s"
        for k, c in enumerate(claims or [{"claim": "(no claims)", "holds": True, "evidence": ""}]):
            head = (
                f"<td rowspan='{max(len(claims), 1)}'>{link}<br><span class='muted'>{info}</span></td>"
                if k == 0
                else ""
            )
            verdict = _claim_verdict(c)
            rows.append(
                f"<tr>{head}<td>{_esc(c.get('claim', ''))}</td><td class='{_VERDICT_CLASS[verdict]}'>"
                f"{_esc(verdict)}</td><td>{_esc(_short_numbers(c))}</td><td>{_esc(c.get('evidence', ''))}</td></tr>"
            )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchnorm lab — index</title><style>{_STYLE}</style></head>
<body class="wide">
<h1>batchnorm lab</h1>
<p>What the batch-normalization literature claims, re-measured on small CPU-sized problems: {_esc(verdict_counts(every))}.
Each experiment links to its report (why each verdict is what it is, figures, setup, every choice made).</p>
<table class='index'><colgroup><col style='width:10%'><col style='width:30%'><col style='width:8rem'>
<col style='width:17%'><col></colgroup>
<tr><th>experiment</th><th>claim</th><th>verdict</th><th>estimate [95% interval]; threshold; seeds</th><th>evidence</th></tr>
{"".join(rows)}
</table></body></html>
"""


def matrix_html(matrix: dict[str, Any]) -> str:
    """The replication matrix page: one row per experiment, one column per data set; each cell
    links the run's report, counts its verdicts and lists every claim with its numbers, why
    its verdict is what it is, and the paper's expectation."""
    head = "".join(f"<th>{_esc(d)}</th>" for d in matrix["data"])
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
    failures = "<h2>Failed</h2><ul>" + "".join(f"<li>{_esc(f)}</li>" for f in failed) + "</ul>" if failed else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchnorm lab — replication matrix</title><style>{_STYLE}</style></head>
<body><h1>Replication matrix ({_esc(matrix["mode"])} mode, seeds {_esc(", ".join(str(v) for v in matrix["seeds"]))})</h1>
<p class="muted">Each data set's runs are in its own folder (<code>DATA/ID/report.html</code>).</p>
<table><colgroup><col style='width:12rem'></colgroup><tr><th>experiment</th>{head}</tr>{"".join(rows)}</table>
{failures}</body></html>
"""


def write_index(out: Path, all_results: Sequence[dict[str, Any]]) -> Path:
    """Write ``out/index.html`` atomically; returns its path."""
    path = Path(out) / "index.html"
    write_text_atomic(path, index_html(all_results))
    return path
