"""Small-tensor speed: one batch-norm layer's training step where the Python glue, not memory
traffic, decides (MLP hidden layers, small feature maps).

Run: PYTHONPATH=src python -m benchmarks.bn_small [--repeats 7] [--calls 200] [--threads 1]

For each shape, the step is ``y = bn(x); y.backward(g)`` on a layer in training mode (input
and parameter gradients, running statistics updated), and also the eval forward under
``torch.no_grad()``. Candidates, timed interleaved (``--calls`` calls of each per round,
rounds repeated: medians of the per-round medians, and ours/torch with its 95% interval over the
rounds, ``benchmarks.ratios``):

- ``auto``:  our BatchNorm*d with the default back-end (small float32/float64 CPU tensors run
  aten's kernel with our guard on top: one C++ call when ``batchnorm build-ext`` has compiled
  it, its Python form otherwise; ``BATCHNORM_EXT=0`` times the Python form);
- ``torch_ops``: our layer with ``use_backend("torch")`` (the pure-torch path, ~20 small ops);
- ``native``: ``torch.nn.BatchNorm*d``.

``auto/native`` < 1 means we are faster; an interval that contains 1 is no difference the run
can detect. Timings on shared machines are noisy: compare the
ratios of one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import batchnorm

from .ratios import ratio

SHAPES: list[tuple[int, ...]] = [
    (8, 16),
    (32, 128),
    (64, 512),
    (256, 512),
    (256, 1024),
    (60, 100, 8),
    (128, 64, 4, 4),
    (16, 32, 8, 8),
    (32, 64, 4, 4),
]


def _layers(shape: tuple[int, ...]) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    ours = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}[len(shape)]
    native = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(shape)]
    return ours(shape[1]), ours(shape[1]), native(shape[1])


def median_call(fn: Callable[[], object], calls: int) -> float:
    """Median wall time of ``calls`` calls of fn, in microseconds."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(shape: tuple[int, ...], repeats: int, calls: int) -> dict[str, dict[str, list[float]]]:
    """{mode: {candidate: each round's median microseconds}} for mode in ("train", "eval")."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    g = torch.randn(shape, generator=gen)
    auto, ops, native = _layers(shape)

    def step(layer: torch.nn.Module, backend: str | None) -> Callable[[], object]:
        def run() -> None:
            layer.train()
            x.grad = None
            if backend is None:
                layer(x).backward(g)
            else:
                with batchnorm.use_backend(backend):
                    layer(x).backward(g)

        return run

    def evaluate(layer: torch.nn.Module, backend: str | None) -> Callable[[], object]:
        def run() -> None:
            layer.eval()
            with torch.no_grad():
                if backend is None:
                    layer(x)
                else:
                    with batchnorm.use_backend(backend):
                        layer(x)

        return run

    out: dict[str, dict[str, list[float]]] = {}
    for mode, make in (("train", step), ("eval", evaluate)):
        # the default back-end is timed as a user calls it: no use_backend context around the call
        cands = {"auto": make(auto, None), "torch_ops": make(ops, "torch"), "native": make(native, None)}
        for fn in cands.values():  # warm-up: compilation / cache load, first-call set-up
            median_call(fn, 20)
        rounds: dict[str, list[float]] = {k: [] for k in cands}
        for _ in range(repeats):
            for name, fn in cands.items():
                rounds[name].append(median_call(fn, calls))
        out[mode] = rounds
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--calls", type=int, default=200, help="calls per candidate and round (default 200)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians in microseconds")
    print(
        f"{'shape':<16} {'mode':<6} {'auto':>8} {'torch_ops':>10} {'native':>8} {'auto/native [95% interval]':>28} "
        f"{'ops/native':>11}"
    )
    for shape in SHAPES:
        res = measure(shape, args.repeats, args.calls)
        for mode, rounds in res.items():
            r = {name: statistics.median(times) for name, times in rounds.items()}
            ours, lo, hi = ratio(rounds["auto"], rounds["native"])
            print(
                f"{'x'.join(map(str, shape)):<16} {mode:<6} {r['auto']:>8.0f} {r['torch_ops']:>10.0f} "
                f"{r['native']:>8.0f} {ours:>12.3f} [{lo:.3f}, {hi:.3f}] {r['torch_ops'] / r['native']:>11.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
