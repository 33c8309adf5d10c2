"""``santurkar2018-noisy``: Santurkar et al. 2018, Fig. 2 — BN with deliberately injected,
time-varying "covariate shift" trains about as well as BN and far better than no BN, although
its layer inputs are less stable than those of the network without BN.

Setup (PAPERS.md §2, CPU form): a 10-layer ReLU MLP of width 64, batch 128, plain SGD at two
learning rates 1:5 (0.1 and 0.5, the paper's VGG rates), three arms from the same initial
weights and minibatch order: no normalization, ``batchnorm.BatchNorm1d`` before each ReLU, and
BN followed by noise (:class:`batchnorm.lab.normalizers.NoisyBatchNorm`, n_mu = 0.5,
n_sigma = 1.5, per-sample 0.1). On MNIST-1D (``--data mnist1d``) PAPERS.md's calibration is
used instead: depth 12, width 100, n_sigma 1.25, 2,000 quick steps (``config.mnist1d_choice``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..datasets import Dataset, load
from ..normalizers import NoisyBatchNorm
from ..progress import Progress
from ..training import TrainSpec, evaluate, train
from ._santurkar import build, capture_act_inputs, window_means

ID = "santurkar2018-noisy"
DESCRIPTION = "Santurkar 2018 Fig. 2: BN with injected time-varying noise trains like BN, far better than none, though its layer inputs drift more"
QUICK_SECONDS = 12.0
EXPLANATION = """
Ioffe & Szegedy explained batch normalization's success by "internal covariate shift" (ICS):
the distribution of each layer's input keeps moving as earlier layers learn, and BN fixes it.
Santurkar, Tsipras, Ilyas & Madry (2018) tested this directly. Right after every BN layer they
add random noise whose mean and variance change at every training step, so that the input
distribution of the next layer moves around *more* than in a network without BN at all. If
stable input distributions were the reason BN helps, this "noisy BN" network should train
badly. It does not: it trains almost exactly like BN, and much better than no BN.

Here a 10-layer ReLU MLP (width 64, batch 128, plain SGD) is trained on the data at two
learning rates, 0.1 and 0.5, the two rates of the paper's VGG figure, from the same initial
weights and minibatches, as: no BN; BN before each ReLU; and noisy BN, where at every step and
for every unit a shift mu ~ U(-0.5, 0.5) and a scale s ~ U(1, 1.5) are drawn and each sample's
BN output y becomes y * s * (1 + 0.1 e) + mu + 0.1 e' (e, e' standard normal per sample).
The paper does not give its noise parameters; these are recorded below.

The first figure shows training loss against step. The second shows, for one unit of the 3rd
and of the 9th hidden layer, the 15th/50th/85th percentiles of the activation's input over a
fixed set of training examples, measured during training (the network in training mode, noise
drawn) - the same kind of picture as Ioffe's Figure 1 and Santurkar's Figure 2. The "drift"
numbers quantify how much these input distributions move: for each unit, the root-mean-square
change of its batch mean from one checkpoint to the next (every 20 steps in quick mode),
divided by its average spread (std), and the same for its spread; the median over units is
reported (third figure). At inference the noise is replaced by its expectation (the BN output
is scaled by E[s] = 1.25), as dropout is. At lr 0.5 the network without BN does not train at
all, so the drift comparison uses lr 0.1, where all three train. Note what the second figure
also shows: without BN the input of a deep unit does drift over the whole run (its median
moves steadily), which is the covariate shift Ioffe & Szegedy described; noisy BN's inputs
instead jump at every step. BN trains fast despite the latter, which is the paper's point.
The plain network, once it gets going at lr 0.1, ends with a lower training loss than both
BN arms; the BN arms get low first.

