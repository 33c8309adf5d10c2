"""Population statistics: accuracy of three estimators, and the cost of ours.

    PYTHONPATH=src python -m benchmarks.bench_stats [--repeats 7] [--threads 1]

Accuracy: a BatchNorm2d sees the data directly, so the reference is exact: NumPy float64 mean
and unbiased variance of the concatenated data. Three data sets, 64 batches of 32 x 8 x 8 x 8:

  (a) iid      class-dependent means, batches drawn at random
  (b) sorted   the same samples, batches sorted by class (non-i.i.d.)
  (c) 1e4      mean 1e4, std 1e-2, float32

Estimators:
  ours        batchnorm.recompute_statistics (float64 (count, mean, M2), Chan merge)
  update_bn   torch.optim.swa_utils.update_bn (cumulative mean of per-batch statistics)
  fvcore      our re-implementation of PreciseBN's population-variance estimator: per batch
              E[x^2] = mean^2 + var_biased in float32, weighted by counts, var = E[x^2] - E[x]^2

Reported: max over channels of |var - var_ref| / var_ref and of |mean - mean_ref| / scale with
scale = max(|mean_ref|, std_ref) (the stored buffers are float32, so ~6e-8 is the floor).

Cost: a ResNet-style conv net (8 BN layers) over 32 batches of 32 x 3 x 32 x 32; time of
recompute_statistics and update_bn against a plain ``torch.no_grad()`` eval pass over the same
batches, interleaved, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from batchnorm import recompute_statistics

C = 8


def make_data(case: str, gen: torch.Generator) -> list[torch.Tensor]:
    """64 batches of (32, C, 8, 8) float32 for one case."""
    n_batches, bs, classes = 64, 32, 8
    labels = torch.arange(n_batches * bs) % classes
    if case == "1e4":
        x = 1e4 + 1e-2 * torch.randn(n_batches * bs, C, 8, 8, generator=gen, dtype=torch.float64)
        return list(x.float().split(bs))
    centres = 3.0 * torch.randn(classes, C, 1, 1, generator=gen)
    x = centres[labels] + torch.randn(n_batches * bs, C, 8, 8, generator=gen)
    order = torch.argsort(labels, stable=True) if case == "sorted" else torch.randperm(len(x), generator=gen)
    return list(x[order].split(bs))


def fvcore_style(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """PreciseBN's estimator (re-implemented): float32 E[x^2] - E[x]^2 pooled over batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    sums = {id(bn): [0, torch.zeros(bn.num_features), torch.zeros(bn.num_features)] for bn in bns}
    hooks = []
    for bn in bns:
        bn.momentum = 1.0  # running stats := this batch's statistics

        def hook(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = args[0]
            n = x.numel() // x.shape[1]
            mean = m.running_mean.clone()
            var_biased = m.running_var * (n - 1) / n
            acc = sums[id(m)]
            acc[0] += n
            acc[1] += mean * n
            acc[2] += (mean * mean + var_biased) * n  # E[x^2] of the batch, in float32

        hooks.append(bn.register_forward_hook(hook))
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    for bn in bns:
        n, s1, s2 = sums[id(bn)]
        mean = s1 / n
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(s2 / n - mean * mean)
    model.eval()


def errors(bn: nn.BatchNorm2d, batches: list[torch.Tensor]) -> tuple[float, float]:
    data = torch.cat(batches).double().numpy()
    mean = data.mean(axis=(0, 2, 3))
    var = data.var(axis=(0, 2, 3), ddof=1)
    est_mean = bn.running_mean.double().numpy()
    est_var = bn.running_var.double().numpy()
    scale = np.maximum(np.abs(mean), np.sqrt(var))
    return float(np.max(np.abs(est_var - var) / var)), float(np.max(np.abs(est_mean - mean) / scale))


def accuracy_table() -> None:
    gen = torch.Generator().manual_seed(0)
    estimators: dict[str, Callable[[nn.Module, list[torch.Tensor]], object]] = {
        "ours": lambda m, b: recompute_statistics(m, b),
        "update_bn": lambda m, b: update_bn(b, m),
        "fvcore-style": fvcore_style,
    }
    print("relative error vs NumPy float64 statistics of the concatenated data")
    print(f"{'case':<8} {'estimator':<13} {'var rel err':>12} {'mean rel err':>13}")
    for case in ("iid", "sorted", "1e4"):
        batches = make_data(case, gen)
        for name, estimate in estimators.items():
            model = nn.Sequential(nn.BatchNorm2d(C)).eval()
            estimate(model, batches)
            var_err, mean_err = errors(model[0], batches)
            print(f"{case:<8} {name:<13} {var_err:>12.3g} {mean_err:>13.3g}")


class Block(nn.Module):
    """conv-bn-relu-conv-bn + identity, ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        Block(32), nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        Block(64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10), nn.BatchNorm1d(10),
    )  # fmt: skip


def cost_table(repeats: int) -> None:
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 3, 32, 32, generator=gen) for _ in range(32)]
    model = convnet().eval()
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

    def plain() -> None:
        with torch.no_grad():
            for b in batches:
                model(b)

    def ours() -> None:
        recompute_statistics(model, batches)

    theirs_model = copy.deepcopy(model)

    def theirs() -> None:
        update_bn(batches, theirs_model)

    runs: dict[str, list[float]] = {"plain no-grad pass": [], "ours": [], "update_bn": []}
    fns = {"plain no-grad pass": plain, "ours": ours, "update_bn": theirs}
    plain()  # warm-up
    ours()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    base = statistics.median(runs["plain no-grad pass"])
    print(
        f"\ncost over 32 batches of 32x3x32x32, ResNet-style net with {n_bn} BN layers, "
        f"{torch.get_num_threads()} thread(s), median of {repeats}"
    )
    for name, ts in runs.items():
        med = statistics.median(ts)
        print(f"{name:<20} {med * 1e3:8.1f} ms   {med / base:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    accuracy_table()
    cost_table(args.repeats)


if __name__ == "__main__":
    main()
