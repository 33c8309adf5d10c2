"""``ghost-bn``: Hoffer, Hubara & Soudry 2017, "Train longer, generalize better" — the
large-batch generalization gap, and how sqrt learning-rate scaling, ghost batch norm and regime
adaptation close it; judged over seeds.
Setup, the rules fixed before any run and each setting's source: ``ghost_bn.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ... import GhostBatchNorm1d
from ..claims_spec import Claims
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import seeded
from ..experiment import Experiment, column
from ..models import MLP
from ..progress import Progress
from ..training import evaluate, minibatches
from ..verdict import part

_ARMS = ("sb", "lb", "lb_lr", "lb_lr_gbn", "lb_lr_gbn_ra")
_LABELS = {
    "sb": "SB (32)",
    "lb": "LB (1024)",
    "lb_lr": "LB + sqrt LR",
    "lb_lr_gbn": "LB + LR + GBN",
    "lb_lr_gbn_ra": "LB + LR + GBN + RA",
}


@dataclass(frozen=True)
class Settings:
    """Every choice of this experiment (each field's meaning and source: ``ghost_bn.md``)."""

    epochs: int
    max_train: int | None
    hidden: tuple[int, ...] = (128, 128, 128)
    activation: str = "relu"
    norm: str = "batchnorm.BatchNorm1d before each ReLU (Linear bias dropped); GBN arms: batchnorm.GhostBatchNorm1d"
    init: str = "PyTorch's default, seeded per seed: the same initial weights in every arm of a seed"
    small_batch: int = 32
    large_batch: int = 1024
    ghost_batch: int = 32
    lr: float = 0.05
    lr_scaling: str = "lr * sqrt(large/small) = lr * sqrt(32) (Hoffer et al., Sec. 4)"
    updates: str = "ceil(epochs * N_train / batch): every arm sees epochs * N_train examples (batches straddle epochs)"
    regime_adaptation: str = "epochs * large/small = 32x the epochs (as many updates as SB)"
    optimizer: str = "SGD, momentum 0.9, weight decay 1e-4, gradient norm clipped to 5 (main_gbn.py)"
    schedule: str = "lr / 10 at 50% and at 75% of the updates"
    gap_at_least_pp: float = 0.5
    lr_gain_above_pp: float = 0.0
    ra_within_pp: float = 0.5


def _settings(cfg: RunConfig) -> Settings:
    return Settings(
        epochs={"tiny": 1, "quick": 10, "full": 30}[cfg.mode], max_train=None if cfg.mode == "full" else 2000
    )


def _arm_spec(arm: str, s: Settings) -> dict[str, Any]:
    """Batch, learning rate, ghost batch and epochs of one arm."""
    ratio = s.large_batch // s.small_batch
    if arm == "sb":
        return {"batch": s.small_batch, "lr": s.lr, "ghost": None, "epochs": s.epochs}
    spec = {"batch": s.large_batch, "lr": s.lr, "ghost": None, "epochs": s.epochs}
    if arm in ("lb_lr", "lb_lr_gbn", "lb_lr_gbn_ra"):
        spec["lr"] = s.lr * math.sqrt(ratio)
    if arm in ("lb_lr_gbn", "lb_lr_gbn_ra"):
        spec["ghost"] = s.ghost_batch
    if arm == "lb_lr_gbn_ra":
        spec["epochs"] = s.epochs * ratio
    return spec


def _train_regime(
    data: Dataset, s: Settings, spec: dict[str, Any], seed: int, progress: Progress, label: str
) -> dict[str, Any]:
    """Train one arm (momentum SGD, weight decay, clipping, step schedule); final accuracies."""
    torch.manual_seed(seed + 1)
    ghost = spec["ghost"]
    norm: Any = (lambda c: GhostBatchNorm1d(c, ghost)) if ghost else "bn"
    model = MLP(data.features, list(s.hidden), data.classes, act=s.activation, norm=norm)
    n = data.train_x.shape[0]
    batch = min(spec["batch"], n)
    steps = math.ceil(spec["epochs"] * n / batch)  # updates that see epochs * n examples
    drops = {int(steps * 0.5), int(steps * 0.75)}
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9, weight_decay=1e-4)
    stream = minibatches(n, batch, seeded(seed + 2))
    model.train()
    diverged = False
    with progress.task(label, total=steps) as tick:
        for step in range(steps):
            if step in drops:
                for group in opt.param_groups:
                    group["lr"] *= 0.1
            idx = next(stream)
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            if not math.isfinite(float(loss.detach())):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            tick.update(1)
    _, test_acc = evaluate(model, data.test_x, data.test_y)
    _, train_acc = evaluate(model, data.train_x, data.train_y)
    return {"test_acc": 100.0 * test_acc, "train_acc": 100.0 * train_acc, "updates": steps, "diverged": diverged}


