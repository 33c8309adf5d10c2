"""``bias``: a bias directly before BN receives zero gradient and has no effect on the output
(BN subtracts the batch mean, so a constant shift cancels); measured over seeds, with the
parameters it wastes and what happens when it is removed from a trained model.
Setup, the rules fixed before any run and each setting's source: ``bias.md``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..claims_spec import Claims, Declared
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import mlp_for, seeded
from ..experiment import Experiment, column
from ..models import MLP, ConvNet, blocks, count_parameters
from ..progress import Progress
from ..stacked import train_stacked
from ..training import TrainSpec, minibatches
from ..verdict import part

ID = "bias"
DESCRIPTION = "A bias before BN gets zero gradient and no effect on the output: measured over seeds, plus the parameters it wastes"
QUICK_SECONDS = 4.0


@dataclass(frozen=True)
class Settings(Declared):
    """The settings the code computes or reads; every constant one is in ``bias.settings.toml``
    (each one's meaning and source: ``bias.md``)."""

    steps: int
    hidden: tuple[int, ...]
    activation: str
    bias_shift_std: float
    lr: float
    batch_size: int
    dtype: str


def _with_random_biases(model: MLP, generator: torch.Generator) -> MLP:
    with torch.no_grad():
        for b in blocks(model):
            b.layer.bias.copy_(torch.randn(b.layer.bias.shape, generator=generator))
    return model


def _model(s: Settings, data: Dataset, seed: int) -> MLP:
    """The seed's BN MLP with random pre-BN biases (weights from ``seed``, biases from seed + 7)."""
    model = mlp_for(data, s.hidden, act=s.activation, norm="bn", bias=True, init_std="he", generator=seeded(seed))
    return _with_random_biases(model, seeded(seed + 7))


def _without_bias(model: MLP, s: Settings, data: Dataset) -> MLP:
    """The same network without the pre-BN biases (weights, BN parameters and head copied)."""
    twin = mlp_for(data, s.hidden, act=s.activation, norm="bn", bias=False)
    state = {k: v for k, v in model.state_dict().items() if not (k.startswith("blocks.") and k.endswith("layer.bias"))}
    twin.load_state_dict(state, strict=True)
    return twin


def _gap(a: Tensor, b: Tensor) -> float:
    """max |a - b| over all entries."""
    return float((a.detach() - b.detach()).abs().max())


def _count(model: nn.Module) -> dict[str, int]:
    wasted = sum(
        b.layer.bias.numel()
        for b in blocks(model)
        if getattr(b.layer, "bias", None) is not None and not isinstance(b.norm, nn.Identity)
    )
    return {"parameters": count_parameters(model), "wasted_by_pre_bn_bias": int(wasted)}


def _one_batch_probes(s: Settings, data: Dataset, seed: int) -> dict[str, Any]:
    """Gradient of the biases vs the weights' on one batch, and the training-mode output with
    the biases shifted or removed (on a fresh copy: the forwards move running statistics)."""
    model = _model(s, data, seed)
    twin = _without_bias(model, s, data)
    idx = next(minibatches(data.train_x.shape[0], s.batch_size, seeded(seed + 1)))
    x, y = data.train_x[idx], data.train_y[idx]
    model.train()
    loss = F.cross_entropy(model(x), y)
    model.zero_grad()
    loss.backward()
    bias_grad = [float(b.layer.bias.grad.abs().max()) for b in blocks(model)]
    weight_grad = [float(b.layer.weight.grad.abs().max()) for b in blocks(model)]
    model.zero_grad(set_to_none=True)
    shifted = copy.deepcopy(model)
    gen = seeded(seed + 3)
    with torch.no_grad():
        for b in blocks(shifted):
            b.layer.bias.add_(torch.randn(b.layer.bias.shape, generator=gen) * s.bias_shift_std)
        out = model(x)
        shift_delta, twin_delta = _gap(out, shifted(x)), _gap(out, twin(x))
    return {
        "bias_grad_max": bias_grad,
        "weight_grad_max": weight_grad,
        "train_output_change_after_bias_shift": shift_delta,
        "train_output_change_without_bias": twin_delta,
    }


@torch.no_grad()
def _eval_removal(model: MLP, x: torch.Tensor) -> dict[str, float]:
    """Eval-mode logits after removing the pre-BN biases: zeroed alone, or folded into
    running_mean (running_mean -= b). The model itself is left untouched."""
    model.eval()
    ref = model(x)
    naive = copy.deepcopy(model)
    folded = copy.deepcopy(model)
    for b in blocks(naive):
        b.layer.bias.zero_()
    for b in blocks(folded):
        b.norm.running_mean.sub_(b.layer.bias)
        b.layer.bias.zero_()
    out_naive = naive(x)
    model.train()
    return {
        "eval_output_change_bias_zeroed": _gap(out_naive, ref),
        "eval_predictions_changed_bias_zeroed": float((out_naive.argmax(1) != ref.argmax(1)).float().mean()),
        "eval_output_change_bias_folded_into_running_mean": _gap(folded(x), ref),
    }


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create new floating tensors (e.g. the stacked BN layer's parameters) in ``dtype``;
    the previous default is restored afterwards."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Zero gradient, no effect, identical training, removal needs the running mean fixed."""
    t = results["config"]
    per = results["metrics"]["per_seed"]
    seeds = [int(v) for v in results["metrics"]["seeds"]]

    def col(key: str) -> list[float]:
        return column(per, key)

    def show(values: Sequence[float], fmt: str = ".1e") -> str:
        return ", ".join(f"{v:{fmt}}" for v in values)

    ratio = [max(m["bias_grad_max"]) / max(min(m["weight_grad_max"]), 1e-30) for m in per]
    out_change = [max(m["train_output_change_after_bias_shift"], m["train_output_change_without_bias"]) for m in per]
    first = per[0]
    make = Claims(__name__, results)
    return [
        make(
            "zero_gradient",
            a=ratio,
            evidence=f"max |dL/db| / min over layers of max |dL/dW|, per seed: {show(ratio)}; seed {seeds[0]}: |dL/db| per layer "
            f"{show(first['bias_grad_max'])} vs |dL/dW| {show(first['weight_grad_max'])}",
        ),
        make(
            "no_effect",
            a=out_change,
            evidence=f"max |change| of the logits (shifted or removed, the larger), per seed: {show(out_change)}",
        ),
        make(
            "same_training",
            a=col("paired_training_max_loss_delta"),
            also=[part(col("bias_max_movement_during_training"), below=float(t["bias_movement_below"]))],
            evidence=f"{t['steps']} SGD steps on the same batches, per seed: max |loss difference| "
            f"{show(col('paired_training_max_loss_delta'))}; max |weight difference| {show(col('paired_training_max_weight_delta'))}; "
            f"max bias movement {show(col('bias_max_movement_during_training'))}",
        ),
        make(
            "removal_needs_running_mean",
            a=col("eval_output_change_bias_folded_into_running_mean"),
            also=[part(col("eval_output_change_bias_zeroed"), above=float(t["eval_change_zeroed_above"]))],
            evidence=f"max |change| of eval logits, per seed: {show(col('eval_output_change_bias_folded_into_running_mean'))} with "
            f"running_mean -= b; {show(col('eval_output_change_bias_zeroed'), '.3g')} with the bias zeroed alone "
            f"({', '.join(f'{100 * v:.1f}%' for v in col('eval_predictions_changed_bias_zeroed'))} of test predictions change)",
        ),
    ]


def _figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Gradients (log scale), paired loss curves, wasted parameters (the first seed)."""
    from ..figures import categories, dress, pyplot, save

    plt = pyplot()
    m = results["metrics"]["per_seed"][0]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    layers = np.arange(1, len(m["bias_grad_max"]) + 1)
    axes[0].bar(layers - 0.2, m["weight_grad_max"], width=0.4, label="weights W", color="tab:blue")
    bias_grad = np.maximum(m["bias_grad_max"], 1e-30)
    axes[0].bar(layers + 0.2, bias_grad, width=0.4, label="bias b before BN", color="tab:orange")
    axes[0].set_yscale("log")
    axes[0].set_xticks(layers)
    axes[0].set(xlabel="hidden layer", ylabel="max |gradient| on one batch")
    axes[0].set_title("Gradients: the bias gets only rounding noise")
    axes[0].set_ylim(top=1e3 * max(m["weight_grad_max"]))  # room for the legend above the bars
    dress(axes[0], grid="y", legend={"loc": "upper right"})

    a = np.asarray(m["paired_losses_with_bias"], dtype=float)
    b = np.asarray(m["paired_losses_without_bias"], dtype=float)
    steps = np.arange(1, a.size + 1)
    axes[1].plot(steps, a, color="tab:orange", label="with the pre-BN bias", linewidth=2.5, alpha=0.6)
    axes[1].plot(steps, b, color="tab:blue", label="without it", linewidth=1, linestyle="--")
    title = f"Same weights, same batches: max |difference| {m['paired_training_max_loss_delta']:.1e}"
    axes[1].set(yscale="log", xlabel="training step", ylabel="training loss (minibatch)")
    dress(axes[1], title, grid=True, legend=True)

    counts = m["parameter_counts"]
    names = list(counts)
    wasted = [counts[n]["wasted_by_pre_bn_bias"] for n in names]
    total = [counts[n]["parameters"] for n in names]
    axes[2].barh(range(len(names)), wasted, color="tab:orange")
    for i, (w, t) in enumerate(zip(wasted, total)):
        axes[2].text(w, i, f" {w} of {t} ({100 * w / t:.2f}%)", va="center", fontsize=8)
    categories(axes[2].yaxis, names, fontsize=8)
    axes[2].set(xlabel="parameters in biases directly before BN", title="Parameters wasted")
    axes[2].set_xlim(0, max(wasted) * 1.8)
    return [save(fig, Path(outdir) / "bias_before_bn.png")]


class Bias(Experiment):
    """The redundant pre-BN bias over several seeds."""

    ID, DESCRIPTION, QUICK_SECONDS = ID, DESCRIPTION, QUICK_SECONDS

    def settings(self, cfg: RunConfig) -> Settings:
        return Settings.of(cfg.mode)

    def run_seeds(
        self, settings: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress
    ) -> list[dict[str, Any]]:
        s = settings
        per_seed = [_one_batch_probes(s, d, seed) for d, seed in zip(data, seeds)]
        with_bias = [_model(s, d, seed) for d, seed in zip(data, seeds)]
        without = [_without_bias(m, s, d).double() for m, d in zip(with_bias, data)]
        with_bias = [m.double() for m in with_bias]
        before = [[b.layer.bias.detach().clone() for b in blocks(m)] for m in with_bias]
        spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=s.lr)
        arms = []
        for name, models in (("with bias", with_bias), ("without bias", without)):
            with progress.task(name, total=spec.steps) as tick, _default_dtype(torch.float64):
                arms.append(
                    train_stacked(
                        [models],
                        [d.train_x.double() for d in data],
                        [d.train_y for d in data],
                        spec,
                        [
                            minibatches(d.train_x.shape[0], s.batch_size, seeded(seed + 2))
                            for d, seed in zip(data, seeds)
                        ],
                        tick=tick,
                    )
                )
        for k, (m, twin, d) in enumerate(zip(with_bias, without, data)):
            r_bias, r_twin = arms[0][k], arms[1][k]
            losses = np.abs(np.asarray(r_bias.losses) - np.asarray(r_twin.losses))
            weights = max(_gap(a.layer.weight, b.layer.weight) for a, b in zip(blocks(m), blocks(twin)))
            per_seed[k].update(
                {
                    "paired_training_max_loss_delta": float(np.max(losses)),
                    "paired_training_max_weight_delta": weights,
                    "bias_max_movement_during_training": max(
                        _gap(b.layer.bias, b0) for b, b0 in zip(blocks(m), before[k])
                    ),
                    "paired_losses_with_bias": r_bias.losses,
                    "paired_losses_without_bias": r_twin.losses,
                    "diverged": bool(r_bias.diverged or r_twin.diverged),
                    **_eval_removal(m, d.test_x.double()),
                }
            )
        counts = {
            "MLP 64-3x100-10 (ioffe2015-fig1)": _count(MLP(64, [100] * 3, 10, norm="bn", bias=True)),
            "MLP 64-3x256-10 (dropout)": _count(MLP(64, [256] * 3, 10, norm="bn", bias=True)),
            "MLP 64-8x100-10 (lr-sweep)": _count(MLP(64, [100] * 8, 10, norm="bn", bias=True)),
            "ConvNet 16-32-64 on 8x8": _count(ConvNet((1, 8, 8), (16, 32, 64), 10, norm="bn", bias=True)),
        }
        for m in per_seed:
            m["parameter_counts"] = counts
        return per_seed

    claims = staticmethod(_claims)
    figures = staticmethod(_figures)


EXPERIMENT = Bias()
run, claims, figures = EXPERIMENT.run, EXPERIMENT.claims, EXPERIMENT.figures
