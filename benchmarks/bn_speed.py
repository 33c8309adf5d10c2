"""Batch-norm speed on CPU: our kernels vs ``torch.nn.functional.batch_norm`` vs the memory floor.

Run: PYTHONPATH=src python -m benchmarks.bn_speed [--quick] [--dtypes float32,bfloat16]

For every shape, memory layout and dtype, and for each operation

- ``fwd``:     training forward (no autograd graph),
- ``bwd``:     backward of a training forward (the graph is kept, grads reset between calls),
- ``fwd+bwd``: training forward with autograd, then backward,
- ``eval``:    inference forward with running statistics,

the candidates are timed *interleaved* (one call of each per round, rounds repeated), and
the table shows medians (and, as ``(best)``, the speed-up between the fastest rounds, which is
what a quiet machine approaches). ``torch/ours`` > 1 means we are faster. The memory floor is
measured in the same run from plain traffic of the same bytes: ``x.sum()`` (read once) and
``out.fill_()`` of a preallocated tensor (write once). Floors: fwd = eval = read + write;
bwd = 2 reads + write (x, g -> dx); fwd+bwd = 3 reads + 2 writes. ``ours/floor`` = 1 would mean
moving each compulsory byte once, into memory that is already mapped (a fresh output must also
be faulted in, which our kernels pay and the floor does not).

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
    warmup: int = 3
    """Untimed rounds first (numba compilation or cache load, torch's first-call set-up)."""
    dtypes: tuple[str, ...] = ("float32",)
    """Input dtypes to measure."""
    shapes: tuple[int, ...] = tuple(range(len(SHAPES)))
    """Indices into SHAPES."""
    threads: int | None = None
    """Threads for both torch and numba; None keeps the defaults."""


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bn_speed", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5 rounds, 1 warm-up (a smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 11)")
    p.add_argument("--dtypes", default="float32", help="comma list of float32,bfloat16,float16,float64")
    p.add_argument("--shapes", default=None, help="comma list of indices into SHAPES (default all)")
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: as found)")
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
    cfg.threads = a.threads
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
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            cands[n]()
            dt = time.perf_counter() - t0
            if r >= cfg.warmup:
                times[n].append(dt)
    res = {n: statistics.median(v) for n, v in times.items()}
    res.update({f"{n}_min": min(v) for n, v in times.items()})
    return res


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
    out = torch.empty_like(x)
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
                "sum": lambda: x.sum(),
                "fill": lambda: out.fill_(0.5),
            },
            cfg,
        )
        ev = interleaved(
            {
                "ours": lambda: batchnorm.batch_norm(x, rm, rv, w, b, training=False),
                "torch": lambda: F.batch_norm(x, rm, rv, w, b, training=False),
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
    rd = fwd["sum"]
    wr = fwd["fill"]
    for op, res, floor in (
        ("fwd", fwd, rd + wr),
        ("bwd", bwd, 2 * rd + wr),
        ("fwd+bwd", fb, 3 * rd + 2 * wr),
        ("eval", ev, rd + wr),
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
                "best": res["torch_min"] / res["ours_min"],
                "floor_ms": floor * 1e3,
                "vs_floor": res["ours"] / floor,
            }
        )
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    head = (
        f"{'shape':<16} {'layout':<6} {'dtype':<8} {'op':<8} {'ours ms':>8} {'torch ms':>9} "
        f"{'torch/ours':>10} {'(best)':>7} {'floor ms':>9} {'ours/floor':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['shape']:<16} {r['layout']:<6} {r['dtype']:<8} {r['op']:<8} {r['ours_ms']:>8.2f} "
            f"{r['torch_ms']:>9.2f} {r['speedup']:>10.2f} {r['best']:>7.2f} {r['floor_ms']:>9.2f} "
            f"{r['vs_floor']:>10.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    import numba

    from batchnorm._kernels import cpu_runtime

    cpu_runtime.threads()  # start numba's pool with the back-end's threading layer
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
        numba.set_num_threads(cfg.threads)

    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba.__version__} "
        f"({numba.get_num_threads()} threads, layer {numba.threading_layer()}), cpus {os.cpu_count()}, "
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
        fl = sorted(r["vs_floor"] for r in rows if r["op"] == "fwd+bwd" and r["dtype"] == "float32")
        print(f"training fwd+bwd float32: ours/floor median {statistics.median(fl):.2f}, max {max(fl):.2f}")
        best = sorted(r["best"] for r in rows if r["op"] == "fwd+bwd" and r["dtype"] == "float32")
        print(
            f"training fwd+bwd float32, fastest rounds: median speed-up {statistics.median(best):.2f}x, "
            f"min {min(best):.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
