"""Integration matrix: which integration points work, for our layers and for torch's BN.

    python -m benchmarks.integration_matrix [--timeout 300] [--layers NAME ...] [--points NAME ...]

Each (integration point, layer) check runs the same function as the tests in
``tests/integration`` in its own subprocess with a timeout, so a crash or a hang costs one
cell. Prints a markdown table: rows are integration points, columns are layers, a cell is
"works" or "fails: <first line of the error>" ("n/a" where the point does not apply).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _points() -> dict[str, Callable]:
    """name -> check(case); imported lazily (the parent process only lists and spawns)."""
    sys.path.insert(0, str(TESTS))
    from integration import test_compile as tc
    from integration import test_export as te
    from integration import test_func as tf
    from integration import test_gradcheck as tg
    from integration import test_jit as tj
    from integration import test_no_host_sync as th

    def both_modes(check, **kw):
        return lambda c: [check(c, training=t, **kw) for t in (True, False)]

    return {
        "compile (default)": lambda c: tc.check_compile(c, fullgraph=False, grad=True),
        "compile fullgraph": lambda c: tc.check_compile(c, fullgraph=True, grad=True),
        "explain: 0 graph breaks": both_modes(tc.check_no_graph_break, grad=True),
        "compile: 1 graph for 3 steps": tc.check_no_recompile,
        "export train": lambda c: te.check_export(c, training=True, grad=True),
        "export eval": lambda c: te.check_export(c, training=False, grad=True),
        "export: batchnorm.* op": both_modes(te.check_export_op),
        "jit.trace": both_modes(tj.check_trace, grad=True),
        "jit.script": lambda c: tj.check_script(c, grad=True),
        "func.functional_call": both_modes(tf.check_functional_call, grad_on=True),
        "vmap ensembling": both_modes(tf.check_ensemble, grad_on=True, batched_input=True),
        "vmap after replace_all_bn": both_modes(tf.check_vmap_replaced, grad_on=True),
        "vmap eval": lambda c: tf.check_vmap_eval(c, grad_on=True),
        "func.grad": both_modes(tf.check_grad),
        "func.jacrev": both_modes(tf.check_jacrev),
        "func.jvp": both_modes(tf.check_jvp),
        "gradcheck (batched, fwd AD) + gradgradcheck": both_modes(tg.check_module),
        "no host read in a step": lambda c: [th.check_no_host_read(c, training=t, grad=g) for t in (True, False) for g in (True, False)],
        "meta device": lambda c: [th.check_meta(c, training=t, grad=g) for t in (True, False) for g in (True, False)],
    }  # fmt: skip


POINTS = [
    "compile (default)", "compile fullgraph", "explain: 0 graph breaks", "compile: 1 graph for 3 steps",
    "export train", "export eval", "export: batchnorm.* op", "jit.trace", "jit.script", "func.functional_call",
    "vmap ensembling", "vmap after replace_all_bn", "vmap eval", "func.grad", "func.jacrev", "func.jvp",
    "gradcheck (batched, fwd AD) + gradgradcheck", "no host read in a step", "meta device",
]  # fmt: skip
DEFAULT_LAYERS = [
    "torch.BatchNorm2d", "torch.BatchNorm2d-mNone", "torch.SyncBatchNorm", "BatchNorm2d", "BatchNorm2d-mNone",
    "BatchNorm1d", "BatchNorm3d", "BatchRenorm2d", "GhostBatchNorm2d", "FrozenBatchNorm2d", "BatchNormAct2d",
    "SyncBatchNorm",
]  # fmt: skip


def _not_applicable(point: str, layer: str) -> bool:
    if point == "export: batchnorm.* op" and layer.startswith("torch."):
        return True  # torch's BN exports as aten.batch_norm by design
    if point == "vmap after replace_all_bn" and ("Renorm" in layer or "Frozen" in layer):
        return True  # nothing to replace (frozen) / defined by its running statistics (renorm)
    return False


@dataclasses.dataclass
class Options:
    """Command-line options."""

    timeout: float = 300.0
    """seconds per check (a check that runs longer counts as failed)"""
    layers: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_LAYERS))
    """case names (tests/integration/_cases.py; torch's layers are prefixed "torch.")"""
    points: list[str] = dataclasses.field(default_factory=lambda: list(POINTS))
    """integration points (rows)"""
    json_out: str | None = None
    """also write the results as JSON here"""


def _one(point: str, layer: str) -> None:
    """Child process: run one check, print one JSON line."""
    import warnings

    import torch

    sys.path.insert(0, str(TESTS))
    from integration._cases import CASES, TORCH_CASES

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    case = {c.name: c for c in CASES + TORCH_CASES}[layer]
    torch.manual_seed(0)
    try:
        _points()[point](case)
        result = {"ok": True, "error": ""}
    except BaseException as e:  # noqa: BLE001 - every failure is a cell of the table
        first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
        result = {"ok": False, "error": f"{type(e).__name__}: {first}"[:160]}
    print("RESULT " + json.dumps(result), flush=True)


def run(opts: Options) -> dict[str, dict[str, dict]]:
    results: dict[str, dict[str, dict]] = {p: {} for p in opts.points}
    for point in opts.points:
        for layer in opts.layers:
            if _not_applicable(point, layer):
                results[point][layer] = {"ok": None, "error": "n/a"}
                continue
            t0 = time.monotonic()
            cmd = [sys.executable, "-m", "benchmarks.integration_matrix", "--one", point, layer]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
                line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
                if line:
                    res = json.loads(line[-1][7:])
                else:
                    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
                    res = {"ok": False, "error": f"crashed (exit {r.returncode}): {tail[:120]}"}
            except subprocess.TimeoutExpired:
                res = {"ok": False, "error": f"timed out after {opts.timeout:.0f} s"}
            res["seconds"] = round(time.monotonic() - t0, 1)
            results[point][layer] = res
            print(f"{point} | {layer}: {'works' if res['ok'] else res['error']}", file=sys.stderr, flush=True)
    return results


def table(results: dict[str, dict[str, dict]], layers: list[str]) -> str:
    def cell(r: dict) -> str:
        if r["ok"] is None:
            return "n/a"
        return "works" if r["ok"] else "fails: " + r["error"].replace("|", "\\|")

    lines = ["| integration point | " + " | ".join(layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for point, row in results.items():
        lines.append(f"| {point} | " + " | ".join(cell(row[layer]) for layer in layers) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Options()
    p.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds per check")
    p.add_argument("--layers", nargs="+", default=defaults.layers, help="case names (columns)")
    p.add_argument("--points", nargs="+", default=defaults.points, help="integration points (rows)")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    p.add_argument("--one", nargs=2, metavar=("POINT", "LAYER"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        _one(*a.one)
        return
    unknown = [pt for pt in a.points if pt not in POINTS]
    if unknown:
        raise ValueError(f"integration_matrix: unknown points {unknown}; expected some of {POINTS}")
    opts = Options(timeout=a.timeout, layers=a.layers, points=a.points, json_out=a.json_out)
    results = run(opts)
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(results, indent=1))
    print(table(results, opts.layers))


if __name__ == "__main__":
    main()
