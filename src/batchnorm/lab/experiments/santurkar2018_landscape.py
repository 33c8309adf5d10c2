"""``santurkar2018-landscape``: Santurkar et al. 2018, Fig. 4 — along the gradient direction,
the loss and the gradient of a BN network change less: its landscape is smoother.

At each checkpoint, on one batch, with g = grad L(w) (all parameters) and step sizes eta in a
grid up to 0.4: loss variation = max - min of L(w - eta g) (eta = 0 included); gradient
predictiveness = max over eta of ||grad L(w) - grad L(w - eta g)||; effective beta-smoothness =
max over eta of ||grad L(w) - grad L(w - eta g)|| / ||eta g||. Same 10-layer ReLU MLP as the
other ``santurkar2018-*`` experiments, with and without BN, lr 0.1; the seeds of each arm are
trained together (``stacked.train_stacked``) and each claim is judged over the seeds on the
paired ratio BN / no BN at the same checkpoint and batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import RunConfig
from ..datasets import Dataset
from ..experiment import Experiment, claim, load_for
from ..progress import Progress
from ..stacked import train_stacked
from ..training import TrainResult, TrainSpec
from ._calibration import epochs_to_steps
from ._santurkar import build, restore_buffers, window_means

ID = "santurkar2018-landscape"
DESCRIPTION = "Santurkar 2018 Fig. 4: loss variation, gradient predictiveness and effective beta-smoothness along the gradient; BN is smoother"
QUICK_SECONDS = 5.0
_ETAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
_EPOCHS = {"quick": 40.0, "full": 300.0}
_TINY_STEPS = 20


@dataclass(frozen=True)
class Settings:
    """Every choice of this experiment; claim thresholds with the source of the number."""

    steps: int
    """SGD steps, from ``steps_rule``."""
    steps_rule: str
    """How ``steps`` was fixed (before any run)."""
    checkpoints: int
    """Walks along the gradient per run (equally spaced, step 0 included)."""
    depth: int = 10
    width: int = 64
    activation: str = "relu"
    norm: str = "batchnorm.BatchNorm1d before each ReLU (Linear bias dropped); none: no norm"
    init: str = "He: weights ~ N(0, 2/fan_in), biases 0; both arms start from the same weights and see the same batches"
    batch_size: int = 128
    lr: float = 0.1
    """The paper's VGG rate (Santurkar et al. 2018, Fig. 1); the plain network trains at it."""
    optimizer: str = "SGD (no momentum, no weight decay), constant learning rate"
    etas: tuple[float, ...] = _ETAS
    """Step sizes of the walk: 0.5x to 4x the learning rate (the paper's range, up to 0.4)."""
    landscape_batch: str = "128 training examples, a different slice at each checkpoint (the same for both arms), training mode, running statistics restored"
    gradient: str = "of the mean cross-entropy on that batch w.r.t. all parameters"
    seeds_trained: str = "the seeds of each arm are trained together (batchnorm.lab.stacked), each as if alone"
    learning_phase_loss_floor: float = 0.05
    """Rule fixed before any measurement: only checkpoints where the plain network's batch loss
    is above this count (below it the plain network has memorized the set, its gradient
    vanishes and the walk measures nothing)."""
    ratio_below: float = 1.0
    """Fig. 4: all three quantities lower with BN throughout training; read as a paired ratio
    BN / no BN below 1 (geometric mean over the learning-phase checkpoints)."""


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
        "beta_eff": float(max(c / (eta * max(norm, 1e-30)) for c, eta in zip(changes, etas)))
        if finite
        else float("inf"),
    }