def _acc(results: dict[str, Any], arm: str, key: str = "test_acc") -> list[float]:
    return column(results["metrics"]["per_seed"], "arms", arm, key)


def _claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Hoffer et al.'s ordering: SB > LB; LB < LB+LR <= LB+LR+GBN; LB+RA ~ SB (paired by seed)."""
    t = results["config"]
    acc = {arm: _acc(results, arm) for arm in _ARMS}
    first = results["metrics"]["per_seed"][0]["arms"]

    def fmt(v: Sequence[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in v)

    table = "; ".join(f"{_LABELS[arm]} {fmt(acc[arm])} ({first[arm]['updates']} updates)" for arm in _ARMS)
    make = Claims(__name__, results)
    return [
        make(
            "large_batch_gap",
            a=acc["sb"],
            b=acc["lb"],
            evidence=f"test accuracy per seed (%): SB {fmt(acc['sb'])} vs LB {fmt(acc['lb'])} ({first['sb']['updates']} vs "
            f"{first['lb']['updates']} updates); LB training accuracy {fmt(_acc(results, 'lb', 'train_acc'))}",
        ),
        make(
            "lr_and_ghost_narrow",
            a=acc["lb_lr"],
            b=acc["lb"],
            also=[part(acc["lb_lr_gbn"], acc["lb_lr"], above=float(t["lr_gain_above_pp"]))],
            evidence=f"test accuracy per seed (%): {table}",
        ),
        make(
            "regime_adaptation",
            a=acc["lb_lr_gbn_ra"],
            b=acc["sb"],
            evidence=f"test accuracy per seed (%): LB + LR + GBN + RA {fmt(acc['lb_lr_gbn_ra'])} vs SB {fmt(acc['sb'])}",
        ),
    ]


def _figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Test accuracy per arm (mean ± std over seeds) and the number of updates per arm."""
    from ..figures import bar_values, categories, pyplot, save, wrap

    plt = pyplot()
    per_seed = results["metrics"]["per_seed"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(_ARMS))
    names = [wrap(_LABELS[arm], 10) for arm in _ARMS]
    colors = ["tab:blue", "tab:red", "tab:orange", "tab:purple", "tab:green"]
    means = [float(np.mean(_acc(results, arm))) for arm in _ARMS]
    stds = [float(np.std(_acc(results, arm))) for arm in _ARMS]
    train = [float(np.mean(_acc(results, arm, "train_acc"))) for arm in _ARMS]
    ax = axes[0]
    ax.bar(x, means, yerr=stds, capsize=4, color=colors, label="test accuracy (mean ± std over seeds)")
    ax.plot(x, train, "k_", markersize=22, mew=2, label="training accuracy (mean)")
    for i, mu in enumerate(means):  # at the foot of each bar, clear of the error bars
        ax.text(i, 2, f"{mu:.1f}%\n{len(per_seed)} seeds", ha="center", va="bottom", fontsize=8, color="white")
    categories(ax.xaxis, names, fontsize=8)
    ax.set_ylim(0, 101)
    ax.set(ylabel="accuracy (%)", title="Large-batch generalization gap and how to close it")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax = axes[1]
    updates = [per_seed[0]["arms"][arm]["updates"] for arm in _ARMS]
    ax.bar(x, updates, color=colors)
    bar_values(ax, updates, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(top=2 * max(updates))  # room for the count above the tallest bar
    categories(ax.xaxis, names, fontsize=8)
    ax.set(ylabel="SGD updates", title="Number of updates: the gap follows it")
    return [save(fig, outdir / "generalization_gap.png")]


class GhostBN(Experiment):
    """Hoffer et al.'s five arms over several seeds."""

    DESCRIPTION = (
        "Hoffer 2017: large-batch generalization gap; sqrt-LR scaling, ghost BN and regime adaptation close it"
    )

    def settings(self, cfg: RunConfig) -> Settings:
        return _settings(cfg)

    def run_seed(self, settings: Settings, data: Dataset, seed: int, progress: Progress) -> dict[str, Any]:
        if settings.max_train is not None:
            data = data.subset_train(settings.max_train, seed)
        arms = {}
        for arm in _ARMS:
            spec = _arm_spec(arm, settings)
            arms[arm] = {
                "spec": spec,
                **_train_regime(data, settings, spec, seed, progress, f"{_LABELS[arm]} seed {seed}"),
            }
        return {"arms": arms, "train_examples": int(data.train_x.shape[0])}

    claims = staticmethod(_claims)
    figures = staticmethod(_figures)


EXPERIMENT = GhostBN()
