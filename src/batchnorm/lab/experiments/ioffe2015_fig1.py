"""``ioffe2015-fig1``: Ioffe & Szegedy 2015, Figure 1 — BN trains faster and keeps the inputs
of the sigmoids stable; inference with Alg. 2 population statistics vs the running average.
Setup, the rules fixed before any run and each setting's source: ``ioffe2015_fig1.md``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..claims_spec import Claims, Declared
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import activation_inputs, batch_stats_accuracy, columns, mlp_for, seeded, train_seeds
from ..experiment import Experiment, PerSeed, first_reaching
from ..figures import NamedFigures, dress, pyplot
from ..popstats import population_statistics
from ..progress import Progress
from ..training import TrainResult, TrainSpec, evaluate

_MNIST1D_QUICK = (20000, 400)  # steps, checkpoint_every on MNIST-1D in quick mode (why: mnist1d_choice)
_INFERENCE = (  # the inference figure's series: key, label, style
    ("test_acc", "running average (EMA, momentum 0.1)", {"color": "tab:red"}),
    ("test_acc_population", "Alg. 2 population statistics", {"color": "tab:green", "ls": "--"}),
    ("test_acc_batch_stats", "statistics of each test batch of 60", {"color": "tab:purple", "alpha": 0.7, "ls": ":"}),
)


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``ioffe2015_fig1.settings.toml``."""

    steps: int
    checkpoint_every: int
    mnist1d_choice: str


def _train_arm(
    s: Settings, data: Sequence[Dataset], seeds: Sequence[int], norm: str | None, progress: Progress
) -> PerSeed:
    """Train one arm (norm None = baseline) on every seed together; per seed, at each checkpoint:
    test accuracy and loss, training loss since the last checkpoint, percentiles of the last sigmoid's
    input (BN on each test batch's statistics); with BN, test accuracy by Alg. 2 and by batch statistics."""
    spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=s.lr)
    checkpoints = sorted({*range(0, spec.steps + 1, s.checkpoint_every), spec.steps})
    models = [
        mlp_for(d, s.hidden, act="sigmoid", norm=norm, init_std=s.init_std, generator=seeded(seed))
        for d, seed in zip(data, seeds)
    ]
    keys = ["step", "test_acc", "test_loss", "train_loss", "percentiles"]
    keys += ["test_acc_population", "test_acc_batch_stats"] if norm is not None else []
    recs: PerSeed = [{key: [] for key in keys} for _ in seeds]
    pop_gens, seen = [seeded(seed + 1) for seed in seeds], [0] * len(seeds)

    def record(step: int, results: list[TrainResult]) -> None:
        for k, (rec, model, d, result) in enumerate(zip(recs, models, data, results)):
            loss, acc = evaluate(model, d.test_x, d.test_y)
            recent, seen[k] = result.losses[seen[k] :], len(result.losses)
            z = activation_inputs(model, d.test_x, batch=s.batch_size, layers=[len(s.hidden) - 1])[0][:, s.tracked_unit]
            values = [step, acc, loss, float(np.mean(recent)) if recent else None]
            values.append(np.percentile(z.numpy(), list(s.percentiles)).tolist())
            if norm is not None:
                pop = population_statistics(model, d.train_x, batch_size=s.batch_size, generator=pop_gens[k])
                values.append(evaluate(pop, d.test_x, d.test_y)[1])
                values.append(batch_stats_accuracy(model, d.test_x, d.test_y, s.batch_size))
            for key, value in zip(keys, values):
                rec[key].append(value)

    label = "BN" if norm else "no BN"
    results = train_seeds(models, data, seeds, spec, label, progress, checkpoints=checkpoints, on_checkpoint=record)
    return [{**rec, "diverged": r.diverged, "steps_done": r.steps_done} for rec, r in zip(recs, results)]


def _relative_drift(percentiles: list[list[float]], idx: list[int]) -> float:
    """Largest move of any of the three percentiles over checkpoints ``idx`` relative to the
    final value, in units of the final 15-85 spread."""
    final = percentiles[idx[-1]]
    move = max(abs(percentiles[i][k] - final[k]) for i in idx for k in range(3))
    return move / max(final[2] - final[0], 1e-12)


def _spread_change(p: list[list[float]], idx: list[int]) -> float:
    """Relative change of the 15-85 spread from checkpoint ``idx[0]`` to the last one."""
    return (p[-1][2] - p[-1][0]) / max(p[idx[0]][2] - p[idx[0]][0], 1e-12) - 1


def _fig1_quantities(m: dict[str, Any]) -> dict[str, float]:
    """One seed's numbers behind the claims (accuracies as fractions; ``half``: the checkpoints
    of the second half of training, step >= T/2)."""
    base, bn = m["baseline"], m["bn"]
    steps, target = bn["step"], max(base["test_acc"])
    half = [i for i, st in enumerate(steps) if st >= steps[-1] / 2]
    pop, ema = bn["test_acc_population"], bn["test_acc"]
    margins = [b - a for st, a, b in zip(steps, base["test_acc"], bn["test_acc"]) if st > 0]
    return {
        "min_margin": min(margins) if not bn["diverged"] else -1.0,
        "final_bn": bn["test_acc"][-1],
        "final_base": base["test_acc"][-1],
        "steps_base": first_reaching(base["step"], base["test_acc"], target),
        "steps_bn": first_reaching(bn["step"], bn["test_acc"], target),
        "widen_base": _spread_change(base["percentiles"], half),
        "change_bn": abs(_spread_change(bn["percentiles"], half)),
        "drift_base": _relative_drift(base["percentiles"], half),
        "drift_bn": _relative_drift(bn["percentiles"], half),
        "pop_minus_ema_final": pop[-1] - ema[-1],
        "pop_minus_ema_half": float(np.mean([pop[i] for i in half]) - np.mean([ema[i] for i in half])),
    }


