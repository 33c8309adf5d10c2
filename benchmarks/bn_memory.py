"""Memory saved for backward: BN + LeakyReLU vs the fused ``BatchNormAct`` (In-Place ABN idea).

Run: PYTHONPATH=src python -m benchmarks.bn_memory [--quick]

Bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd
saves for backward passes through the pack hook, and we add up the *distinct* storages (a tensor
saved twice, or saved by two layers, counts once). Two settings:

1. one norm + activation layer on a conv-sized input: only the layer's own saved tensors;
2. a stack of 20 Linear -> norm + activation blocks: the whole model,
   where the fused layer's saved output is also the next Linear's saved input.

Time: training forward + backward of the same layer, interleaved rounds, medians, in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import batchnorm


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while running ``fn()``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def norm_act(kind: str, c: int, dims: int) -> nn.Module:
    """kind: "torch" (torch BN + LeakyReLU), "ours" (our BN + LeakyReLU), "fused" (BatchNormAct)."""
    bn_t = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
    bn_o = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d}[dims]
    act_o = {1: batchnorm.BatchNormAct1d, 2: batchnorm.BatchNormAct2d}[dims]
    if kind == "torch":
        return nn.Sequential(bn_t(c), nn.LeakyReLU(0.01))
    if kind == "ours":
        return nn.Sequential(bn_o(c), nn.LeakyReLU(0.01))
    return act_o(c, "leaky_relu", negative_slope=0.01)


def stack(kind: str, width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=False), norm_act(kind, width, 1)]
    return nn.Sequential(*layers)


def time_fwd_bwd(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds of forward + backward per model, one call of each per round, rotated."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    g = torch.randn_like(models[names[0]](x))
    warmup = 3  # torch's first Linear calls take ~1 s each here (oneDNN set-up), numba loads its cache
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            xi = x.detach().requires_grad_()
            t0 = time.perf_counter()
            models[n](xi).backward(g)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
    return {n: statistics.median(v) for n, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bn_memory", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller inputs, 5 rounds")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    shape = (16, 64, 56, 56) if a.quick else (32, 64, 56, 56)
    rounds = 5 if a.quick else 11
    kinds = ("torch", "ours", "fused")
    labels = {"torch": "torch BN + LeakyReLU", "ours": "our BN + LeakyReLU", "fused": "BatchNormAct"}

    x = torch.randn(shape, requires_grad=True)
    layers = {k: norm_act(k, shape[1], 2) for k in kinds}
    mem = {k: saved_bytes(lambda k=k: layers[k](x)) for k in kinds}
    t = time_fwd_bwd(layers, x, rounds)
    print(f"1) one layer, input {tuple(shape)} float32 ({x.numel() * 4 / 2**20:.1f} MiB)")
    print(f"{'':<24} {'saved MiB':>10} {'vs torch':>9} {'fwd+bwd ms':>11} {'vs torch':>9}")
    for k in kinds:
        print(
            f"{labels[k]:<24} {mem[k] / 2**20:>10.2f} {mem[k] / mem['torch']:>9.3f} "
            f"{t[k] * 1e3:>11.2f} {t[k] / t['torch']:>9.3f}"
        )
    print(
        f"BatchNormAct vs our BN + LeakyReLU: saved {mem['fused'] / mem['ours']:.3f}x, time {t['fused'] / t['ours']:.3f}x"
    )

    width, depth, batch = (256, 20, 128) if a.quick else (512, 20, 256)
    xs = torch.randn(batch, width, requires_grad=True)
    nets = {k: stack(k, width, depth) for k in kinds}
    mem2 = {k: saved_bytes(lambda k=k: nets[k](xs)) for k in kinds}
    t2 = time_fwd_bwd(nets, xs, rounds)
    print()
    print(f"2) {depth} x (Linear({width}, {width}) -> norm + LeakyReLU), batch {batch}: whole model")
    print(f"{'':<24} {'saved MiB':>10} {'vs torch':>9} {'fwd+bwd ms':>11} {'vs torch':>9}")
    for k in kinds:
        print(
            f"{labels[k]:<24} {mem2[k] / 2**20:>10.2f} {mem2[k] / mem2['torch']:>9.3f} "
            f"{t2[k] * 1e3:>11.2f} {t2[k] / t2['torch']:>9.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
