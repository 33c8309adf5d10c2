"""``ioffe2015-fig1``: Ioffe & Szegedy 2015, Figure 1 — BN trains faster and keeps the inputs
of the sigmoids stable; inference with Alg. 2 population statistics vs the running average.

Setup (PAPERS.md §1): 3 fully connected hidden layers of 100 sigmoid units, FC-10,
cross-entropy, batch 60, with and without BN (our ``batchnorm.BatchNorm1d``) on every hidden
layer, placed before the sigmoid (``sigmoid(BN(W u))``, the Linear bias dropped as beta
subsumes it). Not stated by the paper and chosen here: plain SGD, lr 0.1, constant; weights
~ N(0, 0.1^2), biases 0; both arms start from the same weights and see the same minibatches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..datasets import Dataset, load
from ..models import MLP, blocks
from ..popstats import population_statistics
from ..progress import Progress
from ..training import TrainResult, TrainSpec, evaluate, train

ID = "ioffe2015-fig1"
DESCRIPTION = "Ioffe & Szegedy Fig. 1: BN vs none on a 3x100 sigmoid MLP; accuracy vs step, sigmoid-input percentiles, Alg. 2 inference"
QUICK_SECONDS = 20.0
EXPLANATION = """
Batch normalization (BN) standardizes every unit's input over the minibatch — subtract the
batch mean, divide by the batch standard deviation — and then applies a learned scale gamma
and shift beta. Ioffe & Szegedy argued that this removes "internal covariate shift": without
it, the distribution of each layer's input keeps moving while the earlier layers learn, and
the later layers must keep chasing it.

Their Figure 1 shows this on MNIST with a small network: 3 fully connected hidden layers of
100 sigmoid units, batch 60, trained with and without BN on every hidden layer. (a) The BN
network's test accuracy is higher throughout and reaches the baseline's accuracy much
earlier. (b, c) For one unit of the last hidden layer, the 15th, 50th and 85th percentiles of
the sigmoid's input over the test set are tracked during training: without BN they wander
(the median moves, the spread keeps widening); with BN (where the sigmoid's input is
gamma*x_hat + beta, measured in the training network with batch statistics) they settle early.

Here the same network is trained on the scikit-learn digits (8x8 images, 1437 training and
360 test examples by default), which runs on a CPU in seconds. A BN network needs fixed
statistics for inference (a prediction must not depend on the other examples in a batch).
The paper's Alg. 2 freezes the weights and averages over training batches of m examples:
E[x] = mean of the batch means, Var[x] = m/(m-1) times the mean of the batch variances
("population statistics"). PyTorch instead keeps an exponential running average during
training (momentum 0.1). Both are evaluated side by side.