On MNIST-1D the network is PAPERS.md's calibrated one for that data: 12 layers of width 100,
noise scale up to 1.25, 2,000 steps in quick mode (see the configuration table).
"""

_LRS = (0.1, 0.5)
_ARMS = ("none", "bn", "noisy")
_LABELS = {"none": "no BN", "bn": "BN", "noisy": "noisy BN"}
# claim thresholds
_CLOSE_TRAIN_ACC = 0.02  # noisy BN's final training accuracy within 2 pp of BN's
_TARGET_LOSS = 0.3  # reported: steps to reach this window-mean training loss
_FAIL = 0.8  # "fails to train": final training accuracy below 80%
_TRAINS = 0.95  # "trains": final training accuracy at least 95%
_DRIFTS = ("step_location", "step_spread", "total_location", "total_spread")
_NOISE = {"noise_mean": 0.5, "noise_scale": 1.5, "per_sample": 0.1}


def _settings(cfg: RunConfig) -> dict[str, Any]:
    if cfg.data == "mnist1d":
        return _settings_mnist1d(cfg)
    steps = cfg.pick(tiny=40, quick=600, full=4000)
    return {
        "depth": 10,
        "width": 64,
        "activation": "relu",
        "norm_placement": "before the ReLU (Linear bias dropped with BN)",
        "batch_size": 128,
        "steps": steps,
        "lrs": list(_LRS),
        "optimizer": "SGD (no momentum, no weight decay), constant learning rate",
        "init": "He: weights ~ N(0, 2/fan_in), biases 0; same initial weights and minibatch order in every arm",
        "noise": {
            **_NOISE,
            "form": "per step and unit: mu ~ U(-n_mu, n_mu), s ~ U(1, n_sigma); per sample: y' = y*s*(1+0.1e) + mu + 0.1e'",
            "where": "after every BN layer (after gamma, beta), before the ReLU; training mode only",
        },
        "seeds": cfg.pick(tiny=1, quick=1, full=3),
        "checkpoint_every": cfg.pick(tiny=10, quick=20, full=100),
        "tracked_layers": [2, 8],
        "tracked_layers_note": "0-based hidden blocks: the 3rd and the 9th of 10",
        "probe": "first 256 training examples, forwarded as one batch in training mode at each checkpoint (one noise draw)",
        "drift": "per unit, after the first 10% of steps: RMS change between consecutive checkpoints of the batch mean "
        "(location) and batch std (spread) of its activation input, divided by its average batch std; median over the 64 "
        "units. Also the std over all checkpoints (total_*).",
        "eval_noise": "at inference the noise is replaced by its expectation: y' = y * (1 + n_sigma) / 2",
        "claim_thresholds": {"noisy_train_acc_within": _CLOSE_TRAIN_ACC, "target_training_loss": _TARGET_LOSS, "fails_below": _FAIL, "trains_at_least": _TRAINS},
    }


def _settings_mnist1d(cfg: RunConfig) -> dict[str, Any]:
    """MNIST-1D: PAPERS.md §2's calibrated deep ReLU MLP (depth 12, width 100, n_sigma 1.25).

    The digits net (10x64, 600 quick steps) only reaches 52-69% training accuracy on MNIST-1D,
    which resolves none of the claims; PAPERS.md calibrates depth 12, width 100, batch 128,
    2000 steps, n_mu 0.5, n_sigma 1.25 for this data.
    """
    s = _settings(RunConfig(mode=cfg.mode, seed=cfg.seed, data="digits"))
    steps = cfg.pick(tiny=40, quick=2000, full=6000)
    s.update(
        {
            "depth": 12,
            "width": 100,
            "steps": steps,
            "noise": {**s["noise"], "noise_scale": 1.25},
            "tracked_layers_note": "0-based hidden blocks: the 3rd and the 9th of 12",
            "mnist1d_choice": "PAPERS.md §2 calibration for MNIST-1D: ReLU MLP depth 12, width 100, batch 128, "
            "n_mu 0.5, n_sigma 1.25, 2000 steps (quick); the digits setup (10x64, n_sigma 1.5, 600 steps) "
            "leaves the networks far from trained on MNIST-1D",
        }
    )
    return s


def _drift(means: np.ndarray, stds: np.ndarray) -> dict[str, float]:
    """How much a layer's input distribution moves, in units of each unit's average spread.

    ``step_location``/``step_spread``: root-mean-square change of the unit's batch mean/std
    from one checkpoint to the next; ``total_location``/``total_spread``: their standard
    deviation over all checkpoints. Each is a median over units.

    Shape: means, stds (T, units).
    """
    scale = np.maximum(stds.mean(axis=0), 1e-12)  # (units,)
    step_loc = np.sqrt((np.diff(means, axis=0) ** 2).mean(axis=0)) / scale
    step_spread = np.sqrt((np.diff(stds, axis=0) ** 2).mean(axis=0)) / scale
    return {
        "step_location": float(np.median(step_loc)),
        "step_spread": float(np.median(step_spread)),
        "total_location": float(np.median(means.std(axis=0) / scale)),
        "total_spread": float(np.median(stds.std(axis=0) / scale)),
    }


def _arm(s: dict[str, Any], data: Dataset, arm: str, lr: float, seed: int, progress: Progress) -> dict[str, Any]:
    """Train one arm at one learning rate; record activation-input drift and final accuracies."""
    noise_gen = torch.Generator().manual_seed(seed + 7)
    if arm == "none":
        norm: Any = None
    elif arm == "bn":
        norm = "bn"
    else:
        noise = {k: s["noise"][k] for k in _NOISE}
        norm = lambda c: NoisyBatchNorm(c, generator=noise_gen, **noise)  # noqa: E731
    model = build(data, s["depth"], s["width"], norm, seed)
    steps = s["steps"]
    every = s["checkpoint_every"]
    checkpoints = list(range(0, steps + 1, every))
    probe = data.train_x[:256]
    layers = s["tracked_layers"]
    rec: dict[str, Any] = {"step": [], "mean": {str(i): [] for i in layers}, "std": {str(i): [] for i in layers}, "percentiles": {str(i): [] for i in layers}}

    def record(step: int, _result: object) -> None:
        z = capture_act_inputs(model, probe, layers, probe.shape[0])
        rec["step"].append(step)
        for i in layers:
            zi = z[i]  # (256, width)
            if not torch.isfinite(zi).all():
                return
            rec["mean"][str(i)].append(zi.mean(dim=0).tolist())
            rec["std"][str(i)].append(zi.std(dim=0).tolist())
            rec["percentiles"][str(i)].append(np.percentile(zi[:, 0].numpy(), [15, 50, 85]).tolist())

    spec = TrainSpec(steps=steps, batch_size=s["batch_size"], lr=lr)
    with progress.task(f"{_LABELS[arm]} lr {lr} seed {seed}", total=steps) as tick:
        result = train(
            model,
            data.train_x,
            data.train_y,
            spec,
            generator=torch.Generator().manual_seed(seed + 2),
            checkpoints=checkpoints,
            on_checkpoint=record,
            tick=tick,
        )
    train_loss, train_acc = evaluate(model, data.train_x, data.train_y)
    test_loss, test_acc = evaluate(model, data.test_x, data.test_y)
    losses = np.asarray(result.losses, dtype=float)
    rec.update(
        {
            "diverged": result.diverged,
            "diverged_at": result.diverged_at,
            "loss_curve": window_means(result.losses, checkpoints),
            "mean_train_loss": float(losses.mean()) if np.isfinite(losses).all() else float("inf"),
            "final_train_acc": train_acc if not result.diverged else 0.0,
            "final_test_acc": test_acc if not result.diverged else 0.0,
            "final_train_loss": train_loss,
        }
    )
    start = max(1, len(rec["step"]) // 10)
    rec["drift"] = {}
    for i in layers:
        means = np.asarray(rec["mean"][str(i)], dtype=float)[start:]
        stds = np.asarray(rec["std"][str(i)], dtype=float)[start:]
        if means.shape[0] >= 3 and not result.diverged:
            rec["drift"][str(i)] = _drift(means, stds)
        else:
            rec["drift"][str(i)] = {k: float("nan") for k in _DRIFTS}
    # keep results.json small: the per-unit trajectories are summarized by the drift numbers
    del rec["mean"]
    del rec["std"]
    return rec


def run(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Train the three arms at both learning rates for each seed."""
    s = _settings(cfg)
    data = load(cfg.data, cfg.seed, small=cfg.mode == "tiny")
    arms: dict[str, Any] = {}
    for lr in s["lrs"]:
        for arm in _ARMS:
            arms[f"{arm}@{lr}"] = [
                _arm(s, data, arm, lr, cfg.seed + 1000 * k, progress) for k in range(s["seeds"])
            ]
    return {"config": s, "data": data.describe(), "metrics": {"arms": arms}}


