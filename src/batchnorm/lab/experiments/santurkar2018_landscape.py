"""``santurkar2018-landscape``: Santurkar et al. 2018, Fig. 4 — along the gradient direction,
the loss and the gradient of a BN network change less: its landscape is smoother.

At each checkpoint, on one batch, with g = grad L(w) (all parameters) and step sizes eta in a
grid up to 0.4: loss variation = max - min of L(w - eta g) (eta = 0 included); gradient
predictiveness = max over eta of ||grad L(w) - grad L(w - eta g)||; effective beta-smoothness =
max over eta of ||grad L(w) - grad L(w - eta g)|| / ||eta g||. Same 10-layer ReLU MLP as the
other ``santurkar2018-*`` experiments, with and without BN, lr 0.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import RunConfig
from ..datasets import load
from ..progress import Progress
from ..training import TrainSpec, train
from ._santurkar import build, restore_buffers, window_means

ID = "santurkar2018-landscape"
DESCRIPTION = "Santurkar 2018 Fig. 4: loss variation, gradient predictiveness and effective beta-smoothness along the gradient; BN is smoother"
QUICK_SECONDS = 2.5
EXPLANATION = """
If not internal covariate shift, what does BN change? Santurkar, Tsipras, Ilyas & Madry (2018)
argue that it makes the optimization landscape smoother: the loss and its gradient change
more slowly (are more Lipschitz), so the gradient computed at the current point stays a good
guide for a longer step, and larger learning rates are safe.

They measure this during training. At a training step, take the gradient g of the loss on a
batch and walk along it: evaluate the loss L(w - eta g) and its gradient for several step
sizes eta. Three numbers summarize the walk. Loss variation: the range (max - min) of the loss
values seen; a flat, predictable landscape gives a small range. Gradient predictiveness: the
largest change of the gradient, ||grad L(w) - grad L(w - eta g)||; small means the gradient
stays predictive. Effective beta-smoothness: the largest ratio of that gradient change to the
distance moved, ||eta g|| - a local estimate of the Lipschitz constant of the gradient.

Here a 10-layer ReLU MLP (width 64, He initialization, batch 128, plain SGD at lr 0.1, where
the network without BN still trains) is trained with and without BN before each ReLU, from
the same initial weights and batches. At 16 checkpoints the walk is made on a fixed-size
batch of training examples, in training mode (BN uses the batch's statistics; running
statistics are restored afterwards), for 8 step sizes eta from 0.05 to 0.4 (the paper's range;
0.5x to 4x the training learning rate). The figure shows the three quantities over training;
the paper found all three lower with BN throughout training.

