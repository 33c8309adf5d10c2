"""``bias``: a bias directly before BN gets zero gradient and has no effect on the output, the
parameters it wastes, and its removal from a trained model. Setup, rules and sources: ``bias.md``."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..claims_spec import Claims, Declared, listed
from ..datasets import Dataset
from ..declare import mlp_for, seeded, train_seeds
from ..experiment import Experiment, PerSeed, column
from ..figures import NamedFigures, categories, dress, pyplot
from ..models import MLP, ConvNet, blocks, count_parameters
from ..progress import Progress
from ..training import TrainSpec, minibatches, train_mode

_ARMS = ("with bias", "without bias")  # the paired training's arms


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``bias.settings.toml``."""

    steps: int


@torch.no_grad()
def _model(s: Settings, data: Dataset, seed: int) -> MLP:
    """The seed's BN MLP with pre-BN biases ~ N(0, 1) (weights from ``seed``, biases from seed + 7)."""
    model = mlp_for(data, s.hidden, act=s.activation, norm="bn", bias=True, init_std="he", generator=seeded(seed))
    gen = seeded(seed + 7)
    for b in blocks(model):
        b.layer.bias.copy_(torch.randn(b.layer.bias.shape, generator=gen))
    return model


def _without_bias(model: MLP, s: Settings, data: Dataset) -> MLP:
    """The same network without the pre-BN biases (weights, BN parameters and head copied)."""
    twin = mlp_for(data, s.hidden, act=s.activation, norm="bn", bias=False)
    twin.load_state_dict(model.state_dict(), strict=False)  # all but the pre-BN biases, which twin lacks
    return twin


def _gap(a: Tensor, b: Tensor) -> float:
    """max |a - b| over all entries."""
    return float((a.detach() - b.detach()).abs().max())


def _parameter_counts() -> dict[str, dict[str, int]]:
    """The parameters of the lab's BN networks built with a bias before every BN layer, and how
    many of them are those biases."""
    models: dict[str, nn.Module] = {
        "MLP 64-3x100-10 (ioffe2015-fig1)": MLP(64, [100] * 3, 10, norm="bn", bias=True),
        "MLP 64-3x256-10 (dropout)": MLP(64, [256] * 3, 10, norm="bn", bias=True),
        "MLP 64-8x100-10 (lr-sweep)": MLP(64, [100] * 8, 10, norm="bn", bias=True),
        "ConvNet 16-32-64 on 8x8": ConvNet((1, 8, 8), (16, 32, 64), 10, norm="bn", bias=True),
    }
    return {
        name: {"parameters": count_parameters(m), "wasted_by_pre_bn_bias": sum(b.layer.bias.numel() for b in blocks(m))}
        for name, m in models.items()
    }


def _one_batch_probes(s: Settings, data: Dataset, seed: int) -> dict[str, Any]:
    """Gradient of the biases vs the weights' on one batch, and the training-mode output with
    the biases shifted or removed (on a fresh copy: the forwards move running statistics)."""
    model = _model(s, data, seed)
    twin, x, y = _without_bias(model, s, data), data.train_x, data.train_y
    idx = next(minibatches(x.shape[0], s.batch_size, seeded(seed + 1)))
    x, y = x[idx], y[idx]
    F.cross_entropy(model(x), y).backward()  # a fresh model: in training mode, no gradients yet
    grads = {
        f"{k}_grad_max": [float(getattr(b.layer, k).grad.abs().max()) for b in blocks(model)]
        for k in ("bias", "weight")
    }
    shifted, gen = copy.deepcopy(model), seeded(seed + 3)
    with torch.no_grad():
        for b in blocks(shifted):
            b.layer.bias.add_(torch.randn(b.layer.bias.shape, generator=gen) * s.bias_shift_std)
        out = model(x)
        changes = {"after_bias_shift": _gap(out, shifted(x)), "without_bias": _gap(out, twin(x))}
    return {**grads, **{f"train_output_change_{k}": v for k, v in changes.items()}}


@torch.no_grad()
def _eval_removal(model: MLP, x: torch.Tensor) -> dict[str, float]:
    """Eval-mode logits after removing the pre-BN biases: zeroed alone, or folded into
    running_mean (running_mean -= b). The model itself is left untouched."""
    with train_mode(model, False):
        ref = model(x)
        naive, folded = copy.deepcopy(model), copy.deepcopy(model)
        for a, b in zip(blocks(naive), blocks(folded)):
            a.layer.bias.zero_()
            b.norm.running_mean.sub_(b.layer.bias)
            b.layer.bias.zero_()
        out_naive, out_folded = naive(x), folded(x)
    return {
        "eval_output_change_bias_zeroed": _gap(out_naive, ref),
        "eval_predictions_changed_bias_zeroed": float((out_naive.argmax(1) != ref.argmax(1)).float().mean()),
        "eval_output_change_bias_folded_into_running_mean": _gap(out_folded, ref),
    }


