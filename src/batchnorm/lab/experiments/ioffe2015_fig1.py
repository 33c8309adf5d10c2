"""``ioffe2015-fig1``: Ioffe & Szegedy 2015, Figure 1 — BN trains faster and keeps the inputs
of the sigmoids stable; inference with Alg. 2 population statistics vs the running average.
Setup, the rules fixed before any run and each setting's source: ``ioffe2015_fig1.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..claims_spec import Claims, Declared
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import activation_inputs, listed, mlp_for, probing, seeded, train_seeds
from ..experiment import Experiment, column, first_reaching
from ..popstats import population_statistics
from ..progress import Progress
from ..training import TrainResult, TrainSpec, evaluate
from ..verdict import part

ID = "ioffe2015-fig1"
DESCRIPTION = "Ioffe & Szegedy Fig. 1: BN vs none on a 3x100 sigmoid MLP; accuracy vs step, sigmoid-input percentiles, Alg. 2 inference"
QUICK_SECONDS = 20.0
# MNIST-1D, quick: the plain network has not started to learn at 5,000 steps (about 31% test
# accuracy against 67% at 50,000), so quick mode runs 20,000 steps there.
_MNIST1D_QUICK_STEPS = 20000
_MNIST1D_QUICK_EVERY = 400


@dataclass(frozen=True)
class Settings(Declared):
    """The settings the code computes or reads; every constant one is in ``ioffe2015_fig1.settings.toml``
    (each one's meaning and source: ``ioffe2015_fig1.md``)."""

    steps: int
    checkpoint_every: int
    mnist1d_choice: str
    hidden: tuple[int, ...]
    batch_size: int
    lr: float
    init_std: float
    tracked_unit: int
    percentiles: tuple[int, ...]


@torch.no_grad()
def _batch_stats_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int) -> float:
    """Test accuracy when BN normalizes each test batch of ``batch`` by its own statistics
    (training-mode forward; BN buffers restored). The tail that does not fill a batch is left out."""
    correct = 0
    seen = 0
    with probing(model):
        for start in range(0, x.shape[0] - batch + 1, batch):
            logits = model(x[start : start + batch])
            correct += int((logits.argmax(dim=1) == y[start : start + batch]).sum())
            seen += batch
    return correct / max(seen, 1)


def _recorder(s: Settings, data: Dataset, model: nn.Module, norm: str | None, seed: int) -> tuple[dict[str, Any], Any]:
    """A fresh record for one seed's network and the checkpoint callback that fills it."""
    rec: dict[str, Any] = {"step": [], "test_acc": [], "test_loss": [], "train_loss": [], "percentiles": []}
    if norm is not None:
        rec["test_acc_population"] = []
        rec["test_acc_batch_stats"] = []
    pop_gen = seeded(seed + 1)
    seen = [0]

    def record(step: int, result: TrainResult) -> None:
        loss, acc = evaluate(model, data.test_x, data.test_y)
        rec["step"].append(step)
        rec["test_acc"].append(acc)
        rec["test_loss"].append(loss)
        recent = result.losses[seen[0] :]
        seen[0] = len(result.losses)
        rec["train_loss"].append(float(np.mean(recent)) if recent else None)
        # the last hidden sigmoid's input, BN on each test batch's statistics (as in training)
        z = activation_inputs(model, data.test_x, batch=s.batch_size, layers=[len(s.hidden) - 1])[0][:, s.tracked_unit]
        rec["percentiles"].append(np.percentile(z.numpy(), list(s.percentiles)).tolist())
        if norm is not None:
            pop = population_statistics(model, data.train_x, batch_size=s.batch_size, generator=pop_gen)
            rec["test_acc_population"].append(evaluate(pop, data.test_x, data.test_y)[1])
            rec["test_acc_batch_stats"].append(_batch_stats_accuracy(model, data.test_x, data.test_y, s.batch_size))

    return rec, record