Choices the paper does not state are recorded below: plain SGD with a constant learning
rate 0.1, weights drawn from N(0, 0.1^2) and biases 0, both networks start from the same
weights and see the same minibatch sequence. The accuracy curve during training uses the
running average (the paper mentions moving averages for exactly this); the population
statistics are recomputed at every checkpoint for the side-by-side comparison.
"""

# claim thresholds (see claims())
_SPEEDUP = 3.0  # "several times fewer steps"
_POP_TOLERANCE = 0.005  # population statistics may trail the running average by at most 0.5 pp
_WIDEN = 1.05  # the baseline's spread still grows by >= 5% over the second half ...
_WIDEN_VS_BN = 3.0  # ... and by >= 3x BN's relative change
_SETTLED = 0.10  # BN's percentiles move by < 10% of the final spread over the second half


_MNIST1D_CHOICE = (
    "MNIST-1D, quick: 20,000 steps (checkpoints every 400) instead of 5,000: at 5,000 steps the baseline is still at "
    "~31% (PAPERS.md's calibration: 32.9% at 5k, 67.1% at 50k), i.e. it has not started to train"
)


def _settings(cfg: RunConfig) -> dict[str, Any]:
    if cfg.data == "mnist1d" and cfg.mode == "quick":
        return {**_settings(RunConfig(mode="quick", seed=cfg.seed)), "steps": 20000, "checkpoint_every": 400, "mnist1d_choice": _MNIST1D_CHOICE}
    steps = cfg.pick(tiny=60, quick=5000, full=50000)
    every = cfg.pick(tiny=20, quick=100, full=500)
    return {
        "hidden": [100, 100, 100],
        "activation": "sigmoid",
        "norm": "batchnorm.BatchNorm1d on every hidden layer, before the sigmoid (eps 1e-5, momentum 0.1)",
        "hidden_bias": "none with BN (beta subsumes it), zero-initialized without BN",
        "batch_size": 60,
        "steps": steps,
        "optimizer": "SGD (no momentum, no weight decay)",
        "lr": 0.1,
        "init": "weights ~ N(0, std^2), biases 0; same initial weights and minibatch order for both arms",
        "init_std": 0.1,
        "checkpoint_every": every,
        "tracked_unit": 0,
        "tracked_layer": "last hidden layer (3rd), input of its sigmoid",
        "percentile_data": "test set, in batches of 60; BN net in training mode (batch statistics), running stats untouched",
        "percentiles": [15, 50, 85],
        "population_statistics": "Alg. 2: weights frozen, one pass of training batches of 60; E[x] = mean of mu_B, Var[x] = 60/59 * mean of sigma_B^2",
        "running_average": "PyTorch EMA, momentum 0.1 (running = 0.9 running + 0.1 batch)",
        "claim_thresholds": {
            "speedup_at_least": _SPEEDUP,
            "population_vs_running_tolerance": _POP_TOLERANCE,
            "baseline_spread_growth_at_least": _WIDEN,
            "baseline_vs_bn_spread_change_factor": _WIDEN_VS_BN,
            "bn_settled_relative_move_below": _SETTLED,
        },
    }


@torch.no_grad()
def _sigmoid_inputs(model: nn.Module, x: Tensor, unit: int, batch: int) -> Tensor:
    """Input of the last hidden sigmoid for ``unit``, over x in batches of ``batch``, with the
    network in training mode (BN uses batch statistics); BN buffers are restored afterwards.

    Shape: x (N, D) -> (N,).
    """
    last = list(blocks(model))[-1]
    captured: list[Tensor] = []
    handle = last.act.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0][:, unit].clone()))
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    was_training = model.training
    try:
        model.train()
        for start in range(0, x.shape[0] - batch + 1, batch):
            model(x[start : start + batch])
    finally:
        handle.remove()
        model.train(was_training)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
    return torch.cat(captured)


@torch.no_grad()
def _batch_stats_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int) -> float:
    """Test accuracy when BN normalizes each test batch of ``batch`` by its own statistics
    (training-mode forward; BN buffers restored). The tail that does not fill a batch is left out."""
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    was_training = model.training
    correct = 0
    seen = 0
    try:
        model.train()
        for start in range(0, x.shape[0] - batch + 1, batch):
            logits = model(x[start : start + batch])
            correct += int((logits.argmax(dim=1) == y[start : start + batch]).sum())
            seen += batch
    finally:
        model.train(was_training)
        for name, buf in model.named_buffers():
            buf.copy_(saved[name])
    return correct / max(seen, 1)


def _train_arm(cfg: RunConfig, s: dict[str, Any], data: Dataset, norm: str | None, progress: Progress) -> dict[str, Any]:
    """Train one network (norm None = baseline) and record everything at the checkpoints."""
    spec = TrainSpec(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"])
    checkpoints = list(range(0, spec.steps + 1, s["checkpoint_every"]))
    if checkpoints[-1] != spec.steps:
        checkpoints.append(spec.steps)
    model = MLP(
        data.features,
        s["hidden"],
        data.classes,
        act="sigmoid",
        norm=norm,
        init_std=s["init_std"],
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    rec: dict[str, Any] = {"step": [], "test_acc": [], "test_loss": [], "train_loss": [], "percentiles": []}
    if norm is not None:
        rec["test_acc_population"] = []
        rec["test_acc_batch_stats"] = []
    pop_gen = torch.Generator().manual_seed(cfg.seed + 1)
    seen = [0]

    def record(step: int, result: TrainResult) -> None:
        loss, acc = evaluate(model, data.test_x, data.test_y)
        rec["step"].append(step)
        rec["test_acc"].append(acc)
        rec["test_loss"].append(loss)
        recent = result.losses[seen[0] :]
        seen[0] = len(result.losses)
        rec["train_loss"].append(float(np.mean(recent)) if recent else None)
        z = _sigmoid_inputs(model, data.test_x, s["tracked_unit"], s["batch_size"])
        rec["percentiles"].append(np.percentile(z.numpy(), s["percentiles"]).tolist())
        if norm is not None:
            pop = population_statistics(model, data.train_x, batch_size=s["batch_size"], generator=pop_gen)
            rec["test_acc_population"].append(evaluate(pop, data.test_x, data.test_y)[1])
            rec["test_acc_batch_stats"].append(_batch_stats_accuracy(model, data.test_x, data.test_y, s["batch_size"]))

    with progress.task("BN" if norm else "no BN", total=spec.steps) as tick:
        result = train(
            model,
            data.train_x,
            data.train_y,
            spec,
            generator=torch.Generator().manual_seed(cfg.seed + 2),
            checkpoints=checkpoints,
            on_checkpoint=record,
            tick=tick,
        )
    rec["diverged"] = result.diverged
    rec["steps_done"] = result.steps_done
    return rec


def run(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Train both networks and record accuracy, percentiles and inference statistics."""
    s = _settings(cfg)
    data = load(cfg.data, cfg.seed, small=cfg.mode == "tiny")
    metrics = {
        "baseline": _train_arm(cfg, s, data, None, progress),
        "bn": _train_arm(cfg, s, data, "bn", progress),
    }
    return {"config": s, "data": data.describe(), "metrics": metrics}


