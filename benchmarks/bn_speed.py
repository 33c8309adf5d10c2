"""Batch-norm speed on CPU: our kernels vs ``torch.nn.functional.batch_norm`` vs the memory floor.

Run: PYTHONPATH=src python -m benchmarks.bn_speed [--quick] [--dtypes float32,bfloat16]

For every shape, memory layout and dtype, and for each operation

- ``fwd``:     training forward (no autograd graph),
- ``bwd``:     backward of a training forward (the graph is kept, grads reset between calls),
- ``fwd+bwd``: training forward with autograd, then backward,
- ``eval``:    inference forward with running statistics,

the candidates are timed *interleaved* (one call of each per round, rounds repeated), and the
table shows medians. ``torch/ours`` > 1 means we are faster. The memory floor is measured in
the same run from plain tensor traffic of the same bytes: ``x.clone()`` (read x, write a fresh
tensor: the compulsory traffic of a forward) and ``x.sum()`` (one read). Floors:
fwd = eval = clone(x); bwd = sum(x) + clone(g) (read x, read g, write dx); fwd+bwd = both.
``ours/floor`` = 1 would mean our kernel costs no more than moving its compulsory bytes once.

Timings on shared machines are noisy: compare ratios measured in one run, not absolute times
across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import batchnorm

SHAPES: list[tuple[tuple[int, ...], str]] = [
    ((64, 64, 56, 56), "nchw"),
    ((64, 64, 56, 56), "nhwc"),
    ((256, 256, 14, 14), "nchw"),
    ((256, 256, 14, 14), "nhwc"),
    ((128, 512, 7, 7), "nchw"),
    ((128, 512, 7, 7), "nhwc"),
    ((1024, 4096), "nc"),
]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Config:
    """Benchmark settings."""

    repeats: int = 11
    """Interleaved rounds per operation (the median of these is reported)."""
    warmup: int = 2
    """Untimed rounds first (numba compilation or cache load, page-cache warm-up)."""
    dtypes: tuple[str, ...] = ("float32",)
    """Input dtypes to measure."""
    shapes: tuple[int, ...] = tuple(range(len(SHAPES)))
    """Indices into SHAPES."""


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bn_speed", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5 rounds, 1 warm-up (a smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 11)")
    p.add_argument("--dtypes", default="float32", help="comma list of float32,bfloat16,float16,float64")
    p.add_argument("--shapes", default=None, help="comma list of indices into SHAPES (default all)")
    a = p.parse_args(argv)
    dtypes = tuple(d.strip() for d in a.dtypes.split(",") if d.strip())
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; expected one of {sorted(DTYPES)}")
    cfg = Config(dtypes=dtypes)
    if a.quick:
        cfg.repeats, cfg.warmup = 5, 1
    if a.repeats is not None:
        cfg.repeats = a.repeats
    if a.shapes:
        cfg.shapes = tuple(int(s) for s in a.shapes.split(","))
    return cfg


def make(shape: tuple[int, ...], layout: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float32).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def interleaved(cands: dict[str, Callable[[], object]], cfg: Config) -> dict[str, float]:
    """Median seconds per candidate, one call of each per round, rotating the order."""
    names = list(cands)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(cfg.warmup + cfg.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            cands[n]()
            dt = time.perf_counter() - t0
            if r >= cfg.warmup:
                times[n].append(dt)
    return {n: statistics.median(v) for n, v in times.items()}


def _grad_step(fn: Callable[[], torch.Tensor], g: torch.Tensor, leaves: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        for t in leaves:
            t.grad = None
        fn().backward(g)

    return step


def bench_case(shape: tuple[int, ...], layout: str, dtype: torch.dtype, cfg: Config) -> list[dict[str, object]]:
    torch.manual_seed(0)
    c = shape[1]
    x = make(shape, layout, dtype)
    g = make(shape, layout, dtype)
    w = torch.rand(c, dtype=dtype) + 0.5
    b = torch.randn(c, dtype=dtype)
    rm = torch.zeros(c, dtype=dtype)
    rv = torch.ones(c, dtype=dtype)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    br = b.clone().requires_grad_()
    leaves = [xr, wr, br]

    def ours_train() -> torch.Tensor:
        return batchnorm.batch_norm(xr, None, None, wr, br, training=True)

    def torch_train() -> torch.Tensor:
        return F.batch_norm(xr, None, None, wr, br, training=True)

    rows = []
    with torch.no_grad():
        fwd = interleaved(
            {
                "ours": lambda: batchnorm.batch_norm(x, None, None, w, b, training=True),
                "torch": lambda: F.batch_norm(x, None, None, w, b, training=True),
                "clone": lambda: x.clone(),
            },
            cfg,
        )
        ev = interleaved(
            {
                "ours": lambda: batchnorm.batch_norm(x, rm, rv, w, b, training=False),
                "torch": lambda: F.batch_norm(x, rm, rv, w, b, training=False),
                "clone": lambda: x.clone(),
            },
            cfg,
        )
    ours_graph = ours_train()
    torch_graph = torch_train()

    def run_bwd(out: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            for t in leaves:
                t.grad = None
            out.backward(g, retain_graph=True)

        return step

    # grads are reset inside the step (cheap: dropping references), the graphs are reused
    bwd = interleaved(
        {
            "ours": run_bwd(ours_graph),
            "torch": run_bwd(torch_graph),
            "sum": lambda: x.sum(),
            "clone_g": lambda: g.clone(),
        },
        cfg,
    )
    del ours_graph, torch_graph
    fb = interleaved(
        {
            "ours": _grad_step(ours_train, g, leaves),
            "torch": _grad_step(torch_train, g, leaves),
        },
        cfg,
    )
    floor_fwd = fwd["clone"]
    floor_bwd = bwd["sum"] + bwd["clone_g"]
    for op, res, floor in (
        ("fwd", fwd, floor_fwd),
        ("bwd", bwd, floor_bwd),
        ("fwd+bwd", fb, floor_fwd + floor_bwd),
        ("eval", ev, ev["clone"]),
    ):
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "layout": layout,
                "dtype": str(dtype).replace("torch.", ""),
                "op": op,
                "ours_ms": res["ours"] * 1e3,
                "torch_ms": res["torch"] * 1e3,
                "speedup": res["torch"] / res["ours"],
                "floor_ms": floor * 1e3,
                "vs_floor": res["ours"] / floor,
            }
        )
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    head = f"{'shape':<16} {'layout':<6} {'dtype':<8} {'op':<8} {'ours ms':>8} {'torch ms':>9} {'torch/ours':>10} {'floor ms':>9} {'ours/floor':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['shape']:<16} {r['layout']:<6} {r['dtype']:<8} {r['op']:<8} {r['ours_ms']:>8.2f} "
            f"{r['torch_ms']:>9.2f} {r['speedup']:>10.2f} {r['floor_ms']:>9.2f} {r['vs_floor']:>10.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    import numba

    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba.__version__} "
        f"({numba.get_num_threads()} threads, layer chosen at first call), cpus {os.cpu_count()}, "
        f"back-end {batchnorm.get_backend()}; {cfg.repeats} interleaved rounds, medians"
    )
    rows: list[dict[str, object]] = []
    for i in cfg.shapes:
        shape, layout = SHAPES[i]
        for d in cfg.dtypes:
            case = bench_case(shape, layout, DTYPES[d], cfg)
            print_table(case)
            print()
            rows += case
    fb = sorted(r["speedup"] for r in rows if r["op"] == "fwd+bwd" and r["dtype"] == "float32")
    if fb:
        print(
            f"training fwd+bwd float32: median speed-up over torch {statistics.median(fb):.2f}x, "
            f"min {min(fb):.2f}x over {len(fb)} cases"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
