"""Masked vs unmasked training step of one batch-norm layer (padded sequences).

Run: PYTHONPATH=src python -m benchmarks.masked [--repeats 7] [--calls 50]

For each shape (N, C, L), the step is ``y = bn(x, mask=mask); y.backward(g)`` on a
``BatchNorm1d`` in training mode (input and parameter gradients, running statistics updated),
with a mask whose samples have real prefixes of different lengths (about 3/4 real). Candidates,
timed interleaved (``--calls`` calls of each per round, rounds repeated, medians of the per-round
medians):

- ``masked``:   our BatchNorm1d with ``mask=`` (torch ops over the real positions);
- ``unmasked``: the same layer without a mask (our kernels; what padding-unaware code runs);
- ``native``:   ``torch.nn.BatchNorm1d`` without a mask.

``masked/unmasked`` is the price of the mask. Timings on shared machines are noisy: compare the
ratios of one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

import batchnorm

from .bn_small import median_call

SHAPES: list[tuple[int, int, int]] = [(32, 128, 16), (64, 256, 64), (32, 512, 128), (16, 64, 512)]


def _mask(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(N, L) bool: sample i real on a prefix of random length in [L/2, L]."""
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    return torch.arange(length)[None, :] < lengths[:, None]


def measure(shape: tuple[int, int, int], repeats: int, calls: int) -> dict[str, float]:
    """{candidate: median microseconds} of a training step."""
    gen = torch.Generator().manual_seed(0)
    n, c, length = shape
    x = torch.randn(shape, generator=gen).requires_grad_()
    g = torch.randn(shape, generator=gen)
    mask = _mask(n, length, gen)
    masked, unmasked, native = batchnorm.BatchNorm1d(c), batchnorm.BatchNorm1d(c), torch.nn.BatchNorm1d(c)

    def step(layer: torch.nn.Module, m: torch.Tensor | None) -> Callable[[], object]:
        def run() -> None:
            x.grad = None
            (layer(x) if m is None else layer(x, mask=m)).backward(g)

        return run

    cands = {"masked": step(masked, mask), "unmasked": step(unmasked, None), "native": step(native, None)}
    for fn in cands.values():  # warm-up: compilation / cache load, first-call set-up
        median_call(fn, 10)
    rounds: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            rounds[name].append(median_call(fn, calls))
    return {k: statistics.median(v) for k, v in rounds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--calls", type=int, default=50, help="calls per candidate and round (default 50)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; training step, medians in microseconds")
    print(f"{'shape':<14} {'masked':>8} {'unmasked':>9} {'native':>8} {'masked/unmasked':>16} {'masked/native':>14}")
    for shape in SHAPES:
        r = measure(shape, args.repeats, args.calls)
        print(
            f"{'x'.join(map(str, shape)):<14} {r['masked']:>8.0f} {r['unmasked']:>9.0f} {r['native']:>8.0f} "
            f"{r['masked'] / r['unmasked']:>16.2f} {r['masked'] / r['native']:>14.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
