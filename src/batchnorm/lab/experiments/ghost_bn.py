"""``ghost-bn``: Hoffer, Hubara & Soudry 2017, "Train longer, generalize better" — the
large-batch generalization gap, and how sqrt learning-rate scaling, ghost batch norm and regime
adaptation close it; judged over seeds.
Setup, the rules fixed before any run and each setting's source: ``ghost_bn.md``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ... import GhostBatchNorm1d
from ..claims_spec import Claims, Declared
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import mlp_for, seeded
from ..experiment import Experiment, column
from ..figures import NamedFigures, bar_values, categories, dress, pyplot, wrap
from ..progress import Progress
from ..training import evaluate, minibatches

_ARMS = ("sb", "lb", "lb_lr", "lb_lr_gbn", "lb_lr_gbn_ra")


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``ghost_bn.settings.toml``."""

    epochs: int
    max_train: int | None


def _arm_spec(arm: str, s: Settings) -> dict[str, Any]:
    """Batch, learning rate, ghost batch and epochs of one arm, as its name spells them: large batch,
    sqrt-scaled lr (``_lr``), ghost BN (``_gbn``), regime adaptation (``_ra``)."""
    ratio = s.large_batch // s.small_batch
    return {
        "batch": s.small_batch if arm == "sb" else s.large_batch,
        "lr": s.lr * math.sqrt(ratio) if "_lr" in arm else s.lr,
        "ghost": s.ghost_batch if "_gbn" in arm else None,
        "epochs": s.epochs * ratio if arm.endswith("_ra") else s.epochs,
    }


def _train_regime(data: Dataset, s: Settings, arm: str, seed: int, progress: Progress) -> dict[str, Any]:
    """Train one arm (``_arm_spec``; momentum SGD, weight decay, clipping, step schedule); its
    spec and final accuracies."""
    torch.manual_seed(seed + 1)
    spec = _arm_spec(arm, s)
    norm: Any = (lambda c: GhostBatchNorm1d(c, spec["ghost"])) if spec["ghost"] else "bn"
    model = mlp_for(data, s.hidden, act=s.activation, norm=norm)
    n = data.train_x.shape[0]
    batch = min(spec["batch"], n)
    steps = math.ceil(spec["epochs"] * n / batch)  # updates that see epochs * n examples
    drops = {int(steps * 0.5), int(steps * 0.75)}
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9, weight_decay=1e-4)
    stream = minibatches(n, batch, seeded(seed + 2))
    model.train()
    diverged = False
    with progress.task(f"{Settings.text(arm)} seed {seed}", total=steps) as tick:
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
    test_acc = 100.0 * evaluate(model, data.test_x, data.test_y)[1]
    train_acc = 100.0 * evaluate(model, data.train_x, data.train_y)[1]
    return {"spec": spec, "test_acc": test_acc, "train_acc": train_acc, "updates": steps, "diverged": diverged}


def _acc(results: dict[str, Any], arm: str, key: str = "test_acc") -> list[float]:
    return column(results["metrics"]["per_seed"], "arms", arm, key)


class GhostBN(Experiment):
    """Hoffer et al.'s five arms over several seeds."""

    DESCRIPTION = (
        "Hoffer 2017: large-batch generalization gap; sqrt-LR scaling, ghost BN and regime adaptation close it"
    )

    def settings(self, cfg: RunConfig) -> Settings:
        return Settings.of(cfg.mode, max_train=None if cfg.mode == "full" else 2000)

    def run_seed(self, settings: Settings, data: Dataset, seed: int, progress: Progress) -> dict[str, Any]:
        if settings.max_train is not None:
            data = data.subset_train(settings.max_train, seed)
        arms = {arm: _train_regime(data, settings, arm, seed, progress) for arm in _ARMS}
        return {"arms": arms, "train_examples": int(data.train_x.shape[0])}

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Hoffer et al.'s ordering: SB > LB; LB < LB+LR <= LB+LR+GBN; LB+RA ~ SB (paired by seed)."""
        first = results["metrics"]["per_seed"][0]["arms"]
        return Claims(
            __name__,
            results,
            **{f"acc_{arm}": _acc(results, arm) for arm in _ARMS},
            train_lb=_acc(results, "lb", "train_acc"),
            n_updates={arm: first[arm]["updates"] for arm in _ARMS},
            label={arm: Settings.text(arm) for arm in _ARMS},
        ).all()

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Test accuracy per arm (mean ± std over seeds) and the number of updates per arm."""
        per_seed = results["metrics"]["per_seed"]
        fig, (ax, right) = pyplot().subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
        x, names = np.arange(len(_ARMS)), [wrap(Settings.text(arm), 10) for arm in _ARMS]
        colors = ["tab:blue", "tab:red", "tab:orange", "tab:purple", "tab:green"]
        means, stds = ([float(f(_acc(results, arm))) for arm in _ARMS] for f in (np.mean, np.std))
        ax.bar(x, means, yerr=stds, capsize=4, color=colors, label="test accuracy (mean ± std over seeds)")
        train = [float(np.mean(_acc(results, arm, "train_acc"))) for arm in _ARMS]
        ax.plot(x, train, "k_", markersize=22, mew=2, label="training accuracy (mean)")
        for i, mu in enumerate(means):  # at the foot of each bar, clear of the error bars
            ax.text(i, 2, f"{mu:.1f}%\n{len(per_seed)} seeds", ha="center", va="bottom", fontsize=8, color="white")
        categories(ax.xaxis, names, fontsize=8)
        dress(ax, "Large-batch generalization gap and how to close it", ylim=(0, 101), ylabel="accuracy (%)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        updates = [per_seed[0]["arms"][arm]["updates"] for arm in _ARMS]
        right.bar(x, updates, color=colors)
        bar_values(right, updates, fontsize=8)
        categories(right.xaxis, names, fontsize=8)
        top = 2 * max(updates)  # room for the count above the tallest bar
        dress(right, "Number of updates: the gap follows it", yscale="log", ylim=(None, top), ylabel="SGD updates")
        yield "generalization_gap.png", fig


EXPERIMENT = GhostBN()
