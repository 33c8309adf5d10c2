"""Ghost BN speed: our vectorized pass vs the loop-over-chunks recipe, and plain BN for scale.

Run: PYTHONPATH=src python -m benchmarks.bench_ghost [--batch 1024 --features 512 --virtual 32]

Times forward + backward of one layer on CPU (1 thread), variants interleaved, median of --reps:
``batchnorm.GhostBatchNorm1d`` (one vectorized pass over all ghost batches, torch ops on a
strided view, independent of the BN kernel back-end), the loop recipe of
pytorch-tabnet's GBN (``torch.cat([bn(c) for c in x.chunk(k)])``, which also applies the running
average k times per step), and ``torch.nn.BatchNorm1d`` on the whole batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

import batchnorm


@dataclass
class Config:
    """Benchmark configuration."""

    batch: int = 1024
    """Samples per step."""
    features: int = 512
    """Channels C of the (N, C) input."""
    virtual: int = 32
    """Ghost batch size."""
    reps: int = 30
    """Timed repetitions per variant (after 3 warm-up ones)."""


class LoopGhost(nn.Module):
    """The loop recipe (as pytorch-tabnet's GBN): one BatchNorm1d call per chunk."""

    def __init__(self, c: int, virtual: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(c)
        self.virtual = virtual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(-(-x.shape[0] // self.virtual), 0)
        return torch.cat([self.bn(c) for c in chunks], 0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in vars(Config()).items():
        p.add_argument("--" + name, type=type(default), default=default)
    cfg = Config(**vars(p.parse_args(argv)))
    torch.set_num_threads(1)  # shared machines: one thread is far less noisy
    x = torch.randn(cfg.batch, cfg.features, requires_grad=True)
    g = torch.randn_like(x)
    variants = {
        "batchnorm.GhostBatchNorm1d (vectorized)": batchnorm.GhostBatchNorm1d(cfg.features, cfg.virtual),
        "loop over chunks of torch BN (tabnet)": LoopGhost(cfg.features, cfg.virtual),
        "torch.nn.BatchNorm1d (whole batch)": nn.BatchNorm1d(cfg.features),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(cfg.reps + 3):
        for name, m in variants.items():
            t0 = time.perf_counter()
            m(x).backward(g)
            t = time.perf_counter() - t0
            if i >= 3:
                times[name].append(t)
    ours = statistics.median(times["batchnorm.GhostBatchNorm1d (vectorized)"])
    print(
        f"input ({cfg.batch}, {cfg.features}), ghost batches of {cfg.virtual}, forward + backward, "
        f"{torch.get_num_threads()} threads, median of {cfg.reps}"
    )
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:40s} {med * 1e3:8.3f} ms   x{med / ours:.2f} vs ours")


if __name__ == "__main__":
    main()
