"""Self-contained HTML reports drawn from saved results (figures embedded as base64 PNG).

``write_experiment_report(dir, results, module)`` draws the experiment's figures from
``results`` into ``dir`` and writes ``dir/report.html``: what the experiment shows and why
(for a newcomer), the claims table (holds / evidence), the figures, every recorded choice,
the data, how to reproduce it, and the library versions. ``write_index(out, all_results)`` writes ``out/index.html``
with one claims table linking each experiment's report.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from ._files import write_text_atomic

__all__ = ["experiment_html", "index_html", "reproduce_command", "write_experiment_report", "write_index"]

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
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
code, pre { background: #f6f6f6; padding: .1rem .3rem; border-radius: 3px; }
pre { padding: .6rem; overflow-x: auto; }
.muted { color: #666; font-size: .9rem; }
"""


def reproduce_command(results: dict[str, Any]) -> str:
    """The shell command that reproduces these results."""
    run = results.get("run", {})
    parts = ["batchnorm", "lab", "run", str(results.get("id"))]
    mode = run.get("mode", "full")
    if mode == "quick":
        parts.append("--quick")
    elif mode == "tiny":
        parts.append("--tiny")
    parts += ["--seed", str(run.get("seed", 0)), "--data", str(run.get("data", "digits"))]
    return " ".join(parts)


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _paragraphs(text: str) -> str:
    blocks = [b.strip() for b in text.strip().split("\n\n") if b.strip()]
    return "\n".join(f"<p>{_esc(' '.join(b.split()))}</p>" for b in blocks)


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
    if verdict in _VERDICT_CLASS:
        return str(verdict)
    return "holds" if claim.get("holds") else "does not hold"


def _claims_table(claims: Sequence[dict[str, Any]]) -> str:
    rows = []
    for c in claims:
        verdict = _claim_verdict(c)
        rows.append(
            f"<tr><td>{_esc(c.get('claim', ''))}</td><td class='{_VERDICT_CLASS[verdict]}'>{_esc(verdict)}</td>"
            f"<td>{_esc(c.get('evidence', ''))}</td></tr>"
        )
    return "<table><tr><th>claim</th><th>verdict</th><th>evidence (this run)</th></tr>" + "".join(rows) + "</table>"


def _verdict(claims: Sequence[dict[str, Any]]) -> str:
    held = sum(1 for c in claims if c.get("holds"))
    return f"{held}/{len(claims)} claims hold"


def experiment_html(results: dict[str, Any], figures: Sequence[Path], explanation: str) -> str:
    """The report page for one experiment (figures are read from disk and embedded)."""
    claims = results.get("claims", [])
    run = results.get("run", {})
    figs = []
    for path in figures:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        figs.append(
            f"<figure><img alt='{_esc(Path(path).stem)}' src='data:image/png;base64,{data}'><figcaption class='muted'>{_esc(Path(path).name)}</figcaption></figure>"
        )
    mode_note = {
        "quick": "quick mode: scaled down to run in about a minute on 2 CPU cores; calibrated on the digits, "
        "where every claim is expected to hold (on other data a claim that fails is a finding).",
        "tiny": "tiny mode: a smoke test (seconds); claims are judged but not expected to hold.",
        "full": "full mode: the faithful, paper-sized version.",
    }.get(run.get("mode", ""), "")
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
<h2>Claims — {_esc(_verdict(claims))}</h2>
{_claims_table(claims)}
<h2>Figures</h2>
{"".join(figs) if figs else "<p>No figures.</p>"}
<h2>Every choice made (including those the paper does not state)</h2>
{_kv_table(results.get("config", {}))}
<h2>Data</h2>
{_kv_table(results.get("data", {}))}
<h2>Reproduce</h2>
<pre>{_esc(reproduce_command(results))}</pre>
<p class="muted">Redraw this report from results.json without retraining: <code>batchnorm lab report DIR</code>.</p>
<h2>Versions</h2>
{_kv_table(results.get("versions", {}))}
</body></html>
"""


def write_experiment_report(directory: Path, results: dict[str, Any], module: ModuleType) -> Path:
    """Draw ``module.figures(results, directory)`` and write ``directory/report.html``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures = list(module.figures(results, directory))
    path = directory / "report.html"
    write_text_atomic(path, experiment_html(results, figures, module.EXPLANATION))
    return path


def index_html(all_results: Sequence[dict[str, Any]]) -> str:
    """The index page: one row per claim, grouped by experiment, linking each report."""
    rows = []
    total = 0
    held = 0
    for results in all_results:
        eid = str(results.get("id"))
        claims = results.get("claims", [])
        link = f"<a href='{_esc(eid)}/report.html'>{_esc(eid)}</a>"
        run = results.get("run", {})
        info = f"{_esc(run.get('mode'))}, {_esc(run.get('data'))}, seed {_esc(run.get('seed'))}, {_esc(results.get('wall_time_s'))} s"
        first = True
        for c in claims or [{"claim": "(no claims)", "holds": True, "evidence": ""}]:
            ok = bool(c.get("holds"))
            total += 1
            held += int(ok)
            head = (
                f"<td rowspan='{max(len(claims), 1)}'>{link}<br><span class='muted'>{info}</span></td>" if first else ""
            )
            first = False
            verdict = _claim_verdict(c)
            rows.append(
                f"<tr>{head}<td>{_esc(c.get('claim', ''))}</td><td class='{_VERDICT_CLASS[verdict]}'>"
                f"{_esc(verdict)}</td><td>{_esc(c.get('evidence', ''))}</td></tr>"
            )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchnorm lab — index</title><style>{_STYLE}</style></head><body>
<h1>batchnorm lab</h1>
<p>What the batch-normalization literature claims, re-measured on small CPU-sized problems. {held}/{total} claims hold.
Each experiment links to its report (figures, setup, every choice made).</p>
<table><tr><th>experiment</th><th>claim</th><th>verdict</th><th>evidence</th></tr>
{"".join(rows)}
</table></body></html>
"""


def write_index(out: Path, all_results: Sequence[dict[str, Any]]) -> Path:
    """Write ``out/index.html`` atomically; returns its path."""
    path = Path(out) / "index.html"
    write_text_atomic(path, index_html(all_results))
    return path
