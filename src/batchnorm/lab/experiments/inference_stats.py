"""``inference-stats``: which statistics should normalize a test example? Batch statistics vs
the running average vs population statistics (Alg. 2 and exact), single-example inference,
and how noisy the statistics of a batch of 8 are.

A BN MLP (3 hidden layers of 100 ReLU units, BN before every ReLU) is trained on digits
with batch 60; then the same trained weights are evaluated with every choice of statistics.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..datasets import load
from ..models import MLP, blocks
from ..popstats import population_statistics
from ..progress import Progress
from ..training import TrainSpec, evaluate, train

ID = "inference-stats"
DESCRIPTION = "Test-time BN statistics: batch vs running average vs population (Alg. 2, exact); single-example inference; batch-8 noise"
QUICK_SECONDS = 6.0
EXPLANATION = """
During training, BN normalizes each unit with the mean and variance of the current minibatch.
At test time that is not acceptable: a prediction would depend on which other examples happen
to share the batch, and a single example could not be normalized at all (its variance over a
batch of one is zero). So inference uses fixed statistics, and there are several ways to get
them. PyTorch keeps an exponential running average of the batch statistics during training
(momentum 0.1). Ioffe & Szegedy's Alg. 2 freezes the trained weights and averages the
statistics of many training batches of the training size m, with the unbiased correction
m/(m-1) for the variance. The exact population statistics are the mean and variance of each
layer's input over the whole training set, computed layer by layer through the inference
network (batchnorm.recompute_statistics).

This experiment trains one BN network on the digits (3 hidden layers of 100 ReLU units, batch
60) and evaluates the same weights with: the running average; Alg. 2 statistics; exact
population statistics; and the test batch's own statistics for test batches of 2 to 360
examples (averaged over random groupings of the test set). It checks that with fixed
statistics an example gets the same output alone as inside a batch, and it measures how much
the statistics of a small batch scatter around the population values: for m examples drawn
without replacement from N, sampling theory predicts that the batch mean scatters with a
standard deviation of sigma * sqrt((N - m) / (m (N - 1))) — about 35% of sigma for m = 8.