class Bias(Experiment):
    """The redundant pre-BN bias over several seeds."""

    DESCRIPTION = "A bias before BN gets zero gradient and no effect on the output: measured over seeds, plus the parameters it wastes"

    def run_seeds(self, s: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress) -> PerSeed:
        per_seed = [_one_batch_probes(s, d, seed) for d, seed in zip(data, seeds)]
        with_bias = [_model(s, d, seed) for d, seed in zip(data, seeds)]
        without = [_without_bias(m, s, d).double() for m, d in zip(with_bias, data)]
        with_bias = [m.double() for m in with_bias]
        before = [[b.layer.bias.detach().clone() for b in blocks(m)] for m in with_bias]
        spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=s.lr)
        data64 = [replace(d, train_x=d.train_x.double()) for d in data]
        saved = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # the stacked BN layers' new parameters too
        try:
            arms = [train_seeds(ms, data64, seeds, spec, a, progress) for a, ms in zip(_ARMS, (with_bias, without))]
        finally:
            torch.set_default_dtype(saved)
        for k, (m, twin, d, r_bias, r_twin) in enumerate(zip(with_bias, without, data, *arms)):
            losses = np.abs(np.asarray(r_bias.losses) - np.asarray(r_twin.losses))
            weights = max(_gap(a.layer.weight, b.layer.weight) for a, b in zip(blocks(m), blocks(twin)))
            per_seed[k].update(
                paired_training_max_loss_delta=float(np.max(losses)),
                paired_training_max_weight_delta=weights,
                bias_max_movement_during_training=max(_gap(b.layer.bias, b0) for b, b0 in zip(blocks(m), before[k])),
                paired_losses_with_bias=r_bias.losses,
                paired_losses_without_bias=r_twin.losses,
                diverged=bool(r_bias.diverged or r_twin.diverged),
                **_eval_removal(m, d.test_x.double()),
            )
        counts = _parameter_counts()
        return [{**m, "parameter_counts": counts} for m in per_seed]

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Zero gradient, no effect, identical training, removal needs the running mean fixed."""
        per = results["metrics"]["per_seed"]
        col = functools.partial(column, per)
        shifted, removed = col("train_output_change_after_bias_shift"), col("train_output_change_without_bias")
        return Claims(
            __name__,
            results,
            ratio=[max(m["bias_grad_max"]) / max(min(m["weight_grad_max"]), 1e-30) for m in per],
            bias_grad0=per[0]["bias_grad_max"],
            weight_grad0=per[0]["weight_grad_max"],
            out_change=[max(a, b) for a, b in zip(shifted, removed)],
            loss=col("paired_training_max_loss_delta"),
            weight=col("paired_training_max_weight_delta"),
            moved=col("bias_max_movement_during_training"),
            folded=col("eval_output_change_bias_folded_into_running_mean"),
            zeroed=col("eval_output_change_bias_zeroed"),
            changed=listed((100 * v for v in col("eval_predictions_changed_bias_zeroed")), "{:.1f}%"),
        ).all()

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Gradients (log scale), paired loss curves, wasted parameters (the first seed)."""
        m = results["metrics"]["per_seed"][0]
        fig, axes = pyplot().subplots(1, 3, figsize=(14, 4.2))
        layers = np.arange(1, len(m["bias_grad_max"]) + 1)
        axes[0].bar(layers - 0.2, m["weight_grad_max"], width=0.4, label="weights W", color="tab:blue")
        bias_grad = np.maximum(m["bias_grad_max"], 1e-30)
        axes[0].bar(layers + 0.2, bias_grad, width=0.4, label="bias b before BN", color="tab:orange")
        labels = {"xlabel": "hidden layer", "ylabel": "max |gradient| on one batch", "xticks": layers}
        top = 1e3 * max(m["weight_grad_max"])  # room for the legend above the bars
        title = "Gradients: the bias gets only rounding noise"
        dress(axes[0], title, yscale="log", ylim=(None, top), **labels, grid="y", legend={"loc": "upper right"})

        a, b = (np.asarray(m[f"paired_losses_{k}"], dtype=float) for k in ("with_bias", "without_bias"))
        steps = np.arange(1, a.size + 1)
        axes[1].plot(steps, a, color="tab:orange", label="with the pre-BN bias", linewidth=2.5, alpha=0.6)
        axes[1].plot(steps, b, color="tab:blue", label="without it", linewidth=1, linestyle="--")
        title = f"Same weights, same batches: max |difference| {m['paired_training_max_loss_delta']:.1e}"
        labels = {"xlabel": "training step", "ylabel": "training loss (minibatch)"}
        dress(axes[1], title, yscale="log", **labels, grid=True, legend=True)

        names, counts = list(m["parameter_counts"]), list(m["parameter_counts"].values())
        wasted, total = [c["wasted_by_pre_bn_bias"] for c in counts], [c["parameters"] for c in counts]
        axes[2].barh(range(len(names)), wasted, color="tab:orange")
        for i, (w, t) in enumerate(zip(wasted, total)):
            axes[2].text(w, i, f" {w} of {t} ({100 * w / t:.2f}%)", va="center", fontsize=8)
        categories(axes[2].yaxis, names, fontsize=8)
        xlabel = "parameters in biases directly before BN"
        dress(axes[2], "Parameters wasted", xlim=(0, max(wasted) * 1.8), xlabel=xlabel)
        yield "bias_before_bn.png", fig


EXPERIMENT = Bias()
