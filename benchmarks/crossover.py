"""Where the default back-end should switch from aten's kernels to ours: a BatchNorm*d training
step (forward + backward) by size, through each path, against torch's layer.

Run: PYTHONPATH=src python -m benchmarks.crossover [--threads 1] [--shapes 256x512,64x64x56x56] [--rounds 3]

Candidates, timed interleaved (a round times each in turn; medians of the round medians, in
microseconds): ``auto`` (our layer with the default back-end: aten's kernels below
``dispatch.AUTO_ATEN_MAX`` elements, our parallel numba kernels above), ``native`` (our layer
with ``use_backend("native")``: aten's kernels at every size, our rules on top), ``numba``
(our kernels at every size) and ``torch`` (``torch.nn.BatchNorm*d``). ``x/torch`` < 1 means
faster than torch's layer. This is the measurement behind ``AUTO_ATEN_MAX``; shared machines are
noisy, so compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

import batchnorm

from .bn_small import median_call

SHAPES = "256x512,512x512,1024x512,64x64x8x8,64x64x16x16,32x64x32x32,16x64x56x56,64x64x56x56"


def measure(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    """{candidate: median microseconds of a training step} for one input shape."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    g = torch.randn(shape, generator=gen)
    ours = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}
    theirs = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    layer, reference = ours[len(shape)](shape[1]), theirs[len(shape)](shape[1])

    def step(module: torch.nn.Module, backend: str | None) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            if backend is None:
                module(x).backward(g)
            else:
                with batchnorm.use_backend(backend):
                    module(x).backward(g)

        return run

    cands = {"auto": step(layer, None), "native": step(layer, "native"), "numba": step(layer, "numba")}
    cands["torch"] = step(reference, None)
    calls = max(3, min(50, 4_000_000 // x.numel()))
    for fn in cands.values():
        median_call(fn, 2)  # warm-up: compilation, first-call set-up
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for name, fn in cands.items():
            times[name].append(median_call(fn, calls))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--shapes", default=SHAPES, help=f"comma-separated NxC[xH...] (default {SHAPES})")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; training step medians in microseconds")
    print(f"{'shape':<16} {'elements':>9} {'auto':>9} {'native':>9} {'numba':>9} {'torch':>9}  ratios to torch")
    for spec in args.shapes.split(","):
        shape = tuple(int(n) for n in spec.split("x"))
        r = measure(shape, args.rounds)
        ratios = "  ".join(f"{k} {r[k] / r['torch']:.2f}" for k in ("auto", "native", "numba"))
        n = 1
        for d in shape:
            n *= d
        print(
            f"{spec:<16} {n:>9} {r['auto']:>9.0f} {r['native']:>9.0f} {r['numba']:>9.0f} {r['torch']:>9.0f}  {ratios}",
            flush=True,
        )


if __name__ == "__main__":
    main()