Choices: SGD lr 0.1, He initialization, a fixed number of steps; evaluation batches are drawn
from the test set for batch-statistics inference and from the training set for the noise
measurement (first BN layer, whose input does not depend on other BN layers).
"""

_BATCH_SIZES = (2, 4, 8, 16, 32, 60, 120, 360)
_NOISE_SIZES = (2, 4, 8, 16, 32, 60, 128)


def _settings(cfg: RunConfig) -> dict[str, Any]:
    return {
        "hidden": [100, 100, 100],
        "activation": "relu",
        "norm": "batchnorm.BatchNorm1d before every ReLU (eps 1e-5, momentum 0.1)",
        "init": "He: N(0, 2/fan_in), biases 0",
        "optimizer": "SGD, no momentum, no weight decay",
        "lr": 0.1,
        "batch_size": 60,
        "steps": cfg.pick(tiny=30, quick=2000, full=20000),
        "test_batch_sizes": list(_BATCH_SIZES),
        "test_batch_repeats": cfg.pick(tiny=2, quick=10, full=50),
        "noise_batch_sizes": list(_NOISE_SIZES),
        "noise_batches": cfg.pick(tiny=20, quick=500, full=5000),
        "alg2": "one pass over the training set in batches of 60: E[mu_B], 60/59 E[sigma_B^2]",
        "exact": "batchnorm.recompute_statistics(mode='eval', passes=depth+1): whole training set, inference network",
    }


@torch.no_grad()
def _batch_stats_accuracy(model: nn.Module, x: Tensor, y: Tensor, size: int, repeats: int, generator: torch.Generator) -> float:
    """Mean accuracy when each test batch of ``size`` is normalized by its own statistics."""
    net = copy.deepcopy(model)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False  # batch statistics, buffers untouched
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    correct = 0
    seen = 0
    for _ in range(repeats):
        order = torch.randperm(x.shape[0], generator=generator)
        usable = (x.shape[0] // size) * size
        for start in range(0, usable, size):
            idx = order[start : start + size]
            correct += int((net(x[idx]).argmax(1) == y[idx]).sum())
            seen += size
    return correct / seen


@torch.no_grad()
def _first_layer_noise(model: nn.Module, x: Tensor, sizes: tuple[int, ...], batches: int, generator: torch.Generator) -> dict[str, Any]:
    """Scatter of the batch mean and variance of the first BN layer's input around the
    training-set values, in units of the population std (float64).

    Shape: the first BN's input is (N, C); statistics per unit, then averaged over units.
    """
    first = list(blocks(model))[0]
    h = first.layer(x).double()  # (N, C)
    n = h.shape[0]
    mu = h.mean(0)
    sigma = h.std(0, unbiased=False)
    out: dict[str, Any] = {"m": [], "mean_scatter": [], "mean_scatter_theory": [], "var_rel_scatter": []}
    for m in sizes:
        zs = []
        vs = []
        for _ in range(batches):
            idx = torch.randperm(n, generator=generator)[:m]
            hb = h[idx]
            zs.append((hb.mean(0) - mu) / sigma)
            vs.append(hb.var(0, unbiased=False) / sigma**2)
        z = torch.stack(zs)  # (batches, C)
        v = torch.stack(vs)  # (batches, C)
        out["m"].append(m)
        out["mean_scatter"].append(float(z.std(0).mean()))
        out["mean_scatter_theory"].append(math.sqrt((n - m) / (m * (n - 1))))
        out["var_rel_scatter"].append(float(v.std(0).mean()))
    return out


def _stats_of(model: nn.Module) -> list[dict[str, list[float]]]:
    return [{"mean": b.norm.running_mean.tolist(), "var": b.norm.running_var.tolist()} for b in blocks(model)]


def run(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Train once; evaluate with every kind of statistics; measure batch noise."""
    from ... import recompute_statistics

    s = _settings(cfg)
    data = load(cfg.data, cfg.seed, small=cfg.mode == "tiny")
    model = MLP(data.features, s["hidden"], data.classes, act="relu", norm="bn", init_std="he",
                generator=torch.Generator().manual_seed(cfg.seed))
    with progress.task("train BN net", total=s["steps"]) as tick:
        train(model, data.train_x, data.train_y, TrainSpec(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"]),
              generator=torch.Generator().manual_seed(cfg.seed + 1), tick=tick)
    model.eval()
    ema_acc = evaluate(model, data.test_x, data.test_y)[1]
    alg2 = population_statistics(model, data.train_x, batch_size=s["batch_size"], generator=torch.Generator().manual_seed(cfg.seed + 2))
    alg2_acc = evaluate(alg2, data.test_x, data.test_y)[1]
    exact = copy.deepcopy(model)
    recompute_statistics(exact, list(data.train_x.split(256)), mode="eval", passes=len(s["hidden"]) + 1)
    exact.eval()
    exact_acc = evaluate(exact, data.test_x, data.test_y)[1]

    gen = torch.Generator().manual_seed(cfg.seed + 3)
    batch_acc = {str(b): _batch_stats_accuracy(model, data.test_x, data.test_y, b, s["test_batch_repeats"], gen) for b in _BATCH_SIZES}

    with torch.no_grad():
        together = exact(data.test_x)
        alone = torch.cat([exact(data.test_x[i : i + 1]) for i in range(data.test_x.shape[0])])
    single_delta = float((together - alone).abs().max())
    single_fails = ""
    try:
        with torch.no_grad():
            probe = copy.deepcopy(model).train()
            probe(data.test_x[:1])
    except ValueError as err:
        single_fails = str(err)

    noise = _first_layer_noise(model, data.train_x, _NOISE_SIZES, s["noise_batches"], torch.Generator().manual_seed(cfg.seed + 4))

    def rel_diff(a: list[dict[str, list[float]]], b: list[dict[str, list[float]]], key: str) -> list[float]:
        out = []
        for la, lb in zip(a, b):
            va = np.asarray(la[key])
            vb = np.asarray(lb[key])
            scale = np.sqrt(np.asarray(lb["var"])) if key == "mean" else np.abs(vb)
            out.append(float(np.max(np.abs(va - vb) / np.maximum(scale, 1e-12))))
        return out

    st_ema = _stats_of(model)
    st_alg2 = _stats_of(alg2)
    st_exact = _stats_of(exact)
    metrics = {
        "test_acc": {"running_average": ema_acc, "alg2_population": alg2_acc, "exact_population": exact_acc},
        "test_acc_batch_statistics": batch_acc,
        "single_example_max_logit_delta": single_delta,
        "single_example_batch_statistics_error": single_fails,
        "first_layer_noise": noise,
        "stat_difference_vs_exact": {
            "running_average_mean": rel_diff(st_ema, st_exact, "mean"),
            "running_average_var": rel_diff(st_ema, st_exact, "var"),
            "alg2_mean": rel_diff(st_alg2, st_exact, "mean"),
            "alg2_var": rel_diff(st_alg2, st_exact, "var"),
        },
    }
    return {"config": s, "data": data.describe(), "metrics": metrics}


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Fixed statistics agree; batch statistics degrade with small batches; theory of noise."""
    m = results["metrics"]
    acc = m["test_acc"]
    out = []
    spread = max(acc.values()) - min(acc.values())
    out.append(
        {
            "claim": "Running average, Alg. 2 population statistics and exact population statistics give the same test accuracy (within 1 pp)",
            "holds": bool(spread <= 0.01),
            "evidence": f"running average {100 * acc['running_average']:.2f}%, Alg. 2 {100 * acc['alg2_population']:.2f}%, "
            f"exact {100 * acc['exact_population']:.2f}%",
        }
    )
    d = m["stat_difference_vs_exact"]
    out.append(
        {
            "claim": "Alg. 2's averaged batch moments are close to the exact population statistics (means within 0.1 std, variances within 10%)",
            "holds": bool(max(d["alg2_mean"]) <= 0.1 and max(d["alg2_var"]) <= 0.10),
            "evidence": f"largest difference per BN layer — mean (in stds): {', '.join(f'{v:.3f}' for v in d['alg2_mean'])}; "
            f"variance (relative): {', '.join(f'{v:.3f}' for v in d['alg2_var'])}; running average: "
            f"{', '.join(f'{v:.3f}' for v in d['running_average_mean'])} / {', '.join(f'{v:.3f}' for v in d['running_average_var'])}",
        }
    )
    ba = m["test_acc_batch_statistics"]
    pop = acc["exact_population"]
    out.append(
        {
            "claim": "Normalizing test batches by their own statistics degrades as the batch shrinks: batch of 8 at least 1 pp below population statistics, batch of 2 at least 10 pp below",
            "holds": bool(ba["8"] <= pop - 0.01 and ba["2"] <= pop - 0.10),
            "evidence": ", ".join(f"B={k}: {100 * v:.1f}%" for k, v in ba.items()) + f"; population statistics {100 * pop:.1f}%",
        }
    )
    out.append(
        {
            "claim": "With fixed statistics a prediction does not depend on its batch-mates: each test example alone gives the same logits as inside the full batch",
            "holds": bool(m["single_example_max_logit_delta"] < 1e-4),
            "evidence": f"max |logit difference| {m['single_example_max_logit_delta']:.1e}; with batch statistics a single example is refused: "
            f"{m['single_example_batch_statistics_error'].split(' (')[0] or '(not refused)'}",
        }
    )
    noise = m["first_layer_noise"]
    i = noise["m"].index(8)
    measured = noise["mean_scatter"][i]
    theory = noise["mean_scatter_theory"][i]
    out.append(
        {
            "claim": "Batch-8 statistics are noisy as sampling theory predicts: the batch mean scatters by sigma*sqrt((N-m)/(m(N-1))) (~0.35 sigma), within 15%",
            "holds": bool(abs(measured / theory - 1) <= 0.15),
            "evidence": f"first BN layer, m=8: measured {measured:.3f} sigma vs theory {theory:.3f} sigma; batch variance scatters by "
            f"{noise['var_rel_scatter'][i]:.2f} of sigma^2",
        }
    )
    return out


def figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Accuracy by kind of statistics and test batch size; noise vs batch size."""
    from ..figures import pyplot, save

    plt = pyplot()
    m = results["metrics"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    ba = m["test_acc_batch_statistics"]
    sizes = [int(k) for k in ba]
    axes[0].plot(sizes, [ba[str(k)] for k in sizes], "o-", color="tab:purple", label="each test batch's own statistics")
    for (key, label), color, ls in zip(
        (("running_average", "running average (EMA)"), ("alg2_population", "Alg. 2 population statistics"), ("exact_population", "exact population statistics")),
        ("tab:red", "tab:green", "black"),
        ("-", "--", ":"),
    ):
        axes[0].axhline(m["test_acc"][key], color=color, linestyle=ls, label=label)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(sizes, [str(k) for k in sizes])
    axes[0].set_xlabel("test batch size B (batch statistics)")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("Which statistics normalize a test example")
    axes[0].grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)

    noise = m["first_layer_noise"]
    axes[1].plot(noise["m"], noise["mean_scatter"], "o-", color="tab:blue", label="batch mean: std of (mu_B - mu)/sigma")
    axes[1].plot(noise["m"], noise["mean_scatter_theory"], ":", color="black", label="theory sqrt((N-m)/(m(N-1)))")
    axes[1].plot(noise["m"], noise["var_rel_scatter"], "s-", color="tab:orange", label="batch variance: std of sigma_B^2/sigma^2")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks(noise["m"], [str(k) for k in noise["m"]])
    axes[1].set_yscale("log")
    axes[1].set_xlabel("batch size m")
    axes[1].set_ylabel("scatter, in population units")
    axes[1].set_title("Noise of batch statistics (first BN layer)")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return [save(fig, Path(outdir) / "inference_statistics.png")]
