"""``bias``: a bias directly before BN receives zero gradient and has no effect on the output
(BN subtracts the batch mean, so a constant shift cancels); measured, with the parameters it
wastes and what happens when it is removed from a trained model.

Shape of the argument: h = W u + b, BN(h) = gamma (h - mean_B(h)) / sqrt(var_B(h) + eps) + beta,
and mean_B(h) = W mean_B(u) + b, so b cancels exactly; dL/db = sum over the batch of dL/dh =
gamma/sigma * sum(g - mean(g) - x_hat mean(g x_hat)) = 0.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..config import RunConfig
from ..datasets import load
from ..models import MLP, ConvNet, blocks, count_parameters
from ..progress import Progress
from ..training import TrainSpec, minibatches, train

ID = "bias"
DESCRIPTION = "A bias before BN gets zero gradient and no effect on the output: measured, plus the parameters it wastes"
QUICK_SECONDS = 2.0
EXPLANATION = """
Batch normalization subtracts the mean of its input over the batch. If the layer before it
adds a bias b, that constant shift is subtracted again: BN(W u + b) = BN(W u) for every b, in
training mode. Consequently the loss does not depend on b and its gradient is exactly zero
(up to floating-point rounding); beta, BN's own shift, takes over its role. Ioffe & Szegedy
therefore dropped the bias ("its effect will be canceled by the subsequent mean subtraction"),
yet many model definitions keep it, which wastes parameters, optimizer state and compute.

This experiment takes an MLP with 3 hidden layers of 100 ReLU units and BN, keeps a bias in
front of every BN, sets those biases to large random values, and measures: the size of their
gradient compared with the weights' gradients; how much the training-mode output changes when
the biases are shifted again; and, training the same network with and without those biases
from the same weights on the same batches, how far the two training runs ever drift apart.

