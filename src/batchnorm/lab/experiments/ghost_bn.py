"""``ghost-bn``: Hoffer, Hubara & Soudry 2017, "Train longer, generalize better" — the
large-batch generalization gap, and how sqrt learning-rate scaling, ghost batch norm and regime
adaptation close it.

Setup (PAPERS.md §4, CPU form of their MNIST "F1" net): a 3x128 FC-BN-ReLU MLP; SGD with
momentum 0.9, weight decay 1e-4, gradient norm clipped to 5 (as the official ``main_gbn.py``),
learning rate divided by 10 at 50% and 75% of the updates. Arms: small batch (SB, 32) and
large batch (LB, 1024) for the same number of epochs; LB with lr * sqrt(1024/32); that plus
Ghost BN with ghost batches of 32 (``batchnorm.GhostBatchNorm1d``); that plus regime adaptation
(RA: 32x the epochs, so as many updates as SB).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ... import GhostBatchNorm1d
from ..config import RunConfig
from ..datasets import Dataset, load
from ..models import MLP
from ..progress import Progress
from ..training import evaluate, minibatches

ID = "ghost-bn"
DESCRIPTION = "Hoffer 2017: large-batch generalization gap; sqrt-LR scaling, ghost BN and regime adaptation close it"
QUICK_SECONDS = 14.0
EXPLANATION = """
Training with a large batch is attractive (fewer, more parallel steps) but for the same number
of epochs it generalizes worse than a small batch - the "generalization gap". Hoffer, Hubara &
Soudry (2017) argued that the gap is not inherent to large batches: it comes from making far
fewer parameter updates. They close it in three moves. (1) Scale the learning rate with the
square root of the batch-size ratio (the update noise then has the same covariance).
(2) Ghost Batch Normalization: compute BN's statistics over small "ghost" batches of the
large batch (e.g. 128 of 4096) rather than over all of it, which keeps the regularizing noise
of small-batch BN. (3) Regime adaptation: train for as many updates as the small-batch run
(the epochs multiplied by the batch ratio). On CIFAR-10 with ResNet-44 the test accuracy goes
92.8% (small batch) -> 86.1% (large batch) -> 89.3% (+LR) -> 90.5% (+GBN) -> 93.1% (+RA).