def _checkpoints(s: Settings) -> list[int]:
    every = max(1, s.steps // s.checkpoints)
    return list(range(0, s.steps + 1, every))


def _train_arm(
    s: Settings, data: Sequence[Dataset], seeds: Sequence[int], norm: str | None, progress: Progress
) -> list[dict[str, Any]]:
    """Train one arm on every seed together, walking along the gradient at every checkpoint."""
    models = [build(d, s.depth, s.width, norm, seed) for d, seed in zip(data, seeds)]
    checkpoints = _checkpoints(s)
    recs: list[dict[str, Any]] = [{"step": [], "landscape": []} for _ in seeds]

    def record(step: int, results: list[TrainResult]) -> None:
        for model, rec, d, result in zip(models, recs, data, results):
            if result.diverged:
                continue
            n = d.train_x.shape[0]
            start = (len(rec["step"]) * 128) % max(1, n - 128)
            idx = torch.arange(start, start + 128)
            rec["step"].append(step)
            rec["landscape"].append(landscape(model, d.train_x[idx], d.train_y[idx], list(s.etas)))

    spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=s.lr)
    with progress.task("BN" if norm else "no BN", total=s.steps) as tick:
        results = train_stacked(
            models,
            [d.train_x for d in data],
            [d.train_y for d in data],
            spec,
            generators=[torch.Generator().manual_seed(seed + 2) for seed in seeds],
            checkpoints=checkpoints,
            on_checkpoint=record,
            tick=tick,
        )
    for rec, result in zip(recs, results):
        rec["loss_curve"] = window_means(result.losses, checkpoints)
        rec["diverged"] = result.diverged
    return recs


class Landscape(Experiment):
    """Santurkar et al.'s landscape measures over several seeds."""

    ID = ID
    DESCRIPTION = DESCRIPTION
    QUICK_SECONDS = QUICK_SECONDS

    def settings(self, cfg: RunConfig) -> Settings:
        if cfg.mode == "tiny":
            return Settings(steps=_TINY_STEPS, steps_rule=f"tiny: {_TINY_STEPS} steps (a smoke test)", checkpoints=2)
        n = load_for(cfg, cfg.seed).train_x.shape[0]
        epochs = _EPOCHS[cfg.mode]
        rule = f"{epochs:g} passes over the training set ({n} examples, batch 128), the same rule on every data set"
        return Settings(
            steps=epochs_to_steps(epochs, n, 128), steps_rule=rule, checkpoints=15 if cfg.mode == "quick" else 50
        )

    def run_seeds(
        self, settings: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress
    ) -> list[dict[str, Any]]:
        none = _train_arm(settings, data, seeds, None, progress)
        bn = _train_arm(settings, data, seeds, "bn", progress)
        return [{"none": a, "bn": b} for a, b in zip(none, bn)]

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return _claims(results)

    def figures(self, results: dict[str, Any], outdir: Path) -> list[Path]:
        return _figures(results, outdir)


_QUANTITIES = {
    "loss_variation": "loss variation (max - min of L along the gradient)",
    "grad_predictiveness": "gradient predictiveness (max ||grad L(w) - grad L(w - eta g)||)",
    "beta_eff": "effective beta-smoothness (max ||delta grad|| / ||eta g||)",
}


def _series(rec: dict[str, Any], key: str) -> np.ndarray:
    """(checkpoints,) values of ``key`` for one seed's arm ("loss": the batch loss L(w))."""
    if key == "loss":
        return np.asarray([float(e["losses"][0]) for e in rec["landscape"]], dtype=float)
    return np.asarray([float(e[key]) for e in rec["landscape"]], dtype=float)


def _seed_means(m: dict[str, Any], key: str, floor: float) -> tuple[float, float, int, int, int]:
    """One seed's geometric means of ``key`` with BN and without over the learning-phase
    checkpoints (the plain network's batch loss above ``floor``; all checkpoints if none is),
    so that their ratio is the geometric-mean paired ratio BN / no BN; then the number of those
    checkpoints, of them where BN is lower, and of all paired checkpoints."""
    t = min(len(m["none"]["landscape"]), len(m["bn"]["landscape"]))
    none = _series(m["none"], key)[:t]
    bn = _series(m["bn"], key)[:t]
    valid = np.isfinite(none) & np.isfinite(bn) & (none > 0) & (bn > 0)
    mask = (_series(m["none"], "loss")[:t] > floor) & valid
    if not mask.any():
        mask = valid
    if not mask.any():
        raise ValueError(f"{ID}: no checkpoint with finite, positive {key} in both arms")
    gm_bn = float(np.exp(np.mean(np.log(bn[mask]))))
    gm_none = float(np.exp(np.mean(np.log(none[mask]))))
    return gm_bn, gm_none, int(mask.sum()), int((bn[mask] < none[mask]).sum()), t


