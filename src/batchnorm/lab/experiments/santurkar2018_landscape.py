"""``santurkar2018-landscape``: Santurkar et al. 2018, Fig. 4 — along the gradient direction,
the loss and the gradient of a BN network change less: its landscape is smoother.
Setup, the rules fixed before any run and each setting's source: ``santurkar2018_landscape.md``.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..claims_spec import Claims, Declared
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import gradients, probing, step_from, train_seeds
from ..experiment import Experiment, PerSeed
from ..figures import NamedFigures, dress, pyplot
from ..progress import Progress
from ..training import TrainResult, TrainSpec
from ._calibration import epoch_rule
from ._santurkar import COLORS, EPOCHS, LABELS, build, probe_batch, window_means


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``santurkar2018_landscape.settings.toml``."""

    steps: int
    steps_rule: str
    checkpoints: int


def landscape(model: nn.Module, x: Tensor, y: Tensor, etas: list[float]) -> dict[str, Any]:
    """Walk along the gradient of the loss on (x, y) (Santurkar et al. 2018, Fig. 4).

    Returns ``losses`` (L(w - eta g) for eta in [0] + etas), ``grad_change`` (||g - g_eta|| per
    eta), ``grad_norm`` and, inf where the walk met a non-finite value, ``loss_variation`` (max -
    min of ``losses``), ``grad_predictiveness`` (max ``grad_change``), ``beta_eff`` (max of
    ||g - g_eta|| / (eta ||g||)). The model's parameters, gradients, buffers and training flags
    are left as they were.
    """
    with probing(model) as start:
        loss0, grads = gradients(model, x, y)
        g0 = torch.cat([g.flatten() for g in grads.values()])  # (P,)
        losses, changes = [loss0], []
        for eta in etas:
            step_from(model.parameters(), start, grads, eta)
            loss, at_eta = gradients(model, x, y)
            losses.append(loss)
            changes.append(float((g0 - torch.cat([g.flatten() for g in at_eta.values()])).norm()))
    norm = float(g0.norm())
    walk = {"losses": losses, "grad_change": changes, "grad_norm": norm}
    if not (all(np.isfinite(losses)) and all(np.isfinite(changes))):
        return {**walk, **dict.fromkeys(_QUANTITIES, float("inf"))}
    beta = max(c / (eta * max(norm, 1e-30)) for c, eta in zip(changes, etas))
    variation, predictiveness = float(max(losses) - min(losses)), float(max(changes))
    return {**walk, "loss_variation": variation, "grad_predictiveness": predictiveness, "beta_eff": float(beta)}


