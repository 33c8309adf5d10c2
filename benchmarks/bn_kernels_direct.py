"""The numba kernels called directly vs ``F.batch_norm``, on the cache-resident shapes.

Run: PYTHONPATH=src python -m benchmarks.bn_kernels_direct [--rounds 15] [--large]

Per shape, one loop calls, in this order, ``cpu.train_forward``, ``F.batch_norm`` (training),
``cpu.backward``, ``cpu.eval_forward``, ``F.batch_norm`` (eval) and ``x.sum()`` (a read),
each timed with ``time.perf_counter``; 2 warm-up calls each, then ``--rounds`` interleaved
rounds; prints medians in ms. float32, torch and numba at their default thread counts
(``torch.set_num_threads(--threads)`` when given). No autograd: this isolates the kernels and
their output allocation from the functional layer.

``--large``: the large shapes instead ((64, 64, 56, 56) and (256, 256, 14, 14), NCHW and
channels-last), timing every public kernel of the back-end (``train_forward``, ``backward``,
``batch_stats``, ``backward_sums``, ``backward_apply``) with ``F.batch_norm`` and the
memory-traffic references ``x.sum()`` (read), ``out.fill_()`` (write) and ``out.copy_(x)``
(read + write) of a preallocated ``out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from batchnorm._kernels import cpu


def _cases() -> dict[str, torch.Tensor]:
    """name -> input: (128, 512, 7, 7) NCHW and channels-last, (1024, 4096)."""
    nchw = torch.randn(128, 512, 7, 7)
    return {
        "128x512x7x7 nchw": nchw,
        "128x512x7x7 nhwc": nchw.contiguous(memory_format=torch.channels_last),
        "1024x4096 nc": torch.randn(1024, 4096),
    }


def _large_cases() -> dict[str, torch.Tensor]:
    """name -> input: (64, 64, 56, 56) and (256, 256, 14, 14), NCHW and channels-last."""
    cases = {}
    for shape in ((64, 64, 56, 56), (256, 256, 14, 14)):
        x = torch.randn(shape)
        name = "x".join(map(str, shape))
        cases[name + " nchw"] = x
        cases[name + " nhwc"] = x.contiguous(memory_format=torch.channels_last)
    return cases


def _large_fns(x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The timed calls for one large input."""
    c = x.shape[1]
    w = torch.rand(c) + 0.5
    b = torch.randn(c)
    g = torch.randn_like(x)
    out = torch.empty_like(x)
    _, mu, var = cpu.train_forward(x, w, b, 1e-5)
    invstd = torch.rsqrt(var.double() + 1e-5)
    m = x.numel() // c
    sum_g, sum_gxc = cpu.backward_sums(g, x, mu)
    mean_g = sum_g / m
    mean_gxhat = sum_gxc * invstd / m
    return {
        "fwd": lambda: cpu.train_forward(x, w, b, 1e-5),
        "bwd": lambda: cpu.backward(g, x, mu, invstd, w),
        "stats": lambda: cpu.batch_stats(x),
        "sums": lambda: cpu.backward_sums(g, x, mu),
        "apply": lambda: cpu.backward_apply(g, x, mu, invstd, w, mean_g, mean_gxhat),
        "torch fwd": lambda: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
        "read": lambda: x.sum(),
        "write": lambda: out.fill_(0.5),
        "copy": lambda: out.copy_(x),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds (default 15)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as found)")
    p.add_argument("--large", action="store_true", help="the large shapes, every public kernel")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.large:
        for name, x in _large_cases().items():
            _report(name, _large_fns(x), args.rounds)
        return 0
    for name, x in _cases().items():
        c = x.shape[1]
        w = torch.randn(c)
        b = torch.randn(c)
        rm = torch.randn(c)
        rv = torch.rand(c) + 0.5
        g = torch.randn_like(x)
        _, mu, var = cpu.train_forward(x, w, b, 1e-5)
        invstd = torch.rsqrt(var.double() + 1e-5)
        fns: dict[str, Callable[[], object]] = {
            "fwd": lambda: cpu.train_forward(x, w, b, 1e-5),
            "torch fwd": lambda: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
            "bwd": lambda: cpu.backward(g, x, mu, invstd, w),
            "eval": lambda: cpu.eval_forward(x, rm, rv, w, b, 1e-5),
            "torch eval": lambda: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5),
            "sum": lambda: x.sum(),
        }
        _report(name, fns, args.rounds)
    return 0


def _report(name: str, fns: dict[str, Callable[[], object]], rounds: int) -> None:
    """2 warm-up calls each, then ``rounds`` interleaved rounds; prints the medians in ms."""
    for f in fns.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    cells = "  ".join(f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in times.items())
    print(f"{name:18s} {cells}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