One caveat at this scale: the digits training set is small enough that the plain network
eventually memorizes it, its gradients vanish, and then all three numbers collapse for it
(and stay larger for BN, whose batch-dependent loss never reaches 0). A walk along a vanishing
gradient says nothing about smoothness, so the claims are judged over the checkpoints where
the plain network is still learning (its batch loss L(w) above 0.05; in quick mode nearly the
whole run): BN must have the lower median and be lower at most of those checkpoints.
"""

_ETAS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
_LOSS_FLOOR = 0.05  # the "learning phase": checkpoints where both batch losses L(w) exceed this


def _settings(cfg: RunConfig) -> dict[str, Any]:
    return {
        "depth": 10,
        "width": 64,
        "activation": "relu",
        "norm": "batchnorm.BatchNorm1d before each ReLU (Linear bias dropped); none: no norm",
        "init": "He: weights ~ N(0, 2/fan_in), biases 0; both arms start from the same weights and see the same batches",
        "batch_size": 128,
        "lr": 0.1,
        "optimizer": "SGD (no momentum, no weight decay), constant learning rate",
        "steps": cfg.pick(tiny=20, quick=300, full=3000),
        "checkpoints": cfg.pick(tiny=2, quick=15, full=50),
        "etas": _ETAS,
        "landscape_batch": "128 training examples, a different slice at each checkpoint, training mode, running statistics restored",
        "gradient": "of the mean cross-entropy on that batch w.r.t. all parameters",
        "seeds": cfg.pick(tiny=1, quick=1, full=3),
        "claim_thresholds": {"learning_phase_loss_floor": _LOSS_FLOOR},
    }


def _flat_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return float(loss.detach()), torch.cat([g.detach().flatten() for g in grads])  # (P,)


def landscape(model: nn.Module, x: Tensor, y: Tensor, etas: list[float]) -> dict[str, Any]:
    """Walk along the gradient of the loss on (x, y) (Santurkar et al. 2018, Fig. 4).

    Returns ``losses`` (L(w - eta g) for eta in [0] + etas), ``grad_change`` (||g - g_eta|| per
    eta), ``loss_variation`` (max - min of ``losses``), ``grad_predictiveness`` (max
    ``grad_change``), ``beta_eff`` (max of ||g - g_eta|| / (eta ||g||)) and ``grad_norm``.
    The model's parameters, gradients, buffers and training flags are left as they were.
    """
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    saved_grads = [p.grad for p in params]
    flags = [(m, m.training) for m in model.modules()]
    losses = []
    changes = []
    try:
        with restore_buffers(model):
            model.train()
            loss0, g0 = _flat_grad(model, x, y)
            grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
            losses.append(loss0)
            for eta in etas:
                with torch.no_grad():
                    for p, w, g in zip(params, start, grads):
                        p.copy_(w - eta * g)
                loss, g = _flat_grad(model, x, y)
                losses.append(loss)
                changes.append(float((g0 - g).norm()))
    finally:
        with torch.no_grad():
            for p, w in zip(params, start):
                p.copy_(w)
        for p, g in zip(params, saved_grads):
            p.grad = g
        for m, flag in flags:
            m.training = flag
    norm = float(g0.norm())
    finite = all(np.isfinite(losses)) and all(np.isfinite(changes))
    return {
        "losses": losses,
        "grad_change": changes,
        "grad_norm": norm,
        "loss_variation": float(max(losses) - min(losses)) if finite else float("inf"),
        "grad_predictiveness": float(max(changes)) if finite else float("inf"),
        "beta_eff": float(max(c / (eta * max(norm, 1e-30)) for c, eta in zip(changes, etas))) if finite else float("inf"),
    }


def _arm(data: Any, s: dict[str, Any], norm: str | None, seed: int, progress: Progress) -> dict[str, Any]:
    model = build(data, s["depth"], s["width"], norm, seed)
    steps = s["steps"]
    every = max(1, steps // s["checkpoints"])
    checkpoints = list(range(0, steps + 1, every))
    rec: dict[str, Any] = {"step": [], "landscape": []}
    n = data.train_x.shape[0]

    def record(step: int, _result: object) -> None:
        k = len(rec["step"])
        start = (k * 128) % max(1, n - 128)
        idx = torch.arange(start, start + 128)
        rec["step"].append(step)
        rec["landscape"].append(landscape(model, data.train_x[idx], data.train_y[idx], s["etas"]))

    spec = TrainSpec(steps=steps, batch_size=s["batch_size"], lr=s["lr"])
    with progress.task(f"{'BN' if norm else 'no BN'} seed {seed}", total=steps) as tick:
        result = train(
            model, data.train_x, data.train_y, spec,
            generator=torch.Generator().manual_seed(seed + 2),
            checkpoints=checkpoints,
            on_checkpoint=record,
            tick=tick,
        )
    rec["loss_curve"] = window_means(result.losses, checkpoints)
    rec["diverged"] = result.diverged
    return rec


def run(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Train with and without BN, walking along the gradient at every checkpoint."""
    s = _settings(cfg)
    data = load(cfg.data, cfg.seed, small=cfg.mode == "tiny")
    metrics: dict[str, Any] = {"none": [], "bn": []}
    for k in range(s["seeds"]):
        seed = cfg.seed + 1000 * k
        metrics["none"].append(_arm(data, s, None, seed, progress))
        metrics["bn"].append(_arm(data, s, "bn", seed, progress))
    return {"config": s, "data": data.describe(), "metrics": metrics}


_QUANTITIES = {
    "loss_variation": "loss variation (max - min of L along the gradient)",
    "grad_predictiveness": "gradient predictiveness (max ||grad L(w) - grad L(w - eta g)||)",
    "beta_eff": "effective beta-smoothness (max ||delta grad|| / ||eta g||)",
}


