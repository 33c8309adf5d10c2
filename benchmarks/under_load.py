"""Busy cores: a lab-style training loop with the default back-end against ``BATCHNORM_BACKEND=torch``,
on the machine as it is and with extra busy processes on the cores.

    PYTHONPATH=src python -m benchmarks.under_load [--busy 2] [--reps 3] [--steps 200] [--threads 1]

The loop is the lab's small-batch network (3x100 MLP, ``batchnorm.BatchNorm1d`` before each ReLU,
batch 32, SGD), trained as the lab's runner trains it: ``torch.set_num_threads(--threads)`` first,
then one evaluation on 1437 examples (a (1437, 100) batch-norm input, large enough for the
parallel kernels, as the lab's evaluation on the training set), then ``--steps`` timed steps.
Each measurement runs in a fresh interpreter (thread pools start once per process); the two
back-ends alternate, ``--reps`` times, first on the machine as it is, then with ``--busy``
extra processes running ``while True: pass`` (started under ``timeout``, killed at the end).
Reported: medians of the wall and CPU time per step and of the torch thread count at the end,
and the ratio default/torch-back-end (< 1: the default is faster).

Busy OpenMP pools collapse on loaded cores (idle workers spin, and every parallel region waits
for a descheduled thread), so a run that silently went from 1 to 2 torch threads shows here as
a step tens of times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

__all__ = ["child", "main"]

_BUSY = "while True: pass"


def child(steps: int, threads: int) -> dict[str, float]:
    """Time the lab-style loop in this process (see module docstring); {wall, cpu} per step in ms."""
    import torch
    import torch.nn.functional as F

    import batchnorm
    from batchnorm.lab.models import MLP

    torch.set_num_threads(threads)
    saved = torch.get_num_threads()  # read, as the lab's runner does before it sets the count
    torch.manual_seed(0)
    model = MLP(64, [100, 100, 100], 10, act="relu", norm=lambda c: batchnorm.BatchNorm1d(c))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(1437, 64), torch.randint(0, 10, (1437,))
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()

    def step(i: int) -> None:
        idx = torch.arange(32) + (32 * i) % 1400
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(10):
        step(i)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(i)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": 1e3 * wall / steps, "cpu": 1e3 * cpu / steps, "threads": torch.get_num_threads(), "asked": saved}


def _measure(backend: str, steps: int, threads: int) -> dict[str, float]:
    env = dict(os.environ, BATCHNORM_BACKEND=backend)
    code = f"import json; from benchmarks.under_load import child; print(json.dumps(child({steps}, {threads})))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _round(label: str, reps: int, steps: int, threads: int) -> None:
    runs: dict[str, list[dict[str, float]]] = {"auto": [], "torch": []}
    for r in range(reps):
        for backend in ("auto", "torch") if r % 2 == 0 else ("torch", "auto"):
            runs[backend].append(_measure(backend, steps, threads))
    med = {b: {k: statistics.median(v[k] for v in rs) for k in rs[0]} for b, rs in runs.items()}
    a, t = med["auto"], med["torch"]
    print(
        f"{label:<22} default {a['wall']:8.2f} ms/step (cpu {a['cpu']:7.2f}, {a['threads']:.0f} thr) | "
        f"torch back-end {t['wall']:8.2f} ms/step (cpu {t['cpu']:7.2f}, {t['threads']:.0f} thr) | "
        f"default/torch {a['wall'] / t['wall']:5.2f}x",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="extra busy processes for the second measurement")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the loop (the lab's is 1)")
    parser.add_argument("--limit", type=int, default=900, help="seconds after which the busy processes stop anyway")
    args = parser.parse_args(argv)
    print(f"lab-style loop, {args.steps} steps, torch threads asked {args.threads}, median of {args.reps} processes")
    _round("as is", args.reps, args.steps, args.threads)
    if args.busy <= 0:
        return
    busy = [subprocess.Popen(["timeout", str(args.limit), sys.executable, "-c", _BUSY]) for _ in range(args.busy)]
    try:
        _round(f"+{args.busy} busy processes", args.reps, args.steps, args.threads)
    finally:
        for proc in busy:
            proc.terminate()  # timeout passes SIGTERM on to its busy child
            proc.wait()


if __name__ == "__main__":
    main()
