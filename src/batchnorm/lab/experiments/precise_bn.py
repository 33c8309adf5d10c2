"""``precise-bn``: Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3 — the running
average (EMA) of BN statistics vs precise population statistics (PreciseBN) over training, and
how many samples PreciseBN needs.

Setup (PAPERS.md §6, CPU form): a 3x256 ReLU MLP with ``batchnorm.BatchNorm1d`` before each
ReLU, batch 256, a large learning rate (SGD 1.0, momentum 0.9); every epoch the test accuracy is
measured with the EMA statistics (PyTorch momentum 0.1, i.e. lambda = 0.9) and with precise
statistics from ``batchnorm.recompute_statistics(mode="train")`` over the training set.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ... import recompute_statistics
from ..config import RunConfig
from ..datasets import Dataset, load
from ..models import MLP
from ..progress import Progress
from ..training import TrainSpec, evaluate, train

ID = "precise-bn"
DESCRIPTION = "Wu & Johnson 2021: BN's EMA statistics vs precise population statistics over training; samples PreciseBN needs"
QUICK_SECONDS = 5.0
EXPLANATION = """
A BN network needs fixed statistics (a mean and a variance per unit) at inference. PyTorch,
like most frameworks, keeps an exponential moving average (EMA) of the batch statistics during
training: running = 0.9 * running + 0.1 * batch. Wu & Johnson (2021) point out two problems.
The EMA mixes statistics computed under *different* weights (those of the last ~10 steps), so
when the weights move fast - large learning rate, large batch, early in training - it is
stale and the evaluated model is not the trained one: validation results become noisy and
too low. And a smaller momentum would lag even more, a larger one would use few samples.
Their remedy, PreciseBN, freezes the weights and averages the batch statistics of many
training batches (the true population statistics of the current network, as Ioffe &
Szegedy's Algorithm 2 prescribes); it needs only some 10^3-10^4 samples.

Here a 3x256 ReLU MLP with BN is trained with batch 256 at a large learning rate (SGD 1.0 with
momentum 0.9). After every epoch the test accuracy is measured twice: with the EMA statistics
and with precise statistics recomputed over the whole training set
(``batchnorm.recompute_statistics`` in "train" mode: batch statistics in the forward pass, as
in training, pooled exactly over all batches). The first figure shows both accuracies over
training, and how far the EMA statistics are from the precise ones (relative error of the
variance, averaged over units and layers). The second figure shows how many training samples
PreciseBN needs: at an early and at the final checkpoint, the statistics are recomputed from
random subsets of N samples (several draws per N) and the test accuracy is plotted against N.
"""

_SAMPLE_SIZES = [16, 32, 64, 128, 256, 512, 1024]
# claim thresholds
_EARLY_GAIN = 0.01  # precise beats EMA by >= 1 pp on average over the early checkpoints
_SATURATED = 0.005  # PreciseBN on 512 samples within 0.5 pp of all samples
_SATURATION_N = 512
_EARLY_EPOCHS = 10  # "early in training": the first 10 epochs


def _settings(cfg: RunConfig) -> dict[str, Any]:
    return {
        "hidden": [256, 256, 256],
        "activation": "relu",
        "norm": "batchnorm.BatchNorm1d before each ReLU (Linear bias dropped), momentum 0.1 (EMA lambda 0.9)",
        "init": "weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default bound) from a seeded generator; head bias PyTorch default",
        "batch_size": 256,
        "lr": 1.0,
        "momentum": 0.9,
        "optimizer": "SGD with momentum 0.9, constant learning rate, no weight decay",
        "epochs": cfg.pick(tiny=3, quick=40, full=200),
        "max_train": cfg.pick(tiny=2000, quick=2000, full=None),
        "max_train_note": "quick/tiny: at most 2000 training examples (stratified subset; digits has 1437, so all); full: all",
        "checkpoint": "every epoch (ceil(N_train / 256) steps)",
        "precise": "batchnorm.recompute_statistics(model copy, training set in batches of 256, mode='train'): "
        "BN layers use batch statistics in the forward pass; per-layer moments pooled exactly (float64, Chan merge)",
        "early_checkpoints": f"epochs 1..{_EARLY_EPOCHS}; 'late': the last quarter of the epochs",
        "sample_sizes": _SAMPLE_SIZES + ["all"],
        "sample_draws": cfg.pick(tiny=2, quick=5, full=10),
        "sample_checkpoints": "epoch 2 (early) and the final epoch",
        "seeds": cfg.pick(tiny=1, quick=2, full=5),
        "claim_thresholds": {"early_gain": _EARLY_GAIN, "saturated_within": _SATURATED, "saturation_samples": _SATURATION_N},
    }


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def precise_copy(model: nn.Module, x: Tensor, batch_size: int, max_samples: int | None = None) -> nn.Module:
    """A copy of ``model`` with PreciseBN statistics from x (its first ``max_samples`` rows)."""
    new = copy.deepcopy(model)
    recompute_statistics(new, list(x.split(batch_size)), mode="train", max_samples=max_samples)
    return new


def stats_error(model: nn.Module, reference: nn.Module) -> float:
    """Mean over BN layers and units of |var_model / var_reference - 1| (how far the running
    variances are from the reference's)."""
    errs = []
    for a, b in zip(_bn_layers(model), _bn_layers(reference)):
        errs.append((a.running_var / b.running_var.clamp_min(1e-12) - 1.0).abs().mean())
    return float(torch.stack(errs).mean())


def _sample_curve(model: nn.Module, data: Dataset, s: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    n = data.train_x.shape[0]
    sizes = [k for k in _SAMPLE_SIZES if k < n]
    accs = []
    for k in sizes:
        row = []
        for _ in range(s["sample_draws"]):
            idx = torch.randperm(n, generator=gen)[:k]
            pre = precise_copy(model, data.train_x[idx], min(k, s["batch_size"]))
            row.append(evaluate(pre, data.test_x, data.test_y)[1])
        accs.append(row)
    full = evaluate(precise_copy(model, data.train_x, s["batch_size"]), data.test_x, data.test_y)[1]
    return {"sizes": sizes, "acc": accs, "all": n, "acc_all": full}


def _arm(data: Dataset, s: dict[str, Any], seed: int, progress: Progress) -> dict[str, Any]:
    model = MLP(data.features, s["hidden"], data.classes, act="relu", norm="bn")
    with torch.no_grad():  # seeded init (PyTorch's default scheme, our generator)
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.dim() == 2:
                bound = 1.0 / p.shape[1] ** 0.5
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    n = data.train_x.shape[0]
    per_epoch = -(-n // s["batch_size"])
    steps = s["epochs"] * per_epoch
    checkpoints = list(range(0, steps + 1, per_epoch))
    rec: dict[str, Any] = {"step": [], "epoch": [], "acc_ema": [], "acc_precise": [], "var_error_ema": []}
    samples: dict[str, Any] = {}
    sample_gen = torch.Generator().manual_seed(seed + 5)

    def record(step: int, _result: object) -> None:
        pre = precise_copy(model, data.train_x, s["batch_size"])
        rec["step"].append(step)
        rec["epoch"].append(step // per_epoch)
        rec["acc_ema"].append(evaluate(model, data.test_x, data.test_y)[1])
        rec["acc_precise"].append(evaluate(pre, data.test_x, data.test_y)[1])
        rec["var_error_ema"].append(stats_error(model, pre))
        if step == 2 * per_epoch or step == steps:
            samples["early" if step == 2 * per_epoch else "final"] = {"step": step, **_sample_curve(model, data, s, sample_gen)}

    spec = TrainSpec(steps=steps, batch_size=s["batch_size"], lr=s["lr"], momentum=s["momentum"])
    with progress.task(f"seed {seed}", total=steps) as tick:
        result = train(
            model, data.train_x, data.train_y, spec,
            generator=torch.Generator().manual_seed(seed + 2),
            checkpoints=checkpoints,
            on_checkpoint=record,
            tick=tick,
        )
    rec["diverged"] = result.diverged
    rec["samples"] = samples
    return rec


def run(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Train the BN MLP per seed, comparing EMA and precise statistics at every epoch."""
    s = _settings(cfg)
    data = load(cfg.data, cfg.seed, small=cfg.mode == "tiny")
    if s["max_train"] is not None:
        data = data.subset_train(s["max_train"], cfg.seed)
    runs = [_arm(data, s, cfg.seed + 1000 * k, progress) for k in range(s["seeds"])]
    return {"config": s, "data": data.describe(), "metrics": {"runs": runs}}


def _early(r: dict[str, Any]) -> slice:
    """Checkpoints of the first ``_EARLY_EPOCHS`` epochs (after epoch 0)."""
    return slice(1, min(len(r["step"]), 1 + _EARLY_EPOCHS))


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Precise > EMA early, EMA noisier early, the EMA error shrinks, PreciseBN saturates by 512 samples."""
    runs = results["metrics"]["runs"]
    out = []
    gains = [float(np.mean(np.subtract(r["acc_precise"][_early(r)], r["acc_ema"][_early(r)]))) for r in runs]
    late = [float(np.mean(np.subtract(r["acc_precise"][-max(1, len(r["step"]) // 4):], r["acc_ema"][-max(1, len(r["step"]) // 4):]))) for r in runs]
    out.append(
        {
            "claim": f"Early in training, precise statistics give higher test accuracy than the EMA (by >= {100 * _EARLY_GAIN:g} pp on average over the first {_EARLY_EPOCHS} epochs)",
            "holds": bool(np.mean(gains) >= _EARLY_GAIN),
            "evidence": f"mean precise - EMA accuracy over the first {_EARLY_EPOCHS} epochs: {100 * np.mean(gains):+.1f} pp "
            f"(per seed {', '.join(f'{100 * g:+.1f}' for g in gains)}); over the last quarter {100 * np.mean(late):+.2f} pp",
        }
    )
    rough_ema = [float(np.mean(np.abs(np.diff(r["acc_ema"][_early(r)])))) for r in runs]
    rough_pre = [float(np.mean(np.abs(np.diff(r["acc_precise"][_early(r)])))) for r in runs]
    out.append(
        {
            "claim": "Early in training the EMA-evaluated accuracy fluctuates more from epoch to epoch than the precise one",
            "holds": bool(np.mean(rough_ema) > np.mean(rough_pre)),
            "evidence": f"mean |change between consecutive epochs| over the first {_EARLY_EPOCHS} epochs: EMA {100 * np.mean(rough_ema):.2f} pp vs precise {100 * np.mean(rough_pre):.2f} pp",
        }
    )
    first = [float(np.mean(r["var_error_ema"][_early(r)])) for r in runs]
    last = [float(np.mean(r["var_error_ema"][-max(1, len(r["step"]) // 4):])) for r in runs]
    out.append(
        {
            "claim": "The EMA statistics are far from the precise ones early and close late in training (the gap shrinks)",
            "holds": bool(np.mean(last) < 0.5 * np.mean(first)),
            "evidence": f"mean relative error of the EMA variances: {np.mean(first):.3f} over the first {_EARLY_EPOCHS} epochs, {np.mean(last):.3f} over the last quarter",
        }
    )
    ev = []
    ok = []
    for when in ("early", "final"):
        diffs = []
        small = []
        for r in runs:
            c = r["samples"].get(when)
            if not c or _SATURATION_N not in c["sizes"]:
                continue
            j = c["sizes"].index(_SATURATION_N)
            diffs.append(c["acc_all"] - float(np.mean(c["acc"][j])))
            small.append(c["acc_all"] - float(np.mean(c["acc"][0])))
        if not diffs:
            ok.append(False)
            ev.append(f"{when}: no curve with {_SATURATION_N} samples")
            continue
        ok.append(float(np.mean(diffs)) <= _SATURATED)
        ev.append(
            f"{when}: all-sample accuracy minus {_SATURATION_N}-sample {100 * np.mean(diffs):+.2f} pp, minus {_SAMPLE_SIZES[0]}-sample {100 * np.mean(small):+.2f} pp"
        )
    out.append(
        {
            "claim": f"PreciseBN saturates by about {_SATURATION_N} samples (accuracy within {100 * _SATURATED:g} pp of using the whole training set)",
            "holds": all(ok),
            "evidence": "; ".join(ev),
        }
    )
    return out


def figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Accuracy (EMA vs precise) and EMA statistics error over training; accuracy vs samples."""
    from ..figures import mean_band, pyplot, save

    plt = pyplot()
    runs = results["metrics"]["runs"]
    t = min(len(r["epoch"]) for r in runs)
    epochs = runs[0]["epoch"][:t]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    mean_band(axes[0], epochs, [[100 * v for v in r["acc_ema"][:t]] for r in runs], "EMA statistics (momentum 0.1)", color="tab:red")
    mean_band(axes[0], epochs, [[100 * v for v in r["acc_precise"][:t]] for r in runs], "precise statistics (PreciseBN)", color="tab:blue")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test accuracy (%)")
    lo = min(min(r["acc_ema"][1:t] + r["acc_precise"][1:t]) for r in runs)
    axes[0].set_ylim(max(0.0, 100 * lo - 2), 100)
    axes[0].set_title("Test accuracy with EMA vs precise BN statistics")
    axes[0].legend(fontsize=8)
    mean_band(axes[1], epochs[1:], [r["var_error_ema"][1:t] for r in runs], "EMA running_var vs precise", color="tab:red")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("mean |var_EMA / var_precise - 1|")
    axes[1].set_title("How stale the EMA statistics are")
    axes[1].legend(fontsize=8)
    paths = [save(fig, outdir / "ema_vs_precise.png")]

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for when, color in (("early", "tab:orange"), ("final", "tab:green")):
        curves = [r["samples"][when] for r in runs if when in r["samples"]]
        if not curves:
            continue
        sizes = curves[0]["sizes"]
        per = np.asarray([[100 * np.mean(row) for row in c["acc"]] for c in curves])  # (seeds, sizes)
        std = np.asarray([[100 * np.std(row) for row in c["acc"]] for c in curves]).mean(axis=0)
        mean = per.mean(axis=0)
        ax.errorbar(sizes, mean, yerr=std, color=color, marker="o", capsize=3, label=f"{when} (step {curves[0]['step']}): N samples, mean ± std over draws")
        ax.axhline(100 * float(np.mean([c["acc_all"] for c in curves])), color=color, linestyle="--", label=f"{when}: all {curves[0]['all']} samples")
    ax.set_xscale("log")
    ax.set_xlabel("samples used for the precise statistics (N)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("How many samples PreciseBN needs")
    ax.legend(fontsize=7)
    paths.append(save(fig, outdir / "samples_needed.png"))
    return paths