def _claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """BN lower in all three quantities while the plain network is learning (paired ratios)."""
    t = results["config"]
    floor = float(t["learning_phase_loss_floor"])
    below = float(t["ratio_below"])
    per_seed = results["metrics"]["per_seed"]
    out = []
    for key, label in _QUANTITIES.items():
        rows = [_seed_means(m, key, floor) for m in per_seed]
        name = label.split(" (")[0]
        out.append(
            claim(
                f"BN lowers the {name} during training: the ratio BN / no BN at the same checkpoint and batch is below {below:g} "
                f"(geometric mean over the checkpoints where the plain network's batch loss is above {floor:g})",
                results=results,
                a=[r[0] for r in rows],
                b=[r[1] for r in rows],
                effect="ratio",
                below=below,
                expected="all three measures lower with BN throughout training",
                source="Santurkar et al. 2018, Fig. 4",
                evidence="ratio BN / no BN per seed: "
                + ", ".join(f"{r[0] / r[1]:.3g}" for r in rows)
                + "; BN lower at "
                + ", ".join(f"{r[3]}/{r[2]}" for r in rows)
                + " learning-phase checkpoints (of "
                + ", ".join(str(r[4]) for r in rows)
                + ")",
            )
        )
    return out


def _figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """The three landscape measures over training, and the loss along the gradient at one checkpoint."""
    from ..figures import pyplot, save

    plt = pyplot()
    per_seed = results["metrics"]["per_seed"]
    s = results["config"]
    colors = {"none": "tab:gray", "bn": "tab:blue"}
    labels = {"none": "no BN", "bn": "BN"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.0))
    for ax, (key, label) in zip(axes, _QUANTITIES.items()):
        for norm in ("none", "bn"):
            for k, m in enumerate(per_seed):
                vals = _series(m[norm], key)
                steps = m[norm]["step"][: vals.shape[0]]
                ax.plot(
                    steps,
                    vals,
                    color=colors[norm],
                    marker="o",
                    ms=3,
                    alpha=1.0 if k == 0 else 0.4,
                    label=labels[norm] if k == 0 else None,
                )
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(label, fontsize=10)
        ax.legend()
    fig.suptitle(
        f"Landscape along the gradient (etas {s['etas'][0]}..{s['etas'][-1]}, lr {s['lr']}; one line per seed)"
    )
    paths = [save(fig, outdir / "landscape.png")]

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0))
    for norm in ("none", "bn"):
        r = per_seed[0][norm]
        mid = len(r["landscape"]) // 2
        entry = r["landscape"][mid]
        axes[0].plot(
            [0.0] + list(s["etas"]),
            entry["losses"],
            color=colors[norm],
            marker="o",
            label=f"{labels[norm]} (step {r['step'][mid]})",
        )
        axes[1].plot(
            list(s["etas"]),
            entry["grad_change"],
            color=colors[norm],
            marker="o",
            label=f"{labels[norm]} (step {r['step'][mid]})",
        )
    axes[0].set_xlabel("step size eta")
    axes[0].set_ylabel("L(w - eta g) on the batch")
    axes[0].set_title("Loss along the gradient, mid-training (first seed)")
    axes[1].set_xlabel("step size eta")
    axes[1].set_ylabel("||grad L(w) - grad L(w - eta g)||")
    axes[1].set_title("Gradient change along the gradient, mid-training (first seed)")
    for ax in axes:
        ax.legend()
    paths.append(save(fig, outdir / "walk.png"))
    return paths


EXPERIMENT = Landscape()
run = EXPERIMENT.run
claims = EXPERIMENT.claims
figures = EXPERIMENT.figures