def _train_arm(
    s: Settings, data: Sequence[Dataset], seeds: Sequence[int], norm: str | None, progress: Progress
) -> list[dict[str, Any]]:
    """Train one arm (norm None = baseline) on every seed together; one record per seed."""
    spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=s.lr)
    checkpoints = list(range(0, spec.steps + 1, s.checkpoint_every))
    if checkpoints[-1] != spec.steps:
        checkpoints.append(spec.steps)
    models = [
        mlp_for(d, s.hidden, act="sigmoid", norm=norm, init_std=s.init_std, generator=seeded(seed))
        for d, seed in zip(data, seeds)
    ]
    recs = [_recorder(s, d, m, norm, seed) for d, m, seed in zip(data, models, seeds)]

    def record(step: int, results: list[TrainResult]) -> None:
        for (_rec, fn), result in zip(recs, results):
            fn(step, result)

    results = train_seeds(
        models, data, seeds, spec, "BN" if norm else "no BN", progress, checkpoints=checkpoints, on_checkpoint=record
    )
    return [{**rec, "diverged": r.diverged, "steps_done": r.steps_done} for (rec, _fn), r in zip(recs, results)]


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


def _fig1_quantities(m: dict[str, Any]) -> dict[str, float]:
    """One seed's numbers behind the claims (accuracies as fractions)."""
    base, bn = m["baseline"], m["bn"]
    steps = bn["step"]
    margins = [b - a for st, a, b in zip(steps, base["test_acc"], bn["test_acc"]) if st > 0]
    target = max(base["test_acc"])
    half = _second_half(steps)
    spread_base = (_spread(base["percentiles"][half[0]]), _spread(base["percentiles"][-1]))
    spread_bn = (_spread(bn["percentiles"][half[0]]), _spread(bn["percentiles"][-1]))
    widen = spread_base[1] / max(spread_base[0], 1e-12) - 1
    change_bn = abs(spread_bn[1] / max(spread_bn[0], 1e-12) - 1)
    pop, ema = bn["test_acc_population"], bn["test_acc"]
    return {
        "min_margin": min(margins) if not bn["diverged"] else -1.0,
        "final_bn": bn["test_acc"][-1],
        "final_base": base["test_acc"][-1],
        "steps_base": first_reaching(base["step"], base["test_acc"], target),
        "steps_bn": first_reaching(bn["step"], bn["test_acc"], target),
        "widen_base": widen,
        "change_bn": change_bn,
        "drift_base": _relative_drift(base["percentiles"], half),
        "drift_bn": _relative_drift(bn["percentiles"], half),
        "pop_minus_ema_final": pop[-1] - ema[-1],
        "pop_minus_ema_half": float(np.mean([pop[i] for i in half]) - np.mean([ema[i] for i in half])),
    }


def _claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's Figure 1 claims, each judged over the seeds from the saved metrics."""
    t = results["config"]
    q = [_fig1_quantities(m) for m in results["metrics"]["per_seed"]]

    def col(key: str) -> list[float]:
        return column(q, key)

    def mean(key: str) -> float:
        return float(np.mean(col(key)))

    factor = t["baseline_vs_bn_spread_change_factor"]
    pct = {
        f"{name}_pct": 100 * t[key]
        for name, key in (("growth", "baseline_spread_growth_at_least"), ("settled", "bn_settled_relative_move_below"))
    }
    make = Claims(__name__, results, **pct, tol_pp=100 * t["population_vs_running_tolerance"])
    return [
        make(
            "bn_above_baseline",
            a=col("min_margin"),
            evidence=f"smallest margin {100 * mean('min_margin'):+.1f} pp (mean over seeds); final {100 * mean('final_bn'):.1f}% with BN "
            f"vs {100 * mean('final_base'):.1f}% without",
        ),
        make(
            "speedup",
            a=col("steps_base"),
            b=col("steps_bn"),
            evidence=f"steps to the baseline's best accuracy, per seed: baseline {listed(col('steps_base'), '{:g}')}; BN "
            f"{listed(col('steps_bn'), '{:g}')}",
        ),
        make(
            "baseline_spread_widens",
            a=col("widen_base"),
            also=[part([w - factor * c for w, c in zip(col("widen_base"), col("change_bn"))], above=0.0)],
            evidence=f"second half: baseline spread {100 * mean('widen_base'):+.1f}%, BN's spread changes by {100 * mean('change_bn'):.1f}% "
            "(means over seeds)",
        ),
        make(
            "bn_settles",
            a=col("drift_bn"),
            also=[part(col("drift_bn"), [0.5 * v for v in col("drift_base")], below=0.0)],
            evidence=f"largest move over the second half relative to the final spread: BN {mean('drift_bn'):.3f}, baseline "
            f"{mean('drift_base'):.3f} (means over seeds)",
        ),
        make(
            "population_as_running",
            a=col("pop_minus_ema_final"),
            also=[part(col("pop_minus_ema_half"), above=-float(t["population_vs_running_tolerance"]))],
            evidence=f"population minus running average: final {100 * mean('pop_minus_ema_final'):+.2f} pp, mean over the second half "
            f"{100 * mean('pop_minus_ema_half'):+.2f} pp (means over seeds)",
        ),
    ]


