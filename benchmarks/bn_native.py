"""CPU back-ends side by side: torch's aten kernels ("native") against our numba kernels.

Run: nice python -m benchmarks.bn_native [--repeats 7] [--calls 100] [--quick] [--threads T] [--only small|large|16bit|all]
     nice python -m benchmarks.bn_native --direct --threads 1 --repeats 5 --calls 60

One ``batchnorm.BatchNorm*d`` layer per shape and dtype, timed through the same operators
under each back-end, interleaved (``--calls`` calls of each per round, rounds repeated,
medians of the per-round medians), in three modes: the training forward alone (under
``torch.no_grad``), the training step forward + backward, and the eval forward. Candidates:

- ``native``: ``use_backend("native")`` (``aten::native_batch_norm`` and its backward);
- ``auto``:   the default back-end before this comparison: float32/float64 tensors below
  ``dispatch.AUTO_MIN_NUMEL`` elements on the serial one-call kernels of
  ``batchnorm._kernels.cpu_small``, larger ones on ``batchnorm._kernels.cpu``, small 16-bit
  tensors on torch ops (set with ``dispatch.AUTO_NATIVE`` emptied, see :func:`_auto_before`);
- ``numba``:  ``use_backend("numba")`` (the parallel kernels of ``batchnorm._kernels.cpu``);
- ``torch``:  ``use_backend("torch")`` (pure torch ops);
- ``nn``:     ``torch.nn.BatchNorm*d`` itself.

Prints microseconds per call and ``native/best-of-ours``: below 1 means the aten kernels win.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable, Iterator

import torch

import batchnorm
from batchnorm._kernels import dispatch

from .bn_small import SHAPES as SMALL_SHAPES
from .bn_small import median_call

LARGE_SHAPES: list[tuple[int, ...]] = [(8, 64, 16, 16), (32, 64, 16, 16), (64, 256, 8, 8)]
CASES: list[tuple[tuple[int, ...], torch.dtype, torch.memory_format]] = (
    [(s, torch.float32, torch.contiguous_format) for s in SMALL_SHAPES]
    + [(s, torch.float32, torch.contiguous_format) for s in LARGE_SHAPES]
    + [((64, 256, 8, 8), torch.float32, torch.channels_last)]
    + [(s, torch.float64, torch.contiguous_format) for s in ((64, 512), (16, 32, 8, 8))]
    + [(s, torch.bfloat16, torch.contiguous_format) for s in ((64, 512), (16, 32, 8, 8), (32, 64, 16, 16))]
)
MODES = ("train", "step", "eval")


@contextlib.contextmanager
def _auto_before() -> Iterator[None]:
    """The "auto" back-end without its rule that picks native on CPU (numba kernels only)."""
    saved = getattr(dispatch, "AUTO_NATIVE", None)
    with batchnorm.use_backend("auto"):
        if saved is None:
            yield
            return
        dispatch.AUTO_NATIVE = ()  # type: ignore[attr-defined]
        try:
            yield
        finally:
            dispatch.AUTO_NATIVE = saved  # type: ignore[attr-defined]


def _layer(shape: tuple[int, ...], dtype: torch.dtype, ours: bool) -> torch.nn.Module:
    kind = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    cls = getattr(batchnorm if ours else torch.nn, kind)
    return cls(shape[1]).to(dtype)


def measure(
    shape: tuple[int, ...], dtype: torch.dtype, fmt: torch.memory_format, repeats: int, calls: int
) -> dict[str, dict[str, float]]:
    """{mode: {candidate: median microseconds}}."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    contexts: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
        "native": lambda: batchnorm.use_backend("native"),
        "auto": _auto_before,
        "numba": lambda: batchnorm.use_backend("numba"),
        "torch": lambda: batchnorm.use_backend("torch"),
        "nn": contextlib.nullcontext,
    }
    layers = {name: _layer(shape, dtype, ours=name != "nn") for name in contexts}

    def make(mode: str, name: str) -> Callable[[], object]:
        layer, ctx = layers[name], contexts[name]

        def run() -> None:
            with ctx():
                if mode == "eval":
                    layer.eval()
                    with torch.no_grad():
                        layer(x)
                elif mode == "train":
                    layer.train()
                    with torch.no_grad():
                        layer(x)
                else:
                    layer.train()
                    x.grad = None
                    layer(x).backward(g)

        return run

    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        cands = {name: make(mode, name) for name in contexts}
        for fn in cands.values():  # warm-up: compilation, first-call set-up
            median_call(fn, 10)
        rounds: dict[str, list[float]] = {k: [] for k in cands}
        for _ in range(repeats):
            for name, fn in cands.items():
                rounds[name].append(median_call(fn, calls))
        out[mode] = {k: statistics.median(v) for k, v in rounds.items()}
    return out