def _avg(runs: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([float(r[key]) for r in runs]))


def _steps_to(runs: list[dict[str, Any]], target: float) -> float | None:
    """Mean over seeds of the first checkpoint whose window-mean loss is <= target (None if a seed never does)."""
    found = []
    for r in runs:
        hit = [step for step, v in zip(r["step"][1:], r["loss_curve"]) if v is not None and float(v) <= target]
        if not hit:
            return None
        found.append(hit[0])
    return float(np.mean(found))


def _final_loss(runs: list[dict[str, Any]]) -> float:
    vals = [r["loss_curve"][-1] for r in runs]
    return float(np.mean([math.inf if v is None else float(v) for v in vals]))


def _avg_drift(runs: list[dict[str, Any]], layer: str, kind: str) -> float:
    return float(np.mean([float(r["drift"][layer][kind]) for r in runs]))


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Noisy BN ~ BN >> none in training; noisy BN's layer inputs drift more than no BN's."""
    m = results["metrics"]["arms"]
    s = results["config"]
    out = []
    close = []
    ev = []
    for lr in s["lrs"]:
        bn = _avg(m[f"bn@{lr}"], "final_train_acc")
        noisy = _avg(m[f"noisy@{lr}"], "final_train_acc")
        close.append(noisy >= bn - _CLOSE_TRAIN_ACC)
        ev.append(f"lr {lr}: noisy BN {100 * noisy:.1f}% vs BN {100 * bn:.1f}% final training accuracy")
    out.append(
        {
            "claim": f"Noisy BN trains about as well as BN (final training accuracy within {100 * _CLOSE_TRAIN_ACC:.0f} pp) at both learning rates",
            "holds": all(close),
            "evidence": "; ".join(ev),
        }
    )
    lo, hi = s["lrs"][0], s["lrs"][-1]
    mean_loss = {arm: _avg(m[f"{arm}@{lo}"], "mean_train_loss") for arm in _ARMS}
    reach = {arm: _steps_to(m[f"{arm}@{lo}"], _TARGET_LOSS) for arm in _ARMS}
    fmt = {arm: ("never" if v is None else f"{v:.0f}") for arm, v in reach.items()}
    out.append(
        {
            "claim": f"At lr {lo}, where the network without BN trains, BN and noisy BN both train faster (lower mean training loss over the run)",
            "holds": bool(max(mean_loss["bn"], mean_loss["noisy"]) < mean_loss["none"]),
            "evidence": f"mean training loss over {s['steps']} steps: no BN {mean_loss['none']:.3g}, BN {mean_loss['bn']:.3g}, "
            f"noisy BN {mean_loss['noisy']:.3g}; steps to a window-mean loss <= {_TARGET_LOSS}: no BN {fmt['none']}, BN {fmt['bn']}, "
            f"noisy BN {fmt['noisy']}; later the plain network reaches a lower loss than both (final window "
            f"{_final_loss(m[f'none@{lo}']):.2g} vs BN {_final_loss(m[f'bn@{lo}']):.2g}, noisy BN {_final_loss(m[f'noisy@{lo}']):.2g})",
        }
    )
    acc = {arm: _avg(m[f"{arm}@{hi}"], "final_train_acc") for arm in _ARMS}
    diverged = any(r["diverged"] for r in m[f"none@{hi}"])
    out.append(
        {
            "claim": f"At lr {hi} the network without BN fails to train (final training accuracy below {100 * _FAIL:.0f}%) while BN and noisy BN reach at least {100 * _TRAINS:.0f}%",
            "holds": bool(acc["none"] < _FAIL and min(acc["bn"], acc["noisy"]) >= _TRAINS),
            "evidence": f"final training accuracy at lr {hi}: no BN {100 * acc['none']:.1f}%{' (diverged)' if diverged else ''}, "
            f"BN {100 * acc['bn']:.1f}%, noisy BN {100 * acc['noisy']:.1f}%",
        }
    )
    lr = s["lrs"][0]
    more = []
    ev = []
    for layer in [str(i) for i in s["tracked_layers"]]:
        for kind in ("step_location", "step_spread"):
            none = _avg_drift(m[f"none@{lr}"], layer, kind)
            noisy = _avg_drift(m[f"noisy@{lr}"], layer, kind)
            bn = _avg_drift(m[f"bn@{lr}"], layer, kind)
            more.append(noisy > none)
            ev.append(f"layer {int(layer) + 1} {kind.replace('step_', '')}: noisy BN {noisy:.3f} vs no BN {none:.3f} (BN {bn:.3f})")
    out.append(
        {
            "claim": f"Noisy BN's layer inputs are less stable than without BN: their mean and spread move more from one checkpoint to the next (layers 3 and 9, lr {lr})",
            "holds": all(more),
            "evidence": "; ".join(ev) + f" (RMS change per {s['checkpoint_every']} steps / average std, median over units)",
        }
    )
    return out


def figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Training loss vs step per learning rate; activation-input percentiles over training; drift bars."""
    from ..figures import mean_band, pyplot, save

    plt = pyplot()
    s = results["config"]
    m = results["metrics"]["arms"]
    colors = {"none": "tab:gray", "bn": "tab:blue", "noisy": "tab:orange"}
    paths = []

    fig, axes = plt.subplots(1, len(s["lrs"]), figsize=(5.2 * len(s["lrs"]), 3.8), squeeze=False)
    for ax, lr in zip(axes[0], s["lrs"]):
        for arm in _ARMS:
            runs = m[f"{arm}@{lr}"]
            steps = runs[0]["step"][1:]
            curves = [[np.nan if v is None else v for v in r["loss_curve"]][: len(steps)] for r in runs]
            curves = [c + [np.nan] * (len(steps) - len(c)) for c in curves]
            mean_band(ax, steps, curves, _LABELS[arm] + (" (diverged)" if any(r["diverged"] for r in runs) else ""), color=colors[arm])
        ax.set_yscale("log")
        ax.set_title(f"Training loss, lr {lr}")
        ax.set_xlabel("step")
        ax.set_ylabel("training cross-entropy (window mean)")
        ax.legend(fontsize=8)
    paths.append(save(fig, outdir / "training_loss.png"))

    lr = s["lrs"][0]
    layers = [str(i) for i in s["tracked_layers"]]
    fig, axes = plt.subplots(len(layers), len(_ARMS), figsize=(4.2 * len(_ARMS), 3.0 * len(layers)), squeeze=False)
    for row, layer in enumerate(layers):
        for col, arm in enumerate(_ARMS):
            ax = axes[row][col]
            r = m[f"{arm}@{lr}"][0]
            p = np.asarray(r["percentiles"][layer], dtype=float)  # (T, 3)
            steps = r["step"][: p.shape[0]]
            if p.size:
                ax.fill_between(steps, p[:, 0], p[:, 2], color=colors[arm], alpha=0.25, linewidth=0, label="15th-85th percentile")
                ax.plot(steps, p[:, 1], color=colors[arm], label="median")
            ax.set_title(f"{_LABELS[arm]}: layer {int(layer) + 1}, unit 0 (lr {lr})", fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel("input of the ReLU")
            ax.legend(fontsize=7)
    paths.append(save(fig, outdir / "layer_inputs.png"))

    fig, ax = plt.subplots(figsize=(7, 3.8))
    kinds = ("step_location", "step_spread")
    labels = [f"layer {int(layer) + 1}\n{kind.replace('step_', '')}" for layer in layers for kind in kinds]
    x = np.arange(len(labels))
    width = 0.27
    for k, arm in enumerate(_ARMS):
        vals = [_avg_drift(m[f"{arm}@{lr}"], layer, kind) for layer in layers for kind in kinds]
        ax.bar(x + (k - 1) * width, vals, width, label=_LABELS[arm], color=colors[arm])
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel(f"RMS change per {s['checkpoint_every']} steps / avg std")
    ax.set_title(f"How much layer-input distributions move during training (lr {lr})")
    ax.legend()
    paths.append(save(fig, outdir / "drift.png"))
    return paths