Here the same five arms train a 3x128 FC-BN-ReLU network (the form of their MNIST model) on
the data: small batch 32; large batch 1024 with the same learning rate; large batch with
lr * sqrt(1024/32); plus Ghost BN with ghost batches of 32; plus regime adaptation (32 times
the epochs). All use SGD with momentum 0.9, weight decay 1e-4, gradient-norm clipping at 5
(as in the authors' code) and a step schedule (learning rate / 10 at 50% and 75% of the
updates). Several seeds per arm; the figure shows mean test accuracy with one standard
deviation, next to the number of updates each arm made.
"""

_ARMS = ("sb", "lb", "lb_lr", "lb_lr_gbn", "lb_lr_gbn_ra")
_LABELS = {
    "sb": "SB (32)",
    "lb": "LB (1024)",
    "lb_lr": "LB + sqrt LR",
    "lb_lr_gbn": "LB + LR + GBN",
    "lb_lr_gbn_ra": "LB + LR + GBN + RA",
}
# claim thresholds (percentage points of test accuracy)
_GAP = 0.5  # the generalization gap SB - LB is at least 0.5 pp ...
_SIGMAS = 2.0  # ... and at least 2 standard errors of the difference of the means
_CLOSE = 0.5  # regime adaptation: within 0.5 pp of SB (or above)


def _settings(cfg: RunConfig) -> dict[str, Any]:
    return {
        "hidden": [128, 128, 128],
        "activation": "relu",
        "norm": "batchnorm.BatchNorm1d before each ReLU (Linear bias dropped); GBN arms: batchnorm.GhostBatchNorm1d",
        "init": "PyTorch default, seeded per seed",
        "small_batch": 32,
        "large_batch": 1024,
        "ghost_batch": 32,
        "lr": 0.05,
        "lr_scaling": "lr * sqrt(large/small) = lr * sqrt(32)",
        "epochs": cfg.pick(tiny=1, quick=10, full=30),
        "max_train": cfg.pick(tiny=2000, quick=2000, full=None),
        "max_train_note": "quick/tiny: at most 2000 training examples (stratified subset; digits has 1437, so all), "
        "to bound the cost of the epoch-based arms on MNIST-1D; full: the whole training set",
        "updates": "ceil(epochs * N_train / batch): every arm sees epochs * N_train examples (batches straddle epochs)",
        "regime_adaptation": "epochs * large/small = 32x the epochs (as many updates as SB)",
        "optimizer": "SGD, momentum 0.9, weight decay 1e-4, gradient norm clipped to 5",
        "schedule": "lr / 10 at 50% and at 75% of the updates",
        "seeds": cfg.pick(tiny=1, quick=6, full=10),
        "seeds_regime_adaptation": cfg.pick(tiny=1, quick=2, full=5),
        "claim_thresholds_pp": {"gap": _GAP, "gap_standard_errors": _SIGMAS, "ra_close": _CLOSE},
    }


def _arm_spec(arm: str, s: dict[str, Any]) -> dict[str, Any]:
    ratio = s["large_batch"] // s["small_batch"]
    if arm == "sb":
        return {"batch": s["small_batch"], "lr": s["lr"], "ghost": None, "epochs": s["epochs"]}
    spec = {"batch": s["large_batch"], "lr": s["lr"], "ghost": None, "epochs": s["epochs"]}
    if arm in ("lb_lr", "lb_lr_gbn", "lb_lr_gbn_ra"):
        spec["lr"] = s["lr"] * math.sqrt(ratio)
    if arm in ("lb_lr_gbn", "lb_lr_gbn_ra"):
        spec["ghost"] = s["ghost_batch"]
    if arm == "lb_lr_gbn_ra":
        spec["epochs"] = s["epochs"] * ratio
    return spec


def _train_regime(data: Dataset, s: dict[str, Any], spec: dict[str, Any], seed: int, progress: Progress, label: str) -> dict[str, Any]:
    """Train one arm (momentum SGD, weight decay, clipping, step schedule); final accuracies."""
    torch.manual_seed(seed + 1)
    ghost = spec["ghost"]
    norm: Any = (lambda c: GhostBatchNorm1d(c, ghost)) if ghost else "bn"
    model = MLP(data.features, s["hidden"], data.classes, act="relu", norm=norm)
    n = data.train_x.shape[0]
    batch = min(spec["batch"], n)
    steps = math.ceil(spec["epochs"] * n / batch)  # updates that see epochs * n examples
    drops = {int(steps * 0.5), int(steps * 0.75)}
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9, weight_decay=1e-4)
    stream = minibatches(n, batch, torch.Generator().manual_seed(seed + 2))
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


def run(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Train the five arms over several seeds."""
    s = _settings(cfg)
    data = load(cfg.data, cfg.seed, small=cfg.mode == "tiny")
    if s["max_train"] is not None:
        data = data.subset_train(s["max_train"], cfg.seed)
    arms: dict[str, Any] = {}
    for arm in _ARMS:
        spec = _arm_spec(arm, s)
        count = s["seeds_regime_adaptation"] if arm == "lb_lr_gbn_ra" else s["seeds"]
        runs = [
            _train_regime(data, s, spec, cfg.seed + 1000 * k, progress, f"{_LABELS[arm]} seed {cfg.seed + 1000 * k}")
            for k in range(count)
        ]
        arms[arm] = {"spec": spec, "runs": runs}
    return {"config": s, "data": data.describe(), "metrics": {"arms": arms}}