def _first_reaching(steps: list[int], acc: list[float], target: float) -> int | None:
    for step, a in zip(steps, acc):
        if step > 0 and a >= target:
            return step
    return None


def _second_half(steps: list[int]) -> list[int]:
    """Indices of the checkpoints in the second half of training (step >= T/2)."""
    last = steps[-1]
    return [i for i, s in enumerate(steps) if s >= last / 2]


def _spread(p: list[float]) -> float:
    return float(p[2] - p[0])


def _relative_drift(percentiles: list[list[float]], idx: list[int]) -> float:
    """Largest move of any of the three percentiles over checkpoints ``idx`` relative to the
    final value, in units of the final 15-85 spread."""
    final = percentiles[idx[-1]]
    move = max(abs(percentiles[i][k] - final[k]) for i in idx for k in range(3))
    return move / max(_spread(final), 1e-12)


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's Figure 1 claims, judged from the saved metrics."""
    m = results["metrics"]
    base = m["baseline"]
    bn = m["bn"]
    out = []

    # (a) BN above the baseline at every checkpoint after the start
    steps = bn["step"]
    margins = [(s, b - a) for s, a, b in zip(steps, base["test_acc"], bn["test_acc"]) if s > 0]
    worst_step, worst = min(margins, key=lambda t: t[1])
    out.append(
        {
            "claim": "With BN, test accuracy is above the baseline's at every checkpoint",
            "holds": bool(worst > 0 and not bn["diverged"]),
            "evidence": f"{len(margins)} checkpoints; smallest margin {100 * worst:+.1f} pp (step {worst_step}); "
            f"final {100 * bn['test_acc'][-1]:.1f}% with BN vs {100 * base['test_acc'][-1]:.1f}% without",
        }
    )

    # (a) speed: steps to reach the baseline's best accuracy
    target = max(base["test_acc"])
    s_base = _first_reaching(base["step"], base["test_acc"], target)
    s_bn = _first_reaching(bn["step"], bn["test_acc"], target)
    speedup = (s_base / s_bn) if (s_base and s_bn) else 0.0
    out.append(
        {
            "claim": f"BN reaches the baseline's best test accuracy in several (>= {_SPEEDUP:g}x) times fewer steps",
            "holds": bool(speedup >= _SPEEDUP),
            "evidence": f"target {100 * target:.1f}% (baseline's best): baseline first at step {s_base}, BN at step {s_bn}"
            + (f" ({speedup:.1f}x fewer)" if speedup else " (BN never reached it)"),
        }
    )

    # (b, c) the sigmoid's input distribution: baseline keeps changing, BN settles
    half = _second_half(steps)
    spread_base = (_spread(base["percentiles"][half[0]]), _spread(base["percentiles"][-1]))
    spread_bn = (_spread(bn["percentiles"][half[0]]), _spread(bn["percentiles"][-1]))
    widen_base = spread_base[1] / max(spread_base[0], 1e-12)
    change_bn = abs(spread_bn[1] / max(spread_bn[0], 1e-12) - 1)
    out.append(
        {
            "claim": f"Without BN the 15-85 percentile spread of the last-layer sigmoid input keeps widening over the second half of training (>= {100 * (_WIDEN - 1):g}%), at least {_WIDEN_VS_BN:g}x more than BN's spread changes",
            "holds": bool(widen_base >= _WIDEN and widen_base - 1 >= _WIDEN_VS_BN * change_bn),
            "evidence": f"baseline spread {spread_base[0]:.2f} -> {spread_base[1]:.2f} ({100 * (widen_base - 1):+.1f}%) between steps "
            f"{steps[half[0]]} and {steps[-1]}; BN {spread_bn[0]:.2f} -> {spread_bn[1]:.2f} ({100 * change_bn:.1f}% change)",
        }
    )
    drift_base = _relative_drift(base["percentiles"], half)
    drift_bn = _relative_drift(bn["percentiles"], half)
    med = [p[1] for p in base["percentiles"]]
    out.append(
        {
            "claim": "BN's sigmoid-input percentiles settle early: over the second half they move by < 10% of the final spread and less than half as much as the baseline's (whose median moves)",
            "holds": bool(drift_bn < _SETTLED and drift_bn < 0.5 * drift_base),
            "evidence": f"largest move over steps {steps[half[0]]}-{steps[-1]}, relative to the final spread: BN {drift_bn:.3f}, "
            f"baseline {drift_base:.3f}; baseline median {med[0]:+.2f} at step 0 -> {med[half[0]]:+.2f} -> {med[-1]:+.2f}",
        }
    )

    # inference: Alg. 2 population statistics vs the running average
    pop = bn["test_acc_population"]
    ema = bn["test_acc"]
    mean_pop = float(np.mean([pop[i] for i in half]))
    mean_ema = float(np.mean([ema[i] for i in half]))
    out.append(
        {
            "claim": f"Inference with Alg. 2 population statistics is as accurate as with the running average (within {100 * _POP_TOLERANCE:g} pp, or better)",
            "holds": bool(pop[-1] >= ema[-1] - _POP_TOLERANCE and mean_pop >= mean_ema - _POP_TOLERANCE),
            "evidence": f"final {100 * pop[-1]:.2f}% (population) vs {100 * ema[-1]:.2f}% (running average); "
            f"mean over the second half {100 * mean_pop:.2f}% vs {100 * mean_ema:.2f}%; "
            f"batch statistics of 60 test examples: {100 * bn['test_acc_batch_stats'][-1]:.2f}%",
        }
    )
    return out


def figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Fig. 1(a) accuracy, Fig. 1(b, c) percentiles, inference side by side, training loss."""
    from ..figures import pyplot, save

    plt = pyplot()
    m = results["metrics"]
    base = m["baseline"]
    bn = m["bn"]
    data = results.get("run", {}).get("data", "digits")
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, zoom in zip(axes, (False, True)):
        ax.plot(base["step"], base["test_acc"], label="without BN", color="tab:blue")
        ax.plot(bn["step"], bn["test_acc"], label="with BN (running average)", color="tab:red")
        ax.plot(bn["step"], bn["test_acc_population"], label="with BN (Alg. 2 population stats)", color="tab:red", linestyle=":")
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        if zoom:
            low = min(min(bn["test_acc"][1:] or [0.9]), base["test_acc"][-1]) - 0.02
            ax.set_ylim(max(low, 0.0), 1.0)
            ax.set_title("(a) zoomed")
        else:
            ax.set_ylim(0.0, 1.0)
            ax.set_title(f"(a) test accuracy vs step ({data})")
        ax.legend(loc="lower right")
    paths.append(save(fig, Path(outdir) / "fig1a_accuracy.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    unit = results["config"].get("tracked_unit", 0)
    for ax, rec, title in ((axes[0], base, "(b) without BN"), (axes[1], bn, "(c) with BN: gamma*x_hat + beta")):
        p = np.asarray(rec["percentiles"])  # (checkpoints, 3)
        ax.fill_between(rec["step"], p[:, 0], p[:, 2], color="tab:gray", alpha=0.2, linewidth=0)
        for k, (q, style) in enumerate(zip((15, 50, 85), ("--", "-", "--"))):
            ax.plot(rec["step"], p[:, k], style, color="black" if k == 1 else "tab:gray", label=f"{q}th percentile")
        ax.set_title(f"{title}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    axes[0].set_ylabel(f"input to sigmoid (last hidden layer, unit {unit})")
    fig.suptitle("Distribution of one sigmoid's input over the test set during training")
    paths.append(save(fig, Path(outdir) / "fig1bc_sigmoid_input_percentiles.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    idx = [i for i, s in enumerate(bn["step"]) if s > 0]
    steps = [bn["step"][i] for i in idx]
    ax.plot(steps, [bn["test_acc"][i] for i in idx], label="running average (EMA, momentum 0.1)", color="tab:red")
    ax.plot(steps, [bn["test_acc_population"][i] for i in idx], label="Alg. 2 population statistics", color="tab:green", linestyle="--")
    ax.plot(steps, [bn["test_acc_batch_stats"][i] for i in idx], label="statistics of each test batch of 60", color="tab:purple", alpha=0.7, linestyle=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy of the BN network")
    ax.set_title("BN inference: which statistics normalize a test example")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    paths.append(save(fig, Path(outdir) / "inference_statistics.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for rec, label, color in ((base, "without BN", "tab:blue"), (bn, "with BN", "tab:red")):
        pts = [(s, v) for s, v in zip(rec["step"], rec["train_loss"]) if v is not None]
        ax.plot([s for s, _ in pts], [v for _, v in pts], label=label, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (mean over the steps since the last checkpoint)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(save(fig, Path(outdir) / "train_loss.png"))
    return paths