def _figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Fig. 1(a) accuracy, Fig. 1(b, c) percentiles, inference side by side, training loss
    (the first seed's curves)."""
    from ..figures import dress, pyplot, save

    plt = pyplot()
    m = results["metrics"]["per_seed"][0]
    base = m["baseline"]
    bn = m["bn"]
    data = results.get("run", {}).get("data", "digits")
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, zoom in zip(axes, (False, True)):
        ax.plot(base["step"], base["test_acc"], label="without BN", color="tab:blue")
        ax.plot(bn["step"], bn["test_acc"], label="with BN (running average)", color="tab:red")
        ax.plot(
            bn["step"],
            bn["test_acc_population"],
            label="with BN (Alg. 2 population stats)",
            color="tab:red",
            linestyle=":",
        )
        dress(ax, xlabel="training step", ylabel="test accuracy", grid=True)
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
        dress(ax, title, xlabel="training step", grid=True, legend={"loc": "upper left"})
    axes[0].set_ylabel(f"input to sigmoid (last hidden layer, unit {unit})")
    fig.suptitle("Distribution of one sigmoid's input over the test set during training")
    paths.append(save(fig, Path(outdir) / "fig1bc_sigmoid_input_percentiles.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    idx = [i for i, s in enumerate(bn["step"]) if s > 0]
    steps = [bn["step"][i] for i in idx]
    curves: list[tuple[str, str, dict[str, Any]]] = [
        ("test_acc", "running average (EMA, momentum 0.1)", {"color": "tab:red"}),
        ("test_acc_population", "Alg. 2 population statistics", {"color": "tab:green", "linestyle": "--"}),
        (
            "test_acc_batch_stats",
            "statistics of each test batch of 60",
            {"color": "tab:purple", "alpha": 0.7, "linestyle": ":"},
        ),
    ]
    for key, label, kw in curves:
        ax.plot(steps, [bn[key][i] for i in idx], label=label, **kw)
    title = "BN inference: which statistics normalize a test example"
    ylabel = "test accuracy of the BN network"
    dress(ax, title, xlabel="training step", ylabel=ylabel, grid=True, legend={"loc": "lower right"})
    paths.append(save(fig, Path(outdir) / "inference_statistics.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for rec, label, color in ((base, "without BN", "tab:blue"), (bn, "with BN", "tab:red")):
        pts = [(s, v) for s, v in zip(rec["step"], rec["train_loss"]) if v is not None]
        ax.plot([s for s, _ in pts], [v for _, v in pts], label=label, color=color)
    title = "Training loss (mean over the steps since the last checkpoint)"
    dress(ax, title, yscale="log", xlabel="training step", ylabel="training loss", grid=True, legend=True)
    paths.append(save(fig, Path(outdir) / "train_loss.png"))
    return paths


class Fig1(Experiment):
    """Ioffe & Szegedy's Figure 1 over several seeds."""

    ID, DESCRIPTION, QUICK_SECONDS = ID, DESCRIPTION, QUICK_SECONDS

    def settings(self, cfg: RunConfig) -> Settings:
        if cfg.data == "mnist1d" and cfg.mode == "quick":
            choice = Settings.text("mnist1d_choice", steps=_MNIST1D_QUICK_STEPS, every=_MNIST1D_QUICK_EVERY)
            return Settings.of(steps=_MNIST1D_QUICK_STEPS, checkpoint_every=_MNIST1D_QUICK_EVERY, mnist1d_choice=choice)
        return Settings.of(cfg.mode)

    def run_seeds(
        self, settings: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress
    ) -> list[dict[str, Any]]:
        base = _train_arm(settings, data, seeds, None, progress)
        bn = _train_arm(settings, data, seeds, "bn", progress)
        return [{"baseline": b, "bn": n} for b, n in zip(base, bn)]

    claims = staticmethod(_claims)
    figures = staticmethod(_figures)


EXPERIMENT = Fig1()
run, claims, figures = EXPERIMENT.run, EXPERIMENT.claims, EXPERIMENT.figures
