"""``inference-stats``: batch vs running-average vs population statistics (Alg. 2, exact) at test
time, single-example inference, batch-8 noise. Setup, rules and sources: ``inference_stats.md``."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ... import recompute_statistics
from ..claims_spec import Claims, Declared
from ..datasets import Dataset
from ..declare import batch_stats_accuracy, mlp_for, seeded, train_seeds
from ..experiment import Experiment, PerSeed, column
from ..figures import NamedFigures, dress, log_ticks, pyplot
from ..models import blocks
from ..popstats import population_statistics
from ..progress import Progress
from ..training import TrainSpec, evaluate

_FIXED = {  # the fixed statistics in the figure: label, color, line style
    "running_average": ("running average (EMA)", "tab:red", "-"),
    "alg2_population": ("Alg. 2 population statistics", "tab:green", "--"),
    "exact_population": ("exact population statistics", "black", ":"),
}


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``inference_stats.settings.toml``."""

    steps: int
    test_batch_repeats: int
    noise_batches: int


@torch.no_grad()
def _first_layer_noise(
    model: nn.Module, x: Tensor, sizes: Sequence[int], batches: int, generator: torch.Generator
) -> dict[str, Any]:
    """Scatter of the batch mean and variance of the first BN layer's input around the
    training-set values, in units of the population std (float64).

    Shape: the first BN's input is (N, C); statistics per unit, then averaged over units.
    """
    h = next(iter(blocks(model))).layer(x).double()  # (N, C)
    n, mu, sigma = h.shape[0], h.mean(0), h.std(0, unbiased=False)
    rows = []
    for m in sizes:
        hbs = [h[torch.randperm(n, generator=generator)[:m]] for _ in range(batches)]
        z = torch.stack([(hb.mean(0) - mu) / sigma for hb in hbs])  # (batches, C)
        v = torch.stack([hb.var(0, unbiased=False) / sigma**2 for hb in hbs])  # (batches, C)
        rows.append((m, float(z.std(0).mean()), math.sqrt((n - m) / (m * (n - 1))), float(v.std(0).mean())))
    return {k: list(v) for k, v in zip(("m", "mean_scatter", "mean_scatter_theory", "var_rel_scatter"), zip(*rows))}


def _rel_diff(a: nn.Module, b: nn.Module, key: str) -> list[float]:
    """Per BN layer: the largest |a - b| of the running statistics over units (float64), means in
    units of b's std, variances relative to b's."""
    out = []
    for la, lb in zip(blocks(a), blocks(b)):
        va, vb = (getattr(m.norm, f"running_{key}").double().numpy() for m in (la, lb))
        scale = np.sqrt(lb.norm.running_var.double().numpy()) if key == "mean" else np.abs(vb)
        out.append(float(np.max(np.abs(va - vb) / np.maximum(scale, 1e-12))))
    return out


def _measure(s: Settings, data: Dataset, model: nn.Module, seed: int) -> dict[str, Any]:
    """Every inference measurement of one seed's trained network."""
    model.eval()
    alg2 = population_statistics(model, data.train_x, batch_size=s.batch_size, generator=seeded(seed + 2))
    exact = copy.deepcopy(model)  # in eval mode, as recompute_statistics leaves it
    recompute_statistics(exact, list(data.train_x.split(256)), mode="eval", passes=len(s.hidden) + 1)
    gen, x, y = seeded(seed + 3), data.test_x, data.test_y
    sizes = [b for b in s.test_batch_sizes if b <= x.shape[0]]
    batch_acc = {  # each test batch of b normalized by its own statistics, in test_batch_repeats random orders
        str(b): batch_stats_accuracy(
            model, x, y, b, [torch.randperm(x.shape[0], generator=gen) for _ in range(s.test_batch_repeats)]
        )
        for b in sizes
    }
    with torch.no_grad():
        single_delta = float((exact(x) - torch.cat([exact(x[i : i + 1]) for i in range(x.shape[0])])).abs().max())
    single_fails = ""
    try:
        with torch.no_grad():
            copy.deepcopy(model).train()(x[:1])
    except ValueError as err:
        single_fails = str(err)
    noise = _first_layer_noise(model, data.train_x, s.noise_batch_sizes, s.noise_batches, seeded(seed + 4))
    return {
        "test_acc": {key: evaluate(net, x, y)[1] for key, net in zip(_FIXED, (model, alg2, exact))},
        "test_acc_batch_statistics": batch_acc,
        "single_example_max_logit_delta": single_delta,
        "single_example_batch_statistics_error": single_fails,
        "first_layer_noise": noise,
        "stat_difference_vs_exact": {
            f"{name}_{key}": _rel_diff(net, exact, key)
            for name, net in (("running_average", model), ("alg2", alg2))
            for key in ("mean", "var")
        },
    }