def _train_arm(s: Settings, data: Seq[Dataset], seeds: Seq[int], norm: str | None, progress: Progress) -> PerSeed:
    """Train one arm on every seed together, walking along the gradient at every checkpoint."""
    models = [build(d, s.depth, s.width, norm, seed) for d, seed in zip(data, seeds)]
    checkpoints = list(range(0, s.steps + 1, max(1, s.steps // s.checkpoints)))
    recs: list[dict[str, Any]] = [{"step": [], "landscape": []} for _ in seeds]

    def record(step: int, results: list[TrainResult]) -> None:
        for model, rec, d, result in zip(models, recs, data, results):
            if not result.diverged:
                x, y = probe_batch(d.train_x, d.train_y, len(rec["step"]))
                rec["step"].append(step)
                rec["landscape"].append(landscape(model, x, y, list(s.etas)))

    spec, label = TrainSpec(s.steps, s.batch_size, s.lr), LABELS[norm or "none"]
    results = train_seeds(models, data, seeds, spec, label, progress, checkpoints=checkpoints, on_checkpoint=record)
    return [
        {**rec, "loss_curve": window_means(r.losses, checkpoints), "diverged": r.diverged}
        for rec, r in zip(recs, results)
    ]


_QUANTITIES = ("loss_variation", "grad_predictiveness", "beta_eff")  # the claims; their titles: [text]


def _series(rec: dict[str, Any], key: str) -> np.ndarray:
    """(checkpoints,) values of ``key`` for one seed's arm ("loss": the batch loss L(w))."""
    return np.asarray([float(e["losses"][0] if key == "loss" else e[key]) for e in rec["landscape"]], dtype=float)


def _seed_means(m: dict[str, Any], key: str, floor: float) -> tuple[float, float, int, int, int]:
    """One seed's geometric means of ``key`` with BN and without (their ratio: the paired ratio BN /
    no BN) over the checkpoints where the plain network's batch loss is above ``floor`` (all if none
    is); then the number of those checkpoints, of them where BN is lower, and of all checkpoints."""
    t = min(len(m["none"]["landscape"]), len(m["bn"]["landscape"]))
    none, bn = (_series(m[arm], key)[:t] for arm in ("none", "bn"))
    valid = np.isfinite(none) & np.isfinite(bn) & (none > 0) & (bn > 0)
    mask = (_series(m["none"], "loss")[:t] > floor) & valid
    if not mask.any():
        mask = valid
    if not mask.any():
        raise ValueError(f"{EXPERIMENT.ID}: no checkpoint with finite, positive {key} in both arms")
    gm_bn = float(np.exp(np.mean(np.log(bn[mask]))))
    gm_none = float(np.exp(np.mean(np.log(none[mask]))))
    return gm_bn, gm_none, int(mask.sum()), int((bn[mask] < none[mask]).sum()), t


class Landscape(Experiment):
    """Santurkar et al.'s landscape measures over several seeds."""

    DESCRIPTION = "Santurkar 2018 Fig. 4: loss variation, gradient predictiveness and effective beta-smoothness along the gradient; BN is smoother"

    def settings(self, cfg: RunConfig) -> Settings:
        return Settings.of(cfg.mode, **epoch_rule(cfg, EPOCHS, 128))

    def run_seeds(self, settings: Settings, data: Seq[Dataset], seeds: Seq[int], progress: Progress) -> PerSeed:
        none, bn = (_train_arm(settings, data, seeds, norm, progress) for norm in (None, "bn"))
        return [{"none": a, "bn": b} for a, b in zip(none, bn)]

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """BN lower in all three quantities while the plain network is learning (paired ratios)."""
        floor, per_seed = float(results["config"]["learning_phase_loss_floor"]), results["metrics"]["per_seed"]
        values: dict[str, Any] = {}
        for key in _QUANTITIES:
            bn, none, learning, lower, total = zip(*(_seed_means(m, key, floor) for m in per_seed))
            values |= {f"{key}_bn": bn, f"{key}_none": none, f"{key}_total": total}
            values[f"{key}_ratio"] = [a / b for a, b in zip(bn, none)]
            values[f"{key}_counts"] = ", ".join(f"{k}/{n}" for k, n in zip(lower, learning))
        return Claims(__name__, results, **values).all()

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """The three landscape measures over training, and the loss along the gradient at one checkpoint."""
        plt, per_seed, s = pyplot(), results["metrics"]["per_seed"], results["config"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.0))
        for ax, key in zip(axes, _QUANTITIES):
            for norm in ("none", "bn"):
                for k, m in enumerate(per_seed):  # the first seed's line solid and labelled
                    vals = _series(m[norm], key)
                    style = {"color": COLORS[norm], "marker": "o", "ms": 3, "alpha": 0.4 if k else 1.0}
                    ax.plot(m[norm]["step"][: len(vals)], vals, label=None if k else LABELS[norm], **style)
            axis = {"yscale": "log", "xlabel": "training step", "ylabel": key.replace("_", " ")}
            dress(ax, Settings.text(key), title_size=10, legend=True, **axis)
        etas = f"etas {s['etas'][0]}..{s['etas'][-1]}"
        fig.suptitle(f"Landscape along the gradient ({etas}, lr {s['lr']}; one line per seed)")
        yield "landscape.png", fig
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0))
        panels = (
            ("losses", [0.0, *s["etas"]], "L(w - eta g) on the batch", "Loss"),
            ("grad_change", list(s["etas"]), "||grad L(w) - grad L(w - eta g)||", "Gradient change"),
        )
        for ax, (key, etas, ylabel, what) in zip(axes, panels):
            for norm in ("none", "bn"):
                r = per_seed[0][norm]
                mid = len(r["landscape"]) // 2
                label = f"{LABELS[norm]} (step {r['step'][mid]})"
                ax.plot(etas, r["landscape"][mid][key], color=COLORS[norm], marker="o", label=label)
            title = f"{what} along the gradient, mid-training (first seed)"
            dress(ax, title, xlabel="step size eta", ylabel=ylabel, legend=True)
        yield "walk.png", fig


EXPERIMENT = Landscape()
