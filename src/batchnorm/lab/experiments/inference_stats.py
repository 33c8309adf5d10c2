"""``inference-stats``: which statistics should normalize a test example? Batch statistics vs
the running average vs population statistics (Alg. 2 and exact), single-example inference,
and how noisy the statistics of a batch of 8 are — judged over seeds.
Setup, the rules fixed before any run and each setting's source: ``inference_stats.md``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..claims_spec import Claims, Declared
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import mlp_for, seeded, train_seeds
from ..experiment import Experiment, per_seed_values
from ..models import blocks
from ..popstats import population_statistics
from ..progress import Progress
from ..training import TrainSpec, evaluate
from ..verdict import part

ID = "inference-stats"
DESCRIPTION = "Test-time BN statistics: batch vs running average vs population (Alg. 2, exact); single-example inference; batch-8 noise"
QUICK_SECONDS = 6.0
_BATCH_SIZES = (2, 4, 8, 16, 32, 60, 120, 360)
_NOISE_SIZES = (2, 4, 8, 16, 32, 60, 128)
_FIXED = {  # the fixed statistics in the figure: label, color, line style
    "running_average": ("running average (EMA)", "tab:red", "-"),
    "alg2_population": ("Alg. 2 population statistics", "tab:green", "--"),
    "exact_population": ("exact population statistics", "black", ":"),
}


@dataclass(frozen=True)
class Settings(Declared):
    """The settings the code computes or reads; every constant one is in ``inference_stats.settings.toml``
    (each one's meaning and source: ``inference_stats.md``)."""

    steps: int
    test_batch_repeats: int
    noise_batches: int
    hidden: tuple[int, ...]
    activation: str
    lr: float
    batch_size: int
    test_batch_sizes: tuple[int, ...]
    noise_batch_sizes: tuple[int, ...]


@torch.no_grad()
def _batch_stats_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, size: int, repeats: int, generator: torch.Generator
) -> float:
    """Mean accuracy when each test batch of ``size`` is normalized by its own statistics."""
    net = copy.deepcopy(model).eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False  # batch statistics, buffers untouched
            m.train()
    correct = seen = 0
    for _ in range(repeats):
        order = torch.randperm(x.shape[0], generator=generator)
        usable = (x.shape[0] // size) * size
        for start in range(0, usable, size):
            idx = order[start : start + size]
            correct += int((net(x[idx]).argmax(1) == y[idx]).sum())
            seen += size
    return correct / seen


@torch.no_grad()
def _first_layer_noise(
    model: nn.Module, x: Tensor, sizes: Sequence[int], batches: int, generator: torch.Generator
) -> dict[str, Any]:
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
        zs, vs = [], []
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


def _rel_diff(a: list[dict[str, list[float]]], b: list[dict[str, list[float]]], key: str) -> list[float]:
    """Per BN layer: the largest |a - b| over units, means in units of b's std, variances relative to b's."""
    out = []
    for la, lb in zip(a, b):
        va, vb = np.asarray(la[key]), np.asarray(lb[key])
        scale = np.sqrt(np.asarray(lb["var"])) if key == "mean" else np.abs(vb)
        out.append(float(np.max(np.abs(va - vb) / np.maximum(scale, 1e-12))))
    return out


def _measure(s: Settings, data: Dataset, model: nn.Module, seed: int) -> dict[str, Any]:
    """Every inference measurement of one seed's trained network."""
    from ... import recompute_statistics

    model.eval()
    ema_acc = evaluate(model, data.test_x, data.test_y)[1]
    alg2 = population_statistics(model, data.train_x, batch_size=s.batch_size, generator=seeded(seed + 2))
    alg2_acc = evaluate(alg2, data.test_x, data.test_y)[1]
    exact = copy.deepcopy(model)
    recompute_statistics(exact, list(data.train_x.split(256)), mode="eval", passes=len(s.hidden) + 1)
    exact.eval()
    exact_acc = evaluate(exact, data.test_x, data.test_y)[1]

    gen = seeded(seed + 3)
    sizes = [b for b in s.test_batch_sizes if b <= data.test_x.shape[0]]
    batch_acc = {
        str(b): _batch_stats_accuracy(model, data.test_x, data.test_y, b, s.test_batch_repeats, gen) for b in sizes
    }

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

    noise = _first_layer_noise(model, data.train_x, s.noise_batch_sizes, s.noise_batches, seeded(seed + 4))
    st_ema, st_alg2, st_exact = _stats_of(model), _stats_of(alg2), _stats_of(exact)
    return {
        "test_acc": {"running_average": ema_acc, "alg2_population": alg2_acc, "exact_population": exact_acc},
        "test_acc_batch_statistics": batch_acc,
        "single_example_max_logit_delta": single_delta,
        "single_example_batch_statistics_error": single_fails,
        "first_layer_noise": noise,
        "stat_difference_vs_exact": {
            f"{name}_{key}": _rel_diff(st, st_exact, key)
            for name, st in (("running_average", st_ema), ("alg2", st_alg2))
            for key in ("mean", "var")
        },
    }


def _claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Fixed statistics agree; batch statistics degrade with small batches; theory of noise."""
    t = results["config"]
    seeds = [int(v) for v in results["metrics"]["seeds"]]

    def col(read: Any) -> list[float]:
        return per_seed_values(results, read)

    def pct(key: str) -> list[float]:
        return col(lambda m: 100.0 * m["test_acc"][key])

    def fmt(v: Sequence[float], spec: str = ".2f") -> str:
        return ", ".join(format(x, spec) for x in v)

    ema, alg2, exact = pct("running_average"), pct("alg2_population"), pct("exact_population")
    band = float(t["fixed_statistics_band_pp"])
    mean_diff = col(lambda m: max(m["stat_difference_vs_exact"]["alg2_mean"]))
    var_diff = col(lambda m: max(m["stat_difference_vs_exact"]["alg2_var"]))
    b8 = col(lambda m: 100.0 * m["test_acc_batch_statistics"]["8"])
    b2 = col(lambda m: 100.0 * m["test_acc_batch_statistics"]["2"])
    delta = col(lambda m: m["single_example_max_logit_delta"])

    def noise(m: dict[str, Any]) -> float:
        nz = m["first_layer_noise"]
        i = nz["m"].index(8)
        return nz["mean_scatter"][i] / nz["mean_scatter_theory"][i] - 1.0

    ratio = col(noise)
    first = results["metrics"]["per_seed"][0]
    refused = first["single_example_batch_statistics_error"].split(" (")[0] or "(not refused)"
    nz0 = first["first_layer_noise"]
    i8 = nz0["m"].index(8)
    make = Claims(__name__, results, var_pct=100 * t["alg2_var_within"], noise_pct=100 * t["noise_theory_band"])
    return [
        make(
            "fixed_statistics_agree",
            a=ema,
            b=exact,
            also=[part(alg2, exact, above=-band, below=band)],
            evidence=f"test accuracy per seed (%): running average {fmt(ema)}; Alg. 2 {fmt(alg2)}; exact {fmt(exact)}",
        ),
        make(
            "alg2_close_to_exact",
            a=mean_diff,
            also=[part(var_diff, below=float(t["alg2_var_within"]))],
            evidence=f"largest difference over layers and units, per seed — means (in stds): {fmt(mean_diff, '.3f')}; variances "
            f"(relative): {fmt(var_diff, '.3f')}; running average (seed {seeds[0]}, per layer): "
            f"{fmt(first['stat_difference_vs_exact']['running_average_mean'], '.3f')} / "
            f"{fmt(first['stat_difference_vs_exact']['running_average_var'], '.3f')}",
        ),
        make(
            "small_batches_degrade",
            a=exact,
            b=b8,
            also=[part(exact, b2, above=float(t["batch2_drop_at_least_pp"]))],
            evidence=f"test accuracy per seed (%): B=8 {fmt(b8, '.1f')}; B=2 {fmt(b2, '.1f')}; population statistics {fmt(exact, '.1f')}; "
            f"seed {seeds[0]} over B: "
            + ", ".join(f"{k}: {100 * v:.1f}" for k, v in first["test_acc_batch_statistics"].items()),
        ),
        make(
            "independent_of_batch_mates",
            a=delta,
            evidence=f"max |logit difference| per seed: {fmt(delta, '.1e')}; with batch statistics a single example is refused: {refused}",
        ),
        make(
            "noise_as_theory",
            a=ratio,
            evidence=f"first BN layer, m=8, measured / theory - 1 per seed: {fmt(ratio, '+.3f')}; seed {seeds[0]}: "
            f"{nz0['mean_scatter'][i8]:.3f} sigma vs {nz0['mean_scatter_theory'][i8]:.3f} sigma; batch variance scatters by "
            f"{nz0['var_rel_scatter'][i8]:.2f} of sigma^2",
        ),
    ]


def _figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Accuracy by kind of statistics and test batch size; noise vs batch size (first seed)."""
    from ..figures import dress, pyplot, save

    plt = pyplot()
    m = results["metrics"]["per_seed"][0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    ba = m["test_acc_batch_statistics"]
    sizes = [int(k) for k in ba]
    axes[0].plot(sizes, [ba[str(k)] for k in sizes], "o-", color="tab:purple", label="each test batch's own statistics")
    for key, (label, color, ls) in _FIXED.items():
        axes[0].axhline(m["test_acc"][key], color=color, linestyle=ls, label=label)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(sizes, [str(k) for k in sizes])
    axes[0].set(xlabel="test batch size B (batch statistics)", ylabel="test accuracy")
    dress(axes[0], "Which statistics normalize a test example", grid=True, legend={"loc": "lower right", "fontsize": 8})

    noise = m["first_layer_noise"]
    for key, style, color, label in (
        ("mean_scatter", "o-", "tab:blue", "batch mean: std of (mu_B - mu)/sigma"),
        ("mean_scatter_theory", ":", "black", "theory sqrt((N-m)/(m(N-1)))"),
        ("var_rel_scatter", "s-", "tab:orange", "batch variance: std of sigma_B^2/sigma^2"),
    ):
        axes[1].plot(noise["m"], noise[key], style, color=color, label=label)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks(noise["m"], [str(k) for k in noise["m"]])
    axes[1].set(yscale="log", xlabel="batch size m", ylabel="scatter, in population units")
    dress(axes[1], "Noise of batch statistics (first BN layer)", grid=True, legend={"fontsize": 8})
    return [save(fig, Path(outdir) / "inference_statistics.png")]


class InferenceStats(Experiment):
    """Which statistics normalize a test example, over several seeds."""

    ID, DESCRIPTION, QUICK_SECONDS = ID, DESCRIPTION, QUICK_SECONDS

    def settings(self, cfg: RunConfig) -> Settings:
        return Settings.of(cfg.mode)

    def run_seeds(
        self, settings: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress
    ) -> list[dict[str, Any]]:
        s = settings
        models = [
            mlp_for(d, s.hidden, act=s.activation, norm="bn", init_std="he", generator=seeded(seed))
            for d, seed in zip(data, seeds)
        ]
        spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=s.lr)
        results = train_seeds(
            models, data, seeds, spec, f"train BN nets ({len(seeds)} seeds)", progress, order_offset=1
        )
        return [
            {**_measure(s, d, m, seed), "diverged": r.diverged} for m, d, seed, r in zip(models, data, seeds, results)
        ]

    claims = staticmethod(_claims)
    figures = staticmethod(_figures)


EXPERIMENT = InferenceStats()
run, claims, figures = EXPERIMENT.run, EXPERIMENT.claims, EXPERIMENT.figures
