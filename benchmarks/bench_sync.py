"""Cost of SyncBatchNorm: a 2-process gloo (CPU) DDP training step, synchronized vs local BN.

Run: PYTHONPATH=src python -m benchmarks.bench_sync [--procs 2 --batch 32 --reps 30]

Both variants run in the same processes, interleaved step by step, under
DistributedDataParallel (so both pay DDP's gradient all-reduce): the same conv net with
``batchnorm.SyncBatchNorm`` (one all_reduce per layer in forward, one in backward) and with our
local ``batchnorm.BatchNorm2d`` (the same per-rank work without statistics sync; it runs
numba's fused forward and backward, where sync splits each pass around its collective);
``torch.nn.BatchNorm2d`` is timed too, for context (``torch.nn.SyncBatchNorm`` refuses CPU
input). Prints per-step medians, the median of the paired (same-iteration) ratios sync / local
(goal <= 1.2x; robust to load that drifts during the run), the latency of the collectives one
SyncBatchNorm layer issues per pass (after a barrier) times the number of layers, and rank 0's
time inside them in a training step, split into waiting for the peer to arrive and the rest.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import socket
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import batchnorm
from batchnorm import _collectives


@dataclass
class Config:
    """Benchmark configuration."""

    procs: int = 2
    """Processes (gloo on 127.0.0.1)."""
    batch: int = 32
    """Examples per process per step."""
    channels: int = 32
    """Channels of every conv layer."""
    size: int = 16
    """Input height and width."""
    layers: int = 4
    """Conv + BN + ReLU blocks."""
    reps: int = 30
    """Timed steps per variant (after 3 warm-up steps)."""
    threads: int = 1
    """torch threads per process."""


def make_net(cfg: Config, bn: type[nn.Module]) -> nn.Module:
    blocks: list[nn.Module] = []
    c_in = 3
    for _ in range(cfg.layers):
        blocks += [nn.Conv2d(c_in, cfg.channels, 3, padding=1, bias=False), bn(cfg.channels), nn.ReLU()]
        c_in = cfg.channels
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cfg.channels, 10))


def _worker(rank: int, port: int, cfg: Config, queue) -> None:
    torch.set_num_threads(cfg.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=cfg.procs,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.manual_seed(0)
    variants = {
        "sync (batchnorm.SyncBatchNorm)": batchnorm.convert_sync_batchnorm(make_net(cfg, batchnorm.BatchNorm2d)),
        "local (batchnorm.BatchNorm2d)": make_net(cfg, batchnorm.BatchNorm2d),
        "local (torch.nn.BatchNorm2d)": make_net(cfg, nn.BatchNorm2d),
    }
    steps = {}
    for name, net in variants.items():
        ddp = DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        steps[name] = (ddp, opt)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, generator=gen)
    y = torch.randint(0, 10, (cfg.batch,), generator=gen)

    # (enter, leave) perf_counter times of SyncBatchNorm's all_reduce calls in this step;
    # perf_counter is CLOCK_MONOTONIC on Linux, one clock for all processes of the machine
    calls: list[tuple[float, float]] = []
    all_reduce_sum = _collectives.all_reduce_sum  # what SyncBatchNorm calls

    def timed_all_reduce(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return all_reduce_sum(*args, **kwargs)
        finally:
            calls.append((t0, time.perf_counter()))

    def step(name: str) -> float:
        ddp, opt = steps[name]  # noqa: F821 - bound above; deleted only after the last step
        dist.barrier()  # start together: time the step, not the wait for a slower peer
        calls.clear()
        t0 = time.perf_counter()
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in steps}
    step_calls: list[list[tuple[float, float]]] = []  # per timed sync step
    try:
        _collectives.all_reduce_sum = timed_all_reduce  # SyncBatchNorm's collectives only
        for i in range(cfg.reps + 3):
            for name in steps:  # interleaved
                t = step(name)
                if i >= 3:
                    times[name].append(t)
                    if name.startswith("sync"):
                        step_calls.append(list(calls))
    finally:
        _collectives.all_reduce_sum = all_reduce_sum
    every_rank: list[list[list[tuple[float, float]]] | None] = [None] * cfg.procs
    dist.all_gather_object(every_rank, step_calls)
    # latency of one layer's collectives: forward (W, 1 + 2C) and backward (2C,) float64
    c = cfg.channels
    lat = {
        "forward all_reduce": torch.zeros(cfg.procs, 1 + 2 * c, dtype=torch.float64),
        "backward all_reduce": torch.zeros(2 * c, dtype=torch.float64),
    }
    lat_t: dict[str, list[float]] = {k: [] for k in lat}
    for i in range(cfg.reps + 3):
        for k, buf in lat.items():
            dist.barrier()
            t0 = time.perf_counter()
            _collectives.all_reduce_sum(buf, None, "bench_sync", "a latency probe")
            if i >= 3:
                lat_t[k].append(time.perf_counter() - t0)
    try:  # what PyTorch's own layer does here (gloo initialized, CPU input)
        torch.nn.SyncBatchNorm(4).train()(torch.randn(4, 4, 2, 2))
        torch_sync = "ran"
    except ValueError as e:
        torch_sync = "ValueError: " + str(e).splitlines()[0][:60] + "..."
    if rank == 0:
        sync, local = times["sync (batchnorm.SyncBatchNorm)"], times["local (batchnorm.BatchNorm2d)"]
        paired = statistics.median(a / b for a, b in zip(sync, local))
        queue.put(
            (
                {k: statistics.median(v) for k, v in times.items()},
                paired,
                _split_collective_time(every_rank),
                {k: statistics.median(v) for k, v in lat_t.items()},
                torch_sync,
            )
        )
    del steps, variants
    gc.collect()  # free the DDP objects (reference cycles) before the group: see examples/ddp_syncbn.py
    dist.destroy_process_group()


def _split_collective_time(every_rank: list) -> tuple[float, float, float]:
    """Rank 0's time inside SyncBatchNorm's collectives in the median step (by that time), split
    into waiting for the later peer to arrive (its enter - ours) and the rest (our leave - the
    last enter: the transfer plus being scheduled again); returns (total, waiting, rest).

    every_rank[r][step] = [(enter, leave), ...] in call order (every rank makes the same calls).
    """
    per_step = []
    for per_rank in zip(*every_rank):  # one step: each rank's calls
        waiting = rest = 0.0
        for call in zip(*per_rank):  # one collective: each rank's (enter, leave)
            last_enter = max(enter for enter, _ in call)
            enter0, leave0 = call[0]
            waiting += last_enter - enter0
            rest += leave0 - last_enter
        per_step.append((waiting + rest, waiting, rest))
    per_step.sort()
    return per_step[len(per_step) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in vars(Config()).items():
        p.add_argument("--" + name, type=type(default), default=default)
    cfg = Config(**vars(p.parse_args(argv)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_worker, args=(port, cfg, queue), nprocs=cfg.procs, join=True)
    times, paired, split, lat, torch_sync = queue.get()
    print(
        f"{cfg.procs} processes, gloo/CPU, {cfg.threads} thread(s) each; per rank: batch {cfg.batch}, "
        f"{cfg.layers} x (conv {cfg.channels}ch + BN + ReLU) on {cfg.size}x{cfg.size}; "
        f"DDP training step, median of {cfg.reps}"
    )
    local = times["local (batchnorm.BatchNorm2d)"]
    for name, t in times.items():
        print(f"  {name:34s} {t * 1e3:8.2f} ms   x{t / local:.2f} vs local ours")
    per_layer = sum(lat.values())
    print(f"median of the paired per-step ratios sync / local ours: x{paired:.2f} (goal <= 1.2)")
    print(
        f"one SyncBatchNorm layer's collectives per step: forward {lat['forward all_reduce'] * 1e6:.0f} us + "
        f"backward {lat['backward all_reduce'] * 1e6:.0f} us; x {cfg.layers} layers = {per_layer * cfg.layers * 1e3:.2f} ms "
        f"(measured sync - local: {(times['sync (batchnorm.SyncBatchNorm)'] - local) * 1e3:.2f} ms)"
    )
    inside, waiting, after = split
    print(
        f"time inside SyncBatchNorm's all_reduce calls per sync step (rank 0): {inside * 1e3:.2f} ms = "
        f"waiting for the peer to arrive {waiting * 1e3:.2f} ms + from the last arrival to return "
        f"(transfer, being scheduled again) {after * 1e3:.2f} ms (the median step)"
    )
    print(f"torch.nn.SyncBatchNorm, same processes, CPU input: {torch_sync}")


if __name__ == "__main__":
    main()