def _mean(arms: dict[str, Any], arm: str, key: str = "test_acc") -> float:
    return float(np.mean([float(r[key]) for r in arms[arm]["runs"]]))


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Hoffer et al.'s ordering: SB > LB; LB < LB+LR <= LB+LR+GBN; LB+RA ~ SB."""
    a = results["metrics"]["arms"]
    acc = {arm: _mean(a, arm) for arm in _ARMS}
    sd = {arm: float(np.std([float(r["test_acc"]) for r in a[arm]["runs"]])) for arm in _ARMS}
    se = math.sqrt(sum(sd[arm] ** 2 / len(a[arm]["runs"]) for arm in ("sb", "lb")))
    table = ", ".join(f"{_LABELS[arm]} {acc[arm]:.2f}% (±{sd[arm]:.2f}, {len(a[arm]['runs'])} seeds, {a[arm]['runs'][0]['updates']} updates)" for arm in _ARMS)
    return [
        {
            "claim": f"For the same epochs, the large batch generalizes worse than the small batch (gap >= {_GAP:g} pp and >= {_SIGMAS:g} standard errors)",
            "holds": bool(acc["sb"] - acc["lb"] >= max(_GAP, _SIGMAS * se)),
            "evidence": f"test accuracy SB {acc['sb']:.2f}% vs LB {acc['lb']:.2f}% (gap {acc['sb'] - acc['lb']:.2f} pp, standard error {se:.2f} pp; "
            f"{a['sb']['runs'][0]['updates']} vs {a['lb']['runs'][0]['updates']} updates; LB training accuracy {_mean(a, 'lb', 'train_acc'):.1f}%)",
        },
        {
            "claim": "Scaling the learning rate by sqrt(batch ratio) narrows the gap, and ghost batch norm narrows it further",
            "holds": bool(acc["lb"] < acc["lb_lr"] <= acc["lb_lr_gbn"]),
            "evidence": table,
        },
        {
            "claim": f"With regime adaptation (as many updates as the small batch) the large batch matches the small batch (within {_CLOSE:g} pp or better)",
            "holds": bool(acc["lb_lr_gbn_ra"] >= acc["sb"] - _CLOSE),
            "evidence": f"LB + LR + GBN + RA {acc['lb_lr_gbn_ra']:.2f}% vs SB {acc['sb']:.2f}%",
        },
    ]


def figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Test accuracy per arm (mean ± std over seeds) and the number of updates per arm."""
    from ..figures import pyplot, save

    plt = pyplot()
    a = results["metrics"]["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(_ARMS))
    colors = ["tab:blue", "tab:red", "tab:orange", "tab:purple", "tab:green"]
    means = [_mean(a, arm) for arm in _ARMS]
    stds = [float(np.std([float(r["test_acc"]) for r in a[arm]["runs"]])) for arm in _ARMS]
    train = [_mean(a, arm, "train_acc") for arm in _ARMS]
    ax = axes[0]
    ax.bar(x, means, yerr=stds, capsize=4, color=colors, label="test accuracy (mean ± std over seeds)")
    ax.plot(x, train, "k_", markersize=22, mew=2, label="training accuracy (mean)")
    lo = min(m - s for m, s in zip(means, stds))
    bottom = max(0.0, lo - 3)
    for i, (mu, arm) in enumerate(zip(means, _ARMS)):
        ax.text(i, bottom + 0.5, f"{mu:.1f}%\n{len(a[arm]['runs'])} seeds", ha="center", va="bottom", fontsize=8, color="white")
    ax.set_xticks(x)
    ax.set_xticklabels([_LABELS[arm] for arm in _ARMS], fontsize=8)
    ax.set_ylim(bottom, 101)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Large-batch generalization gap and how to close it")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2)
    ax = axes[1]
    updates = [a[arm]["runs"][0]["updates"] for arm in _ARMS]
    ax.bar(x, updates, color=colors)
    for i, u in enumerate(updates):
        ax.text(i, u, str(u), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([_LABELS[arm] for arm in _ARMS], fontsize=7, rotation=20)
    ax.set_ylabel("SGD updates")
    ax.set_title("Number of updates: the gap follows it")
    return [save(fig, outdir / "generalization_gap.png")]