def _series(runs: list[dict[str, Any]], key: str) -> np.ndarray:
    """(seeds, checkpoints) values of ``key`` ("loss": the batch loss L(w)); non-finite values as inf."""
    t = min(len(r["landscape"]) for r in runs)
    if key == "loss":
        return np.asarray([[float(r["landscape"][i]["losses"][0]) for i in range(t)] for r in runs], dtype=float)
    return np.asarray([[float(r["landscape"][i][key]) for i in range(t)] for r in runs], dtype=float)


def _learning_phase(m: dict[str, Any]) -> np.ndarray:
    """(seeds, T) mask of the checkpoints where the plain network's batch loss L(w) is above the floor
    (before it has memorized the training set and its gradients vanish)."""
    none = _series(m["none"], "loss")
    bn = _series(m["bn"], "loss")
    t = min(none.shape[1], bn.shape[1])
    return none[:, :t] > _LOSS_FLOOR


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """BN lower in all three quantities while both networks are learning (median and maximum)."""
    m = results["metrics"]
    mask = _learning_phase(m)
    t = mask.shape[1]
    out = []
    for key, label in _QUANTITIES.items():
        none = _series(m["none"], key)[:, :t][mask]
        bn = _series(m["bn"], key)[:, :t][mask]
        if none.size == 0:
            out.append({"claim": f"BN lowers the {label.split(' (')[0]}", "holds": False, "evidence": "no checkpoint in the learning phase"})
            continue
        lower = bn < none
        out.append(
            {
                "claim": f"BN lowers the {label.split(' (')[0]} during training (lower median, and lower at most checkpoints "
                f"while the plain network is still learning)",
                "holds": bool(np.median(bn) < np.median(none) and 2 * int(lower.sum()) > lower.size),
                "evidence": f"{none.size} checkpoints with the plain network's batch loss > {_LOSS_FLOOR}; median {np.median(bn):.3g} with BN vs "
                f"{np.median(none):.3g} without; maximum {np.max(bn):.3g} vs {np.max(none):.3g}; BN lower at {int(lower.sum())}/{lower.size}",
            }
        )
    return out


def figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """The three landscape measures over training, and the loss along the gradient at one checkpoint."""
    from ..figures import pyplot, save

    plt = pyplot()
    m = results["metrics"]
    s = results["config"]
    colors = {"none": "tab:gray", "bn": "tab:blue"}
    labels = {"none": "no BN", "bn": "BN"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.0))
    for ax, (key, label) in zip(axes, _QUANTITIES.items()):
        for norm in ("none", "bn"):
            runs = m[norm]
            vals = _series(runs, key)  # (seeds, T)
            steps = runs[0]["step"][: vals.shape[1]]
            for k in range(vals.shape[0]):
                ax.plot(steps, vals[k], color=colors[norm], marker="o", ms=3, alpha=1.0 if k == 0 else 0.5,
                        label=labels[norm] if k == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(label, fontsize=10)
        ax.legend()
    fig.suptitle(f"Landscape along the gradient (etas {s['etas'][0]}..{s['etas'][-1]}, lr {s['lr']}; one line per seed)")
    paths = [save(fig, outdir / "landscape.png")]

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0))
    for norm in ("none", "bn"):
        r = m[norm][0]
        mid = len(r["landscape"]) // 2
        entry = r["landscape"][mid]
        axes[0].plot([0.0] + s["etas"], entry["losses"], color=colors[norm], marker="o", label=f"{labels[norm]} (step {r['step'][mid]})")
        axes[1].plot(s["etas"], entry["grad_change"], color=colors[norm], marker="o", label=f"{labels[norm]} (step {r['step'][mid]})")
    axes[0].set_xlabel("step size eta")
    axes[0].set_ylabel("L(w - eta g) on the batch")
    axes[0].set_title("Loss along the gradient, mid-training")
    axes[1].set_xlabel("step size eta")
    axes[1].set_ylabel("||grad L(w) - grad L(w - eta g)||")
    axes[1].set_title("Gradient change along the gradient, mid-training")
    for ax in axes:
        ax.legend()
    paths.append(save(fig, outdir / "walk.png"))
    return paths