class InferenceStats(Experiment):
    """Which statistics normalize a test example, over several seeds."""

    DESCRIPTION = "Test-time BN statistics: batch vs running average vs population (Alg. 2, exact); single-example inference; batch-8 noise"

    def run_seeds(self, s: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress) -> PerSeed:
        models = [
            mlp_for(d, s.hidden, act=s.activation, norm="bn", init_std="he", generator=seeded(k))
            for d, k in zip(data, seeds)
        ]
        spec, label = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=s.lr), f"train BN nets ({len(seeds)} seeds)"
        results = train_seeds(models, data, seeds, spec, label, progress, order_offset=1)
        return [
            {**_measure(s, d, m, seed), "diverged": r.diverged} for m, d, seed, r in zip(models, data, seeds, results)
        ]

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Fixed statistics agree; batch statistics degrade with small batches; theory of noise."""
        t, per = results["config"], results["metrics"]["per_seed"]
        at8 = [{k: v[m["first_layer_noise"]["m"].index(8)] for k, v in m["first_layer_noise"].items()} for m in per]
        return Claims(
            __name__,
            results,
            **{f"acc_{k}": [100.0 * v for v in column(per, "test_acc", k)] for k in _FIXED},
            **{f"acc_b{k}": [100.0 * v for v in column(per, "test_acc_batch_statistics", k)] for k in ("8", "2")},
            **{f"{k}_diff": [max(m["stat_difference_vs_exact"][f"alg2_{k}"]) for m in per] for k in ("mean", "var")},
            ema_diff0=per[0]["stat_difference_vs_exact"],
            over_b=", ".join(f"{k}: {100 * v:.1f}" for k, v in per[0]["test_acc_batch_statistics"].items()),
            logit_delta=column(per, "single_example_max_logit_delta"),
            refused=per[0]["single_example_batch_statistics_error"].split(" (")[0] or "(not refused)",
            ratio=[n["mean_scatter"] / n["mean_scatter_theory"] - 1.0 for n in at8],
            noise0=at8[0],
            var_pct=100 * t["alg2_var_within"],
            noise_pct=100 * t["noise_theory_band"],
        ).all()

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Accuracy by kind of statistics and test batch size; noise vs batch size (first seed)."""
        m = results["metrics"]["per_seed"][0]
        fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.3))
        sizes, own = [int(k) for k in m["test_acc_batch_statistics"]], list(m["test_acc_batch_statistics"].values())
        axes[0].plot(sizes, own, "o-", color="tab:purple", label="each test batch's own statistics")
        for key, (label, color, ls) in _FIXED.items():
            axes[0].axhline(m["test_acc"][key], color=color, linestyle=ls, label=label)
        log_ticks(axes[0].xaxis, sizes, base=2)
        title, xlabel = "Which statistics normalize a test example", "test batch size B (batch statistics)"
        legend = {"loc": "lower right", "fontsize": 8}
        dress(axes[0], title, xlabel=xlabel, ylabel="test accuracy", grid=True, legend=legend)

        noise = m["first_layer_noise"]
        for key, style, color, label in (
            ("mean_scatter", "o-", "tab:blue", "batch mean: std of (mu_B - mu)/sigma"),
            ("mean_scatter_theory", ":", "black", "theory sqrt((N-m)/(m(N-1)))"),
            ("var_rel_scatter", "s-", "tab:orange", "batch variance: std of sigma_B^2/sigma^2"),
        ):
            axes[1].plot(noise["m"], noise[key], style, color=color, label=label)
        log_ticks(axes[1].xaxis, noise["m"], base=2)
        title, ylabel = "Noise of batch statistics (first BN layer)", "scatter, in population units"
        dress(axes[1], title, yscale="log", xlabel="batch size m", ylabel=ylabel, grid=True, legend={"fontsize": 8})
        yield "inference_statistics.png", fig


EXPERIMENT = InferenceStats()