One subtlety: in evaluation mode BN uses the running mean, which has absorbed the bias. The
bias can still be removed from a trained model, but only by subtracting it from the running
mean at the same time — exactly what a "strip redundant bias" tool must do. Both ways are
measured. Finally, the parameters these biases waste are counted for the lab's models.
"""


def _settings(cfg: RunConfig) -> dict[str, Any]:
    return {
        "hidden": [100, 100, 100],
        "activation": "relu",
        "norm": "batchnorm.BatchNorm1d before every ReLU, Linear bias kept (the redundant one)",
        "init": "He for weights; the pre-BN biases ~ N(0, 1) to make them non-trivial",
        "bias_shift_std": 10.0,
        "optimizer": "SGD, no momentum, no weight decay",
        "lr": 0.1,
        "batch_size": 60,
        "steps": cfg.pick(tiny=20, quick=500, full=5000),
        "dtype": "float32",
    }


def _with_random_biases(model: MLP, generator: torch.Generator) -> MLP:
    with torch.no_grad():
        for b in blocks(model):
            b.layer.bias.copy_(torch.randn(b.layer.bias.shape, generator=generator))
    return model


def _without_bias(model: MLP, s: dict[str, Any], features: int, classes: int) -> MLP:
    """The same network without the pre-BN biases (weights, BN parameters and head copied)."""
    twin = MLP(features, s["hidden"], classes, act="relu", norm="bn", bias=False)
    state = {k: v for k, v in model.state_dict().items() if not (k.startswith("blocks.") and k.endswith("layer.bias"))}
    twin.load_state_dict(state, strict=True)
    return twin


def _count(model: nn.Module) -> dict[str, int]:
    wasted = sum(b.layer.bias.numel() for b in blocks(model) if getattr(b.layer, "bias", None) is not None and not isinstance(b.norm, nn.Identity))
    return {"parameters": count_parameters(model), "wasted_by_pre_bn_bias": int(wasted)}


def run(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Gradient, output invariance, paired training, eval-mode removal, parameter counts."""
    s = _settings(cfg)
    data = load(cfg.data, cfg.seed, small=cfg.mode == "tiny")
    gen = torch.Generator().manual_seed(cfg.seed)
    model = _with_random_biases(
        MLP(data.features, s["hidden"], data.classes, act="relu", norm="bn", bias=True, init_std="he", generator=gen), gen
    )
    twin = _without_bias(model, s, data.features, data.classes)
    idx = next(minibatches(data.train_x.shape[0], s["batch_size"], torch.Generator().manual_seed(cfg.seed + 1)))
    x = data.train_x[idx]
    y = data.train_y[idx]

    # 1. gradient of the pre-BN biases vs the weights', one batch
    model.train()
    loss = F.cross_entropy(model(x), y)
    model.zero_grad()
    loss.backward()
    bias_grad = [float(b.layer.bias.grad.abs().max()) for b in blocks(model)]
    weight_grad = [float(b.layer.weight.grad.abs().max()) for b in blocks(model)]
    model.zero_grad(set_to_none=True)

    # 2. shifting the biases leaves the training-mode output unchanged
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for b in blocks(shifted):
            b.layer.bias.add_(torch.randn(b.layer.bias.shape, generator=gen) * s["bias_shift_std"])
        out = model(x)
        out_shift = shifted(x)
        out_twin = twin(x)
    shift_delta = float((out - out_shift).abs().max())
    twin_delta = float((out - out_twin).abs().max())
    # the forward above ran in training mode and moved running statistics: start training from
    # identical states again
    model = _with_random_biases(
        MLP(data.features, s["hidden"], data.classes, act="relu", norm="bn", bias=True, init_std="he",
            generator=torch.Generator().manual_seed(cfg.seed)), torch.Generator().manual_seed(cfg.seed + 7)
    )
    twin = _without_bias(model, s, data.features, data.classes)
    bias_before = [b.layer.bias.detach().clone() for b in blocks(model)]

    # 3. paired training: same weights, same batches, with and without the biases
    spec = TrainSpec(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"])
    with progress.task("with bias", total=spec.steps) as tick:
        r_bias = train(model, data.train_x, data.train_y, spec, generator=torch.Generator().manual_seed(cfg.seed + 2), tick=tick)
    with progress.task("without bias", total=spec.steps) as tick:
        r_twin = train(twin, data.train_x, data.train_y, spec, generator=torch.Generator().manual_seed(cfg.seed + 2), tick=tick)
    loss_delta = float(np.max(np.abs(np.asarray(r_bias.losses) - np.asarray(r_twin.losses))))
    bias_moved = max(float((b.layer.bias.detach() - b0).abs().max()) for b, b0 in zip(blocks(model), bias_before))
    weight_delta = max(
        float((a.layer.weight.detach() - b.layer.weight.detach()).abs().max()) for a, b in zip(blocks(model), blocks(twin))
    )

    # 4. eval mode: remove the biases from the trained model, with and without fixing running_mean
    model.eval()
    xt = data.test_x
    with torch.no_grad():
        ref = model(xt)
        naive = copy.deepcopy(model)
        folded = copy.deepcopy(model)
        for b in blocks(naive):
            b.layer.bias.zero_()
        for b in blocks(folded):
            b.norm.running_mean.sub_(b.layer.bias)
            b.layer.bias.zero_()
        naive_delta = float((naive(xt) - ref).abs().max())
        folded_delta = float((folded(xt) - ref).abs().max())
        naive_changed = float((naive(xt).argmax(1) != ref.argmax(1)).float().mean())

    # 5. parameters wasted in the lab's models (with the bias kept everywhere)
    counts = {
        "MLP 64-3x100-10 (ioffe2015-fig1)": _count(MLP(64, [100] * 3, 10, norm="bn", bias=True)),
        "MLP 64-3x256-10 (dropout)": _count(MLP(64, [256] * 3, 10, norm="bn", bias=True)),
        "MLP 64-8x100-10 (lr-sweep)": _count(MLP(64, [100] * 8, 10, norm="bn", bias=True)),
        "ConvNet 16-32-64 on 8x8": _count(ConvNet((1, 8, 8), (16, 32, 64), 10, norm="bn", bias=True)),
    }
    metrics = {
        "bias_grad_max": bias_grad,
        "weight_grad_max": weight_grad,
        "train_output_change_after_bias_shift": shift_delta,
        "train_output_change_without_bias": twin_delta,
        "paired_training_max_loss_delta": loss_delta,
        "paired_training_max_weight_delta": weight_delta,
        "bias_max_movement_during_training": bias_moved,
        "paired_losses_with_bias": r_bias.losses,
        "paired_losses_without_bias": r_twin.losses,
        "eval_output_change_bias_zeroed": naive_delta,
        "eval_predictions_changed_bias_zeroed": naive_changed,
        "eval_output_change_bias_folded_into_running_mean": folded_delta,
        "parameter_counts": counts,
    }
    return {"config": s, "data": data.describe(), "metrics": metrics}


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Zero gradient, no effect, identical training, removal needs the running mean fixed."""
    m = results["metrics"]
    ratio = max(m["bias_grad_max"]) / max(min(m["weight_grad_max"]), 1e-30)
    out = [
        {
            "claim": "A bias directly before BN receives zero gradient (below 1e-5 of the weights' gradient: float32 rounding)",
            "holds": bool(ratio < 1e-5),
            "evidence": f"max |dL/db| per layer {', '.join(f'{v:.1e}' for v in m['bias_grad_max'])} vs max |dL/dW| "
            f"{', '.join(f'{v:.1e}' for v in m['weight_grad_max'])} (ratio {ratio:.1e})",
        },
        {
            "claim": "It has no effect on the training-mode output: shifting those biases by N(0, 10^2), or removing them, changes the logits by < 1e-4",
            "holds": bool(m["train_output_change_after_bias_shift"] < 1e-4 and m["train_output_change_without_bias"] < 1e-4),
            "evidence": f"max |change| of the logits: {m['train_output_change_after_bias_shift']:.1e} (shifted), "
            f"{m['train_output_change_without_bias']:.1e} (removed)",
        },
        {
            "claim": "Training with and without those biases follows the same trajectory, and the biases never move",
            "holds": bool(m["paired_training_max_loss_delta"] < 1e-3 and m["bias_max_movement_during_training"] < 1e-4),
            "evidence": f"{results['config']['steps']} SGD steps on the same batches: max |loss difference| {m['paired_training_max_loss_delta']:.1e}, "
            f"max |weight difference| {m['paired_training_max_weight_delta']:.1e}, max bias movement {m['bias_max_movement_during_training']:.1e}",
        },
        {
            "claim": "In a trained model the bias can be removed only together with the running mean (subtracting it keeps eval outputs within 1e-4; zeroing it alone does not)",
            "holds": bool(m["eval_output_change_bias_folded_into_running_mean"] < 1e-4 and m["eval_output_change_bias_zeroed"] > 1e-2),
            "evidence": f"max |change| of eval logits: {m['eval_output_change_bias_folded_into_running_mean']:.1e} with running_mean -= b; "
            f"{m['eval_output_change_bias_zeroed']:.3g} with the bias zeroed alone ({100 * m['eval_predictions_changed_bias_zeroed']:.1f}% of test predictions change)",
        },
    ]
    return out


def figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Gradients (log scale), paired loss curves, wasted parameters."""
    from ..figures import pyplot, save

    plt = pyplot()
    m = results["metrics"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    layers = np.arange(1, len(m["bias_grad_max"]) + 1)
    axes[0].bar(layers - 0.2, m["weight_grad_max"], width=0.4, label="weights W", color="tab:blue")
    axes[0].bar(layers + 0.2, np.maximum(m["bias_grad_max"], 1e-30), width=0.4, label="bias b before BN", color="tab:orange")
    axes[0].set_yscale("log")
    axes[0].set_xticks(layers)
    axes[0].set_xlabel("hidden layer")
    axes[0].set_ylabel("max |gradient| on one batch")
    axes[0].set_title("Gradients: the bias gets only rounding noise")
    axes[0].legend()
    axes[0].grid(alpha=0.3, axis="y")

    a = np.asarray(m["paired_losses_with_bias"], dtype=float)
    b = np.asarray(m["paired_losses_without_bias"], dtype=float)
    steps = np.arange(1, a.size + 1)
    axes[1].plot(steps, a, color="tab:orange", label="with the pre-BN bias", linewidth=2.5, alpha=0.6)
    axes[1].plot(steps, b, color="tab:blue", label="without it", linewidth=1, linestyle="--")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel("training loss (minibatch)")
    axes[1].set_title(f"Same weights, same batches: max |difference| {m['paired_training_max_loss_delta']:.1e}")
    axes[1].legend()
    axes[1].grid(alpha=0.3)

    counts = m["parameter_counts"]
    names = list(counts)
    wasted = [counts[n]["wasted_by_pre_bn_bias"] for n in names]
    total = [counts[n]["parameters"] for n in names]
    axes[2].barh(range(len(names)), wasted, color="tab:orange")
    for i, (w, t) in enumerate(zip(wasted, total)):
        axes[2].text(w, i, f" {w} of {t} ({100 * w / t:.2f}%)", va="center", fontsize=8)
    axes[2].set_yticks(range(len(names)))
    axes[2].set_yticklabels(names, fontsize=8)
    axes[2].set_xlabel("parameters in biases directly before BN")
    axes[2].set_title("Parameters wasted")
    axes[2].set_xlim(0, max(wasted) * 1.8)
    return [save(fig, Path(outdir) / "bias_before_bn.png")]
