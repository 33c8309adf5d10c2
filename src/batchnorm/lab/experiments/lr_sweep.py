"""``lr-sweep``: final accuracy and divergence over a log grid of learning rates, with and
without BN (Ioffe & Szegedy 2015 BN-x5/x30; Bjorck et al. 2018).

A deep ReLU MLP (8 hidden layers of 100, He init) on digits, plain SGD with constant lr,
batch 60; one run per (arm, lr). Besides accuracy: the loss after one gradient step of size
alpha at initialization, L(w - alpha g) / L(w), and the per-layer activation scale after a few
steps at a large learning rate.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import RunConfig
from ..datasets import Dataset, load
from ..figures import mean_band
from ..models import MLP, blocks
from ..progress import Progress
from ..results import number
from ..training import TrainSpec, evaluate, minibatches, train

ID = "lr-sweep"
DESCRIPTION = "Accuracy and divergence over a log grid of learning rates, with and without BN (Ioffe BN-x5/x30, Bjorck 2018)"
QUICK_SECONDS = 25.0
EXPLANATION = """
One of batch normalization's practical promises is that it lets you train with much larger
learning rates. Ioffe & Szegedy trained their BN-Inception at 5x and 30x the original rate
(the original network sent its parameters to "machine infinity" at 5x) and reached the
baseline's accuracy in 14x fewer steps. Bjorck et al. (2018) argued that this is the main
reason BN helps: without BN, large steps make the loss diverge because activations grow
layer after layer; with BN the scale of every layer is reset, so a large step stays harmless.

Here a deep fully connected ReLU network (8 hidden layers of 100 units, He-initialized, so
the plain network starts well scaled) is trained with plain SGD on the digits, with and
without BN before every ReLU, at learning rates spaced by about 3x from 0.01 to 30, for the
same number of steps. For each rate we record the final test accuracy and whether training
diverged (a NaN or infinite loss). The "best rate" of a network is the largest rate whose
accuracy is within 0.5 points of its best (ties among nearly equal accuracies go to the
larger rate); a rate counts as "stable" when training did not diverge and ended within 5
points of that network's best accuracy. The headline comparison is made at 10x the plain
network's best rate: does the plain network survive there, and how good is BN there? (Which
of two nearly equal BN rates is "best" flips between seeds, so a best-vs-best ratio is noisy
at this scale; it is reported in the evidence.)

