"""``precise-bn``: Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3 — EMA vs precise
BN statistics (PreciseBN) over training, and how many samples PreciseBN needs. Setup, rules and
sources: ``precise_bn.md``."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ... import recompute_statistics
from ..claims_spec import Claims, Declared, unmeasured
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import mlp_for, seeded, train_seeds
from ..experiment import Experiment, PerSeed
from ..figures import NamedFigures, dress, log_ticks, mean_band, pyplot
from ..models import MLP
from ..progress import Progress
from ..training import TrainResult, TrainSpec, evaluate


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``precise_bn.settings.toml``."""

    epochs: int
    max_train: int | None
    sample_draws: int


def precise_copy(model: nn.Module, x: Tensor, batch_size: int, max_samples: int | None = None) -> nn.Module:
    """A copy of ``model`` with PreciseBN statistics from x (its first ``max_samples`` rows)."""
    new = copy.deepcopy(model)
    recompute_statistics(new, list(x.split(batch_size)), mode="train", max_samples=max_samples)
    return new


def stats_error(model: nn.Module, reference: nn.Module) -> float:
    """Mean over BN layers and units of |var_model / var_reference - 1| (how stale the running variances are)."""
    bns = [[m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] for net in (model, reference)]
    errors = [(a.running_var / b.running_var.clamp_min(1e-12) - 1.0).abs().mean() for a, b in zip(*bns)]  # per layer
    return float(torch.stack(errors).mean())


def _sample_curve(model: nn.Module, data: Dataset, s: Settings, gen: torch.Generator) -> dict[str, Any]:
    """Test accuracy with precise statistics from N random training samples (``sample_draws``
    draws per N) and from all."""
    n = data.train_x.shape[0]
    sizes = [k for k in s.sample_sizes if k < n]

    def draw(k: int) -> float:
        pre = precise_copy(model, data.train_x[torch.randperm(n, generator=gen)[:k]], min(k, s.batch_size))
        return evaluate(pre, data.test_x, data.test_y)[1]

    accs = [[draw(k) for _ in range(s.sample_draws)] for k in sizes]
    full = evaluate(precise_copy(model, data.train_x, s.batch_size), data.test_x, data.test_y)[1]
    return {"sizes": sizes, "acc": accs, "all": n, "acc_all": full}


@torch.no_grad()
def _seeded_init(model: MLP, seed: int) -> MLP:
    """``model`` with PyTorch's default bound for the weights, drawn from a seeded generator."""
    gen = seeded(seed + 1)
    for p in (p for p in model.parameters() if p.dim() == 2):
        p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * (1.0 / p.shape[1] ** 0.5))
    return model