class Fig1(Experiment):
    """Ioffe & Szegedy's Figure 1 over several seeds."""

    DESCRIPTION = "Ioffe & Szegedy Fig. 1: BN vs none on a 3x100 sigmoid MLP; accuracy vs step, sigmoid-input percentiles, Alg. 2 inference"

    def settings(self, cfg: RunConfig) -> Settings:
        if cfg.data == "mnist1d" and cfg.mode == "quick":
            steps, every = _MNIST1D_QUICK
            choice = Settings.text("mnist1d_choice", steps=steps, every=every)
            return Settings.of(steps=steps, checkpoint_every=every, mnist1d_choice=choice)
        return Settings.of(cfg.mode)

    def run_seeds(self, s: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress) -> PerSeed:
        base, bn = (_train_arm(s, data, seeds, norm, progress) for norm in (None, "bn"))
        return [{"baseline": b, "bn": n} for b, n in zip(base, bn)]

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """The paper's Figure 1 claims, each judged over the seeds from the saved metrics."""
        t, col = results["config"], columns(_fig1_quantities(m) for m in results["metrics"]["per_seed"])
        mean = {key: float(np.mean(v)) for key, v in col.items()}
        factor = t["baseline_vs_bn_spread_change_factor"]
        return Claims(
            __name__,
            results,
            **col,
            wider=[w - factor * c for w, c in zip(col["widen_base"], col["change_bn"])],
            half_drift_base=[0.5 * v for v in col["drift_base"]],
            mean=mean,
            pct={key: 100 * v for key, v in mean.items()},  # accuracies in percent, their differences in points
            growth_pct=100 * t["baseline_spread_growth_at_least"],
            settled_pct=100 * t["bn_settled_relative_move_below"],
            tol_pp=100 * float(t["population_vs_running_tolerance"]),
        ).all()

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Fig. 1(a) accuracy, Fig. 1(b, c) percentiles, inference side by side, training loss
        (the first seed's curves)."""
        plt = pyplot()
        m, data = results["metrics"]["per_seed"][0], results.get("run", {}).get("data", "digits")
        base, bn, step = m["baseline"], m["bn"], "training step"
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        low = max(min(min(bn["test_acc"][1:] or [0.9]), base["test_acc"][-1]) - 0.02, 0.0)
        labels: dict[str, Any] = {"xlabel": step, "ylabel": "test accuracy"}
        population = "with BN (Alg. 2 population stats)"
        for ax, title, bottom in zip(axes, (f"(a) test accuracy vs step ({data})", "(a) zoomed"), (0.0, low)):
            ax.plot(base["step"], base["test_acc"], label="without BN", color="tab:blue")
            ax.plot(bn["step"], bn["test_acc"], label="with BN (running average)", color="tab:red")
            ax.plot(bn["step"], bn["test_acc_population"], ":", label=population, color="tab:red")
            dress(ax, title, ylim=(bottom, 1.0), **labels, grid=True, legend={"loc": "lower right"})
        yield "fig1a_accuracy.png", fig

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, rec, title in ((axes[0], base, "(b) without BN"), (axes[1], bn, "(c) with BN: gamma*x_hat + beta")):
            p = np.asarray(rec["percentiles"])  # (checkpoints, 3)
            ax.fill_between(rec["step"], p[:, 0], p[:, 2], color="tab:gray", alpha=0.2, linewidth=0)
            for k, (q, style) in enumerate(zip((15, 50, 85), ("--", "-", "--"))):
                ax.plot(rec["step"], p[:, k], style, color="black" if k == 1 else "tab:gray", label=f"{q}th percentile")
            dress(ax, title, xlabel=step, grid=True, legend={"loc": "upper left"})
        axes[0].set_ylabel(f"input to sigmoid (last hidden layer, unit {results['config'].get('tracked_unit', 0)})")
        fig.suptitle("Distribution of one sigmoid's input over the test set during training")
        yield "fig1bc_sigmoid_input_percentiles.png", fig

        fig, ax = plt.subplots(figsize=(7, 4))
        idx = [i for i, s in enumerate(bn["step"]) if s > 0]
        for key, label, kw in _INFERENCE:
            ax.plot([bn["step"][i] for i in idx], [bn[key][i] for i in idx], label=label, **kw)
        title, ylabel = "BN inference: which statistics normalize a test example", "test accuracy of the BN network"
        dress(ax, title, xlabel=step, ylabel=ylabel, grid=True, legend={"loc": "lower right"})
        yield "inference_statistics.png", fig

        fig, ax = plt.subplots(figsize=(7, 4))
        for rec, label, color in ((base, "without BN", "tab:blue"), (bn, "with BN", "tab:red")):
            pts = [(s, v) for s, v in zip(rec["step"], rec["train_loss"]) if v is not None]
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=label, color=color)
        title = "Training loss (mean over the steps since the last checkpoint)"
        dress(ax, title, yscale="log", xlabel=step, ylabel="training loss", grid=True, legend=True)
        yield "train_loss.png", fig


EXPERIMENT = Fig1()