Two mechanisms are measured too. At initialization, the loss after one gradient step of
size alpha, L(w - alpha*g)/L(w), shows how far along the gradient the loss stays predictable.
And after a few steps at a large rate (lr 1, up to 10 steps, stopping before a non-finite
loss), the scale (root mean square) of every layer's output shows whether activations blow
up with depth — which BN prevents by construction.
"""

_BEST_TOL = 0.005
_STABLE_TOL = 0.05
_PROBE_ALPHA = 10.0


_MNIST1D_CHOICE = (
    "MNIST-1D, quick: 2,000 steps per rate instead of 400 (at 400 steps the best plain and BN nets are at ~48-55% "
    "test accuracy, far from trained)"
)


def _settings(cfg: RunConfig) -> dict[str, Any]:
    if cfg.data == "mnist1d" and cfg.mode == "quick":
        return {**_settings(RunConfig(mode="quick", seed=cfg.seed)), "steps": 2000, "mnist1d_choice": _MNIST1D_CHOICE}
    return {
        "hidden": cfg.pick(tiny=[32] * 3, quick=[100] * 8, full=[100] * 8),
        "activation": "relu",
        "norm": "batchnorm.BatchNorm1d before every ReLU (hidden Linear bias dropped)",
        "init": "He: weights ~ N(0, 2/fan_in), biases 0 (same initial weights for both arms)",
        "optimizer": "SGD, no momentum, no weight decay, constant lr",
        "batch_size": 60,
        "steps": cfg.pick(tiny=30, quick=400, full=3000),
        "lrs": cfg.pick(tiny=[0.1, 10.0], quick=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0], full=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0]),
        "seeds": cfg.pick(tiny=1, quick=1, full=3),
        "best_rate_definition": f"largest lr whose mean final test accuracy is within {100 * _BEST_TOL:g} pp of the arm's best",
        "stable_definition": f"no divergence and mean final test accuracy within {100 * _STABLE_TOL:g} pp of the arm's best",
        "diverged_definition": "a NaN or infinite training loss (training stops there)",
        "step_probe_alphas": np.logspace(-2, 1.5, cfg.pick(tiny=4, quick=15, full=29)).tolist(),
        "blowup_lr": 1.0,
        "blowup_steps": 10,
        "blowup_definition": "up to 10 SGD steps at lr 1.0 from the initial weights; per-layer RMS on one batch after the last step that stayed finite",
    }


def _model(data: Dataset, s: dict[str, Any], norm: str | None, seed: int) -> MLP:
    return MLP(data.features, s["hidden"], data.classes, act="relu", norm=norm, init_std="he", generator=torch.Generator().manual_seed(seed))


def _step_probe(model: nn.Module, x: Tensor, y: Tensor, alphas: list[float]) -> list[float]:
    """L(w - alpha g) / L(w) on one batch (training-mode forward); parameters, buffers and the
    training flag are restored afterwards."""
    params = [p for p in model.parameters()]
    saved = [p.detach().clone() for p in params]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    ratios = []
    try:
        model.train()
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for alpha in alphas:
                for p, w, g in zip(params, saved, grads):
                    p.copy_(w - alpha * g)
                value = float(F.cross_entropy(model(x), y))
                ratios.append(value / float(loss.detach()) if math.isfinite(value) else math.inf)
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        model.train(was_training)
    return ratios


def _activation_scales(model: nn.Module, x: Tensor) -> list[float]:
    """RMS of every hidden block's output on x (training-mode forward)."""
    scales: list[float] = []
    handles = [b.register_forward_hook(lambda _m, _i, out: scales.append(float(out.detach().pow(2).mean().sqrt()))) for b in blocks(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return scales


def _large_steps(model: nn.Module, data: Dataset, s: dict[str, Any], generator: torch.Generator, xb: Tensor) -> tuple[list[float], int]:
    """Up to ``blowup_steps`` SGD steps at ``blowup_lr``; the per-layer activation RMS on ``xb``
    after the last step whose loss and activations were still finite, and that step's number."""
    profile = _activation_scales(model, xb)
    taken = 0
    stream = minibatches(data.train_x.shape[0], s["batch_size"], generator)
    opt = torch.optim.SGD(model.parameters(), lr=s["blowup_lr"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batch statistics are not finite", category=RuntimeWarning)
        for step in range(1, s["blowup_steps"] + 1):
            idx = next(stream)
            model.train()
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            if not torch.isfinite(loss):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            now = _activation_scales(model, xb)
            if not all(math.isfinite(v) for v in now):
                break
            profile = now
            taken = step
    return profile, taken


def run(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Sweep the learning rates for both arms; probe steps at init and activation blow-up."""
    s = _settings(cfg)
    data = load(cfg.data, cfg.seed, small=cfg.mode == "tiny")
    arms: dict[str, Any] = {}
    for arm, norm in (("plain", None), ("bn", "bn")):
        acc = np.full((s["seeds"], len(s["lrs"])), np.nan)
        diverged_at: list[list[int | None]] = []
        with progress.task(f"{arm} lr sweep", total=s["seeds"] * len(s["lrs"]) * s["steps"]) as tick:
            for k in range(s["seeds"]):
                row = []
                for j, lr in enumerate(s["lrs"]):
                    seed = cfg.seed + 1000 * k
                    model = _model(data, s, norm, seed)
                    result = train(
                        model,
                        data.train_x,
                        data.train_y,
                        TrainSpec(steps=s["steps"], batch_size=s["batch_size"], lr=lr),
                        generator=torch.Generator().manual_seed(seed + 1),
                        tick=tick,
                    )
                    tick.update(s["steps"] - result.steps_done)
                    acc[k, j] = 0.0 if result.diverged else evaluate(model, data.test_x, data.test_y)[1]
                    row.append(result.diverged_at)
                diverged_at.append(row)
        probe_batch = next(minibatches(data.train_x.shape[0], s["batch_size"], torch.Generator().manual_seed(cfg.seed + 2)))
        xb = data.train_x[probe_batch]
        yb = data.train_y[probe_batch]
        probe = _step_probe(_model(data, s, norm, cfg.seed), xb, yb, s["step_probe_alphas"])
        blow = _model(data, s, norm, cfg.seed)
        before = _activation_scales(blow, xb)
        after, steps_taken = _large_steps(blow, data, s, torch.Generator().manual_seed(cfg.seed + 3), xb)
        arms[arm] = {
            "test_acc": acc.tolist(),
            "diverged_at": diverged_at,
            "step_probe_loss_ratio": probe,
            "activation_rms_init": before,
            "activation_rms_after_large_steps": after,
            "large_steps_taken": steps_taken,
        }
    return {"config": s, "data": data.describe(), "metrics": arms}


def _summary(results: dict[str, Any], arm: str) -> dict[str, Any]:
    lrs = results["config"]["lrs"]
    m = results["metrics"][arm]
    acc = np.asarray(m["test_acc"], dtype=float).mean(axis=0)  # (lrs,)
    diverged = [any(row[j] is not None for row in m["diverged_at"]) for j in range(len(lrs))]
    best = float(acc.max())
    best_lr = max(lr for lr, a in zip(lrs, acc) if a >= best - _BEST_TOL)
    stable = [lr for lr, a, d in zip(lrs, acc, diverged) if not d and a >= best - _STABLE_TOL]
    survived = [lr for lr, d in zip(lrs, diverged) if not d]
    return {
        "acc": acc,
        "diverged": diverged,
        "best": best,
        "best_lr": best_lr,
        "max_stable_lr": max(stable) if stable else None,
        "max_survived_lr": max(survived) if survived else None,
    }


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """BN's best rate >= 10x the plain net's; the plain net diverges where BN trains; blow-up."""
    lrs = results["config"]["lrs"]
    p = _summary(results, "plain")
    b = _summary(results, "bn")
    out = []
    target = 10 * p["best_lr"]
    j = int(np.argmin([abs(math.log(lr / target)) for lr in lrs]))
    bn_there = float(b["acc"][j])
    plain_there = "diverged" if p["diverged"][j] else f"{100 * p['acc'][j]:.1f}%"
    out.append(
        {
            "claim": "BN trains at 10x the plain network's best learning rate, where the plain network diverges, and is at least as accurate there as the plain network at its best",
            "holds": bool(abs(math.log(lrs[j] / target)) < 0.05 and p["diverged"][j] and bn_there >= p["best"]),
            "evidence": f"plain best {100 * p['best']:.1f}% at lr {p['best_lr']:g} (largest stable rate {p['max_stable_lr']}); at lr {lrs[j]:g}: "
            f"plain {plain_there}, BN {100 * bn_there:.1f}%; "
            f"BN best {100 * b['best']:.1f}% at lr {b['best_lr']:g} ({b['best_lr'] / p['best_lr']:.3g}x the plain best rate)",
        }
    )
    where = [lr for lr, pd, ba in zip(lrs, p["diverged"], b["acc"]) if pd and ba >= b["best"] - 0.02]
    out.append(
        {
            "claim": "Without BN training diverges at learning rates where the BN network trains to within 2 pp of its best",
            "holds": bool(where),
            "evidence": (f"plain diverges and BN is within 2 pp of its best at lr {', '.join(f'{v:g}' for v in where)}" if where else "no such rate on the grid")
            + f"; plain diverged at {', '.join(f'{lr:g}' for lr, d in zip(lrs, p['diverged']) if d) or 'no rate'}",
        }
    )
    pm = results["metrics"]["plain"]
    bm = results["metrics"]["bn"]
    pa = [number(v) for v in pm["activation_rms_after_large_steps"]]
    ba = [number(v) for v in bm["activation_rms_after_large_steps"]]
    lr_big = results["config"]["blowup_lr"]
    growth_p = pa[-1] / pa[0] if pa[0] > 0 and math.isfinite(pa[0]) else math.inf
    if not math.isfinite(pa[-1]):
        growth_p = math.inf
    growth_b = max(ba) / min(ba) if min(ba) > 0 else math.inf
    out.append(
        {
            "claim": f"A few steps at lr {lr_big:g} make the activations without BN grow with depth (last/first layer RMS >= 5x); with BN every layer stays within 2x",
            "holds": bool(growth_p >= 5 and growth_b <= 2),
            "evidence": f"plain after {pm['large_steps_taken']} finite step(s): RMS layer 1 -> {len(pa)}: {pa[0]:.3g} -> {pa[-1]:.3g} ({growth_p:.3g}x); "
            f"BN after {bm['large_steps_taken']} steps: {min(ba):.3g}..{max(ba):.3g} ({growth_b:.3g}x)",
        }
    )
    alphas = results["config"]["step_probe_alphas"]
    pr = [number(v) for v in pm["step_probe_loss_ratio"]]
    br = [number(v) for v in bm["step_probe_loss_ratio"]]
    i = max(j for j, a in enumerate(alphas) if a <= _PROBE_ALPHA * (1 + 1e-9))
    factor = pr[i] / br[i] if br[i] > 0 else math.inf
    out.append(
        {
            "claim": f"At initialization a long step along the gradient (alpha = {alphas[i]:.3g}) raises the loss at least 100x more without BN than with BN (Bjorck et al.)",
            "holds": bool(factor >= 100),
            "evidence": f"L(w - alpha g)/L(w) = {pr[i]:.3g} without BN vs {br[i]:.3g} with BN ({factor:.3g}x); "
            f"at alpha = {alphas[-1]:.3g}: {pr[-1]:.3g} vs {br[-1]:.3g}",
        }
    )
    return out


def figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Accuracy vs lr; L(w - alpha g)/L(w) at init; activation RMS per layer."""
    from ..figures import pyplot, save

    plt = pyplot()
    cfg = results["config"]
    lrs = cfg["lrs"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, label, color in (("plain", "without BN", "tab:blue"), ("bn", "with BN", "tab:red")):
        acc = np.asarray(results["metrics"][arm]["test_acc"], dtype=float)
        mean_band(ax, lrs, acc, label, color=color, marker="o")
        s = _summary(results, arm)
        for lr, a, d in zip(lrs, s["acc"], s["diverged"]):
            if d:
                ax.plot([lr], [a], "x", color=color, markersize=10, markeredgewidth=2)
    ax.plot([], [], "x", color="black", label="diverged (NaN/inf loss)")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("learning rate (SGD, constant)")
    ax.set_ylabel(f"test accuracy after {cfg['steps']} steps")
    ax.set_title(f"Learning-rate sweep: {len(cfg['hidden'])}-layer ReLU MLP")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    paths.append(save(fig, Path(outdir) / "accuracy_vs_lr.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, label, color in (("plain", "without BN", "tab:blue"), ("bn", "with BN", "tab:red")):
        m = results["metrics"][arm]
        r = np.asarray([number(v) for v in m["step_probe_loss_ratio"]])
        axes[0].plot(cfg["step_probe_alphas"], np.where(np.isfinite(r), r, np.nan), "o-", color=color, label=label, markersize=3)
        layers = np.arange(1, len(m["activation_rms_init"]) + 1)
        axes[1].plot(layers, [number(v) for v in m["activation_rms_init"]], "--", color=color, label=f"{label}, at init")
        axes[1].plot(layers, [number(v) for v in m["activation_rms_after_large_steps"]], "o-", color=color,
                     label=f"{label}, after {m['large_steps_taken']} step(s) at lr {cfg['blowup_lr']:g}")
    axes[0].axhline(1.0, color="black", linestyle=":", linewidth=1)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step size alpha along the gradient")
    axes[0].set_ylabel("L(w - alpha g) / L(w) at initialization")
    axes[0].set_title("How far the gradient direction stays downhill")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    axes[1].set_yscale("log")
    axes[1].set_xlabel("hidden layer")
    axes[1].set_ylabel("RMS of the layer's output (one batch)")
    axes[1].set_title("Activation scale by depth")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    paths.append(save(fig, Path(outdir) / "step_probe_and_activations.png"))
    return paths