def _windows(r: dict[str, Any], epochs: int) -> tuple[slice, slice]:
    """Checkpoints of the first ``epochs`` epochs (after epoch 0), and of the last quarter of training."""
    return slice(1, min(len(r["step"]), 1 + epochs)), slice(-max(1, len(r["step"]) // 4), None)


def _sample_gap(r: dict[str, Any], when: str, n: int) -> float:
    """All-sample minus n-sample accuracy (pp) at checkpoint ``when`` (the mean over draws)."""
    c = r["samples"].get(when)
    if not c or n not in c["sizes"]:
        return float("nan")
    return 100.0 * (c["acc_all"] - float(np.mean(c["acc"][c["sizes"].index(n)])))


class PreciseBN(Experiment):
    """EMA vs precise BN statistics over training, over several seeds."""

    DESCRIPTION = (
        "Wu & Johnson 2021: BN's EMA statistics vs precise population statistics over training; samples PreciseBN needs"
    )

    def settings(self, cfg: RunConfig) -> Settings:
        return Settings.of(cfg.mode, max_train=None if cfg.mode == "full" else 2000)

    def run_seeds(self, s: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress) -> PerSeed:
        data = [d.subset_train(s.max_train, seed) if s.max_train is not None else d for d, seed in zip(data, seeds)]
        if len(sizes := {d.train_x.shape[0] for d in data}) != 1:
            raise ValueError(f"precise-bn: expected one training-set size across seeds, got {sorted(sizes)}")
        per_epoch = -(-sizes.pop() // s.batch_size)
        steps = s.epochs * per_epoch
        models = [_seeded_init(mlp_for(d, s.hidden, act=s.activation, norm="bn"), seed) for d, seed in zip(data, seeds)]
        keys = ("step", "epoch", "acc_ema", "acc_precise", "var_error_ema")
        recs: PerSeed = [{**{k: [] for k in keys}, "samples": {}} for _ in models]
        sample_gens = [seeded(seed + 5) for seed in seeds]

        def record(step: int, _results: list[TrainResult]) -> None:
            for rec, d, model, gen in zip(recs, data, models, sample_gens):
                pre = precise_copy(model, d.train_x, s.batch_size)
                rec["step"].append(step)
                rec["epoch"].append(step // per_epoch)
                rec["acc_ema"].append(evaluate(model, d.test_x, d.test_y)[1])
                rec["acc_precise"].append(evaluate(pre, d.test_x, d.test_y)[1])
                rec["var_error_ema"].append(stats_error(model, pre))
                if step in (2 * per_epoch, steps):
                    curve = _sample_curve(model, d, s, gen)
                    rec["samples"]["early" if step == 2 * per_epoch else "final"] = {"step": step, **curve}

        spec = TrainSpec(steps=steps, batch_size=s.batch_size, lr=s.lr, momentum=s.momentum)
        epochs = range(0, steps + 1, per_epoch)
        results = train_seeds(
            models, data, seeds, spec, f"{len(seeds)} seeds", progress, checkpoints=epochs, on_checkpoint=record
        )
        return [{**rec, "diverged": r.diverged} for rec, r in zip(recs, results)]

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Precise > EMA early, EMA noisier early, the EMA error shrinks, PreciseBN saturates by N samples."""
        t, runs = results["config"], results["metrics"]["per_seed"]
        e, sizes = int(t["early_epochs"]), {"sat": int(t["saturation_samples"]), "min": int(t["sample_sizes"][0])}

        def col(read: Any, at: int | None = None) -> list[float]:  # at: 0 the early window, 1 the late one
            return [float(read(r, _windows(r, e)[at]) if at is not None else read(r)) for r in runs]

        def gain(r: dict[str, Any], at: slice) -> float:
            return 100.0 * float(np.mean(np.subtract(r["acc_precise"][at], r["acc_ema"][at])))

        def roughness(key: str) -> list[float]:  # mean |change between consecutive epochs| early (pp)
            return col(lambda r, at: 100.0 * float(np.mean(np.abs(np.diff(r[key][at])))), 0)

        first, last = (col(lambda r, at: float(np.mean(r["var_error_ema"][at])), k) for k in (0, 1))
        gaps = {
            f"gap_{key}_{w}": col(lambda r, n=n, w=w: _sample_gap(r, w, n))
            for key, n in sizes.items()
            for w in ("early", "final")
        }
        make = Claims(
            __name__,
            results,
            gain_early=col(gain, 0),
            gain_late=col(gain, 1),
            rough_ema=roughness("acc_ema"),
            rough_precise=roughness("acc_precise"),
            var_error_first=first,
            var_error_last=last,
            **gaps,
        )
        if np.isfinite([gaps["gap_sat_early"], gaps["gap_sat_final"]]).all():
            return make.all()
        evidence = f"the training set has fewer than {sizes['sat']} examples: no {sizes['sat']}-sample curve"
        return make.all(saturation=unmeasured(make, "saturation", evidence))

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Accuracy (EMA vs precise) and EMA statistics error over training; accuracy vs samples."""
        plt, runs = pyplot(), results["metrics"]["per_seed"]
        t = min(len(r["epoch"]) for r in runs)
        epochs = runs[0]["epoch"][:t]
        fig, (acc, stale) = plt.subplots(1, 2, figsize=(11, 4.0))
        for key, label, color in (
            ("acc_ema", "EMA statistics (momentum 0.1)", "tab:red"),
            ("acc_precise", "precise statistics (PreciseBN)", "tab:blue"),
        ):
            mean_band(acc, epochs, [[100 * v for v in r[key][:t]] for r in runs], label, color=color)
        lo = 100 * min(min(r["acc_ema"][1:t] + r["acc_precise"][1:t]) for r in runs)
        title, legend = "Test accuracy with EMA vs precise BN statistics", {"fontsize": 8}
        dress(acc, title, xlabel="epoch", ylabel="test accuracy (%)", ylim=(max(0.0, lo - 2), 100), legend=legend)
        errors = [r["var_error_ema"][1:t] for r in runs]
        mean_band(stale, epochs[1:], errors, "EMA running_var vs precise", color="tab:red")
        ylabel = "mean |var_EMA / var_precise - 1|"
        dress(stale, "How stale the EMA statistics are", yscale="log", xlabel="epoch", ylabel=ylabel, legend=legend)
        yield "ema_vs_precise.png", fig
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ax.set_xscale("log")
        for when, color in (("early", "tab:orange"), ("final", "tab:green")):
            if not (curves := [r["samples"][when] for r in runs if when in r["samples"]]):
                continue
            sizes = curves[0]["sizes"]
            log_ticks(ax.xaxis, sizes)  # the sample counts measured
            mean = np.asarray([[100 * np.mean(row) for row in c["acc"]] for c in curves]).mean(axis=0)  # over seeds
            std = np.asarray([[100 * np.std(row) for row in c["acc"]] for c in curves]).mean(axis=0)
            label = f"{when} (step {curves[0]['step']}): N samples, mean ± std over draws"
            ax.errorbar(sizes, mean, yerr=std, color=color, marker="o", capsize=3, label=label)
            every = 100 * float(np.mean([c["acc_all"] for c in curves]))
            ax.axhline(every, color=color, linestyle="--", label=f"{when}: all {curves[0]['all']} samples")
        xlabel = "samples used for the precise statistics (N)"
        dress(ax, "How many samples PreciseBN needs", xlabel=xlabel, ylabel="test accuracy (%)", legend={"fontsize": 7})
        yield "samples_needed.png", fig


EXPERIMENT = PreciseBN()
