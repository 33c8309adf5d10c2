"""``precise-bn``: Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3 — the running
average (EMA) of BN statistics vs precise population statistics (PreciseBN) over training, and
how many samples PreciseBN needs; judged over seeds.
Setup, the rules fixed before any run and each setting's source: ``precise_bn.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ... import recompute_statistics
from ..claims_spec import Claims, Declared
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import mlp_for, seeded, train_seeds
from ..experiment import Experiment, per_seed_values
from ..models import MLP
from ..progress import Progress
from ..training import TrainResult, TrainSpec, evaluate
from ..verdict import part

ID = "precise-bn"
DESCRIPTION = (
    "Wu & Johnson 2021: BN's EMA statistics vs precise population statistics over training; samples PreciseBN needs"
)
QUICK_SECONDS = 5.0
_SAMPLE_SIZES = (16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Settings(Declared):
    """The settings the code computes or reads; every constant one is in ``precise_bn.settings.toml``
    (each one's meaning and source: ``precise_bn.md``)."""

    epochs: int
    max_train: int | None
    sample_draws: int
    hidden: tuple[int, ...]
    activation: str
    batch_size: int
    lr: float
    momentum: float
    sample_sizes: tuple[int, ...]


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def precise_copy(model: nn.Module, x: Tensor, batch_size: int, max_samples: int | None = None) -> nn.Module:
    """A copy of ``model`` with PreciseBN statistics from x (its first ``max_samples`` rows)."""
    new = copy.deepcopy(model)
    recompute_statistics(new, list(x.split(batch_size)), mode="train", max_samples=max_samples)
    return new


def stats_error(model: nn.Module, reference: nn.Module) -> float:
    """Mean over BN layers and units of |var_model / var_reference - 1| (how far the running
    variances are from the reference's)."""
    pairs = zip(_bn_layers(model), _bn_layers(reference))
    return float(
        torch.stack([(a.running_var / b.running_var.clamp_min(1e-12) - 1.0).abs().mean() for a, b in pairs]).mean()
    )


def _sample_curve(model: nn.Module, data: Dataset, s: Settings, gen: torch.Generator) -> dict[str, Any]:
    """Test accuracy with precise statistics from N random training samples (``sample_draws`` draws per N) and from all."""
    n = data.train_x.shape[0]
    sizes = [k for k in s.sample_sizes if k < n]
    accs = []
    for k in sizes:
        row = []
        for _ in range(s.sample_draws):
            idx = torch.randperm(n, generator=gen)[:k]
            pre = precise_copy(model, data.train_x[idx], min(k, s.batch_size))
            row.append(evaluate(pre, data.test_x, data.test_y)[1])
        accs.append(row)
    full = evaluate(precise_copy(model, data.train_x, s.batch_size), data.test_x, data.test_y)[1]
    return {"sizes": sizes, "acc": accs, "all": n, "acc_all": full}


def _seeded_init(model: MLP, seed: int) -> MLP:
    """``model`` with PyTorch's default bound for the weights, drawn from a seeded generator."""
    with torch.no_grad():
        gen = seeded(seed + 1)
        for p in model.parameters():
            if p.dim() == 2:
                bound = 1.0 / p.shape[1] ** 0.5
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    return model


def _recorder(
    s: Settings, data: Dataset, model: nn.Module, seed: int, per_epoch: int, steps: int
) -> tuple[dict[str, Any], Any]:
    """A fresh record for one seed's network and the checkpoint callback that fills it."""
    rec: dict[str, Any] = {
        "step": [],
        "epoch": [],
        "acc_ema": [],
        "acc_precise": [],
        "var_error_ema": [],
        "samples": {},
    }
    sample_gen = seeded(seed + 5)

    def record(step: int) -> None:
        pre = precise_copy(model, data.train_x, s.batch_size)
        rec["step"].append(step)
        rec["epoch"].append(step // per_epoch)
        rec["acc_ema"].append(evaluate(model, data.test_x, data.test_y)[1])
        rec["acc_precise"].append(evaluate(pre, data.test_x, data.test_y)[1])
        rec["var_error_ema"].append(stats_error(model, pre))
        if step == 2 * per_epoch or step == steps:
            curve = _sample_curve(model, data, s, sample_gen)
            rec["samples"]["early" if step == 2 * per_epoch else "final"] = {"step": step, **curve}

    return rec, record


def _early(r: dict[str, Any], epochs: int) -> slice:
    """Checkpoints of the first ``epochs`` epochs (after epoch 0)."""
    return slice(1, min(len(r["step"]), 1 + epochs))


def _late(r: dict[str, Any]) -> slice:
    """Checkpoints of the last quarter of training."""
    return slice(-max(1, len(r["step"]) // 4), None)


def _sample_gap(r: dict[str, Any], when: str, n: int) -> float:
    """All-sample minus n-sample accuracy (pp) at checkpoint ``when`` (the mean over draws)."""
    c = r["samples"].get(when)
    if not c or n not in c["sizes"]:
        return float("nan")
    return 100.0 * (c["acc_all"] - float(np.mean(c["acc"][c["sizes"].index(n)])))


def _claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Precise > EMA early, EMA noisier early, the EMA error shrinks, PreciseBN saturates by N samples."""
    t = results["config"]
    seeds = [int(v) for v in results["metrics"]["seeds"]]
    e = int(t["early_epochs"])
    n_sat = int(t["saturation_samples"])

    def col(read: Any) -> list[float]:
        return per_seed_values(results, read)

    def fmt(v: Sequence[float], spec: str = "+.1f") -> str:
        return ", ".join(format(x, spec) for x in v)

    gain = col(
        lambda r: 100.0 * float(np.mean(np.subtract(r["acc_precise"][_early(r, e)], r["acc_ema"][_early(r, e)])))
    )
    late_gain = col(lambda r: 100.0 * float(np.mean(np.subtract(r["acc_precise"][_late(r)], r["acc_ema"][_late(r)]))))
    rough_ema = col(lambda r: 100.0 * float(np.mean(np.abs(np.diff(r["acc_ema"][_early(r, e)])))))
    rough_pre = col(lambda r: 100.0 * float(np.mean(np.abs(np.diff(r["acc_precise"][_early(r, e)])))))
    first = col(lambda r: float(np.mean(r["var_error_ema"][_early(r, e)])))
    last = col(lambda r: float(np.mean(r["var_error_ema"][_late(r)])))
    gaps = {when: col(lambda r, w=when: _sample_gap(r, w, n_sat)) for when in ("early", "final")}
    small = {when: col(lambda r, w=when: _sample_gap(r, w, int(t["sample_sizes"][0]))) for when in ("early", "final")}
    have = all(np.isfinite(v).all() for v in gaps.values())
    tol = float(t["saturated_within_pp"])
    make = Claims(__name__, results)
    saturation = (
        make(
            "saturation",
            a=gaps["early"],
            also=[part(gaps["final"], below=tol)],
            evidence=f"all-sample minus {n_sat}-sample accuracy per seed (pp): early {fmt(gaps['early'], '+.2f')}, final "
            f"{fmt(gaps['final'], '+.2f')}; minus {t['sample_sizes'][0]}-sample: early {fmt(small['early'], '+.2f')}, final {fmt(small['final'], '+.2f')}",
        )
        if have
        else {
            "claim": f"PreciseBN saturates by about {n_sat} samples",
            "holds": False,
            "verdict": "inconclusive",
            "estimate": float("nan"),
            "interval": [float("nan"), float("nan")],
            "seeds": seeds,
            "method": "not measured",
            "direction": f"value <= {tol:g}",
            "expected": make.specs["saturation"]["expected"],
            "source": make.specs["saturation"]["source"],
            "evidence": f"the training set has fewer than {n_sat} examples: no {n_sat}-sample curve",
        }
    )
    return [
        make(
            "early_gain",
            a=gain,
            evidence=f"precise - EMA accuracy, mean over the first {e} epochs, per seed (pp): {fmt(gain)}; over the last quarter: {fmt(late_gain, '+.2f')}",
        ),
        make(
            "ema_fluctuates",
            a=rough_ema,
            b=rough_pre,
            evidence=f"mean |change between consecutive epochs| over the first {e} epochs, per seed (pp): EMA {fmt(rough_ema, '.2f')} vs "
            f"precise {fmt(rough_pre, '.2f')}",
        ),
        make(
            "ema_error_shrinks",
            a=last,
            b=first,
            evidence=f"mean relative error of the EMA variances per seed: first {e} epochs {fmt(first, '.3f')}, last quarter {fmt(last, '.3f')}",
        ),
        saturation,
    ]


def _figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Accuracy (EMA vs precise) and EMA statistics error over training; accuracy vs samples."""
    from ..figures import dress, log_ticks, mean_band, pyplot, save

    plt = pyplot()
    runs = results["metrics"]["per_seed"]
    t = min(len(r["epoch"]) for r in runs)
    epochs = runs[0]["epoch"][:t]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    for key, label, color in (
        ("acc_ema", "EMA statistics (momentum 0.1)", "tab:red"),
        ("acc_precise", "precise statistics (PreciseBN)", "tab:blue"),
    ):
        mean_band(axes[0], epochs, [[100 * v for v in r[key][:t]] for r in runs], label, color=color)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)")
    lo = min(min(r["acc_ema"][1:t] + r["acc_precise"][1:t]) for r in runs)
    axes[0].set_ylim(max(0.0, 100 * lo - 2), 100)
    dress(axes[0], "Test accuracy with EMA vs precise BN statistics", legend={"fontsize": 8})
    stale = [r["var_error_ema"][1:t] for r in runs]
    mean_band(axes[1], epochs[1:], stale, "EMA running_var vs precise", color="tab:red")
    axes[1].set(yscale="log", xlabel="epoch", ylabel="mean |var_EMA / var_precise - 1|")
    dress(axes[1], "How stale the EMA statistics are", legend={"fontsize": 8})
    paths = [save(fig, outdir / "ema_vs_precise.png")]

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sizes_shown: list[int] = []
    for when, color in (("early", "tab:orange"), ("final", "tab:green")):
        curves = [r["samples"][when] for r in runs if when in r["samples"]]
        if not curves:
            continue
        sizes = curves[0]["sizes"]
        sizes_shown = sizes
        per = np.asarray([[100 * np.mean(row) for row in c["acc"]] for c in curves])  # (seeds, sizes)
        std = np.asarray([[100 * np.std(row) for row in c["acc"]] for c in curves]).mean(axis=0)
        mean = per.mean(axis=0)
        label = f"{when} (step {curves[0]['step']}): N samples, mean ± std over draws"
        ax.errorbar(sizes, mean, yerr=std, color=color, marker="o", capsize=3, label=label)
        every = 100 * float(np.mean([c["acc_all"] for c in curves]))
        ax.axhline(every, color=color, linestyle="--", label=f"{when}: all {curves[0]['all']} samples")
    ax.set_xscale("log")
    if sizes_shown:
        log_ticks(ax.xaxis, sizes_shown)  # the sample counts measured
    xlabel = "samples used for the precise statistics (N)"
    dress(ax, "How many samples PreciseBN needs", xlabel=xlabel, ylabel="test accuracy (%)", legend={"fontsize": 7})
    paths.append(save(fig, outdir / "samples_needed.png"))
    return paths


class PreciseBN(Experiment):
    """EMA vs precise BN statistics over training, over several seeds."""

    ID, DESCRIPTION, QUICK_SECONDS = ID, DESCRIPTION, QUICK_SECONDS

    def settings(self, cfg: RunConfig) -> Settings:
        return Settings.of(
            cfg.mode,
            max_train=None if cfg.mode == "full" else 2000,
        )

    def run_seeds(
        self, settings: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress
    ) -> list[dict[str, Any]]:
        s = settings
        data = [d.subset_train(s.max_train, seed) if s.max_train is not None else d for d, seed in zip(data, seeds)]
        sizes = {d.train_x.shape[0] for d in data}
        if len(sizes) != 1:
            raise ValueError(f"precise-bn: expected one training-set size across seeds, got {sorted(sizes)}")
        n = sizes.pop()
        per_epoch = -(-n // s.batch_size)
        steps = s.epochs * per_epoch
        models = [_seeded_init(mlp_for(d, s.hidden, act=s.activation, norm="bn"), seed) for d, seed in zip(data, seeds)]
        recs = [_recorder(s, d, m, seed, per_epoch, steps) for d, m, seed in zip(data, models, seeds)]

        def record(step: int, _results: list[TrainResult]) -> None:
            for _rec, fn in recs:
                fn(step)

        spec = TrainSpec(steps=steps, batch_size=s.batch_size, lr=s.lr, momentum=s.momentum)
        epochs = range(0, steps + 1, per_epoch)
        results = train_seeds(
            models, data, seeds, spec, f"{len(seeds)} seeds", progress, checkpoints=epochs, on_checkpoint=record
        )
        return [{**rec, "diverged": r.diverged} for (rec, _fn), r in zip(recs, results)]

    claims = staticmethod(_claims)
    figures = staticmethod(_figures)


EXPERIMENT = PreciseBN()
run, claims, figures = EXPERIMENT.run, EXPERIMENT.claims, EXPERIMENT.figures