DIRECT_SHAPES = [s for s in SMALL_SHAPES if torch.Size(s).numel() < dispatch.AUTO_MIN_NUMEL]
"""The bn_small shapes that "auto" sends to the small-tensor paths."""


def direct(repeats: int, calls: int) -> None:
    """The kernel modules called directly (no layer, no operator): native against cpu_small
    (float32) and against torch_ops (float16/bfloat16), train forward, backward and eval."""
    from batchnorm._kernels import cpu_small, native, torch_ops

    def med(fn: Callable[[], object]) -> float:
        fn()
        return statistics.median(median_call(fn, calls) for _ in range(repeats))

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in DIRECT_SHAPES:
            x = torch.randn(shape).to(dtype)
            g = torch.randn(shape).to(dtype)
            c = shape[1]
            w, b, one = torch.ones(c), torch.zeros(c), torch.ones(c)
            mean = native.train_forward(x, w, b, 1e-5)[1]
            mods = [native, cpu_small if dtype == torch.float32 else torch_ops]
            parts = []
            for mode in ("train", "bwd", "eval"):
                times = []
                for mod in mods:
                    if mode == "train":
                        fn: Callable[[], object] = lambda mod=mod: mod.train_forward(x, w, b, 1e-5)  # noqa: E731
                    elif mode == "bwd":
                        fn = lambda mod=mod: mod.backward(g, x, mean, one, w)  # noqa: E731
                    else:
                        fn = lambda mod=mod: mod.eval_forward(x, b, one, w, b, 1e-5)  # noqa: E731
                    times.append(med(fn))
                parts.append(f"{mode} {times[0]:.0f} vs {times[1]:.0f}")
            other = mods[1].__name__.split(".")[-1]
            label = f"{'x'.join(map(str, shape)):<12} {str(dtype).split('.')[-1]:<9} native vs {other:<10}"
            print(f"{label} " + " | ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--calls", type=int, default=100, help="calls per candidate and round (default 100)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 30 calls")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads first (default: leave)")
    parser.add_argument("--direct", action="store_true", help="time the kernel modules directly instead")
    parser.add_argument("--only", choices=("small", "large", "16bit", "all"), default="all", help="which cases")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.direct:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians in microseconds")
        direct(*((3, 30) if args.quick else (args.repeats, args.calls)))
        return
    cases = {
        "all": CASES,
        "small": [c for c in CASES if c[0] in SMALL_SHAPES and c[1] == torch.float32],
        "large": [c for c in CASES if c[0] in LARGE_SHAPES or c[2] == torch.channels_last],
        "16bit": [c for c in CASES if c[1] in (torch.bfloat16, torch.float64)],
    }[args.only]
    repeats, calls = (3, 30) if args.quick else (args.repeats, args.calls)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians in microseconds")
    head = f"{'shape':<14} {'dtype':<9} {'fmt':<5} {'mode':<5}"
    print(f"{head} {'native':>8} {'auto':>8} {'numba':>8} {'torch':>8} {'nn':>8} {'native/ours':>11}")
    for shape, dtype, fmt in cases:
        res = measure(shape, dtype, fmt, repeats, calls)
        for mode, r in res.items():
            ours = min(r["auto"], r["numba"])
            label = f"{'x'.join(map(str, shape)):<14} {str(dtype).split('.')[-1]:<9} "
            label += f"{'cl' if fmt == torch.channels_last else 'nc':<5} {mode:<5}"
            print(
                f"{label} {r['native']:>8.0f} {r['auto']:>8.0f} {r['numba']:>8.0f} {r['torch']:>8.0f} {r['nn']:>8.0f} "
                f"{r['native'] / ours:>11.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
