"""The numba kernels called directly vs ``F.batch_norm``, on the cache-resident shapes.

Run: PYTHONPATH=src python -m benchmarks.bn_kernels_direct [--rounds 15]

Per shape, one loop calls, in this order, ``cpu.train_forward``, ``F.batch_norm`` (training),
``cpu.backward``, ``cpu.eval_forward``, ``F.batch_norm`` (eval) and ``x.sum()`` (a read),
each timed with ``time.perf_counter``; 2 warm-up calls each, then ``--rounds`` interleaved
rounds; prints medians in ms. float32, torch and numba at their default thread counts
(``torch.set_num_threads(--threads)`` when given). No autograd: this isolates the kernels and
their output allocation from the functional layer.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds (default 15)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as found)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
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
        for f in fns.values():
            f()
            f()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        cells = "  ".join(f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in times.items())
        print(f"{name:18s} {cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
