"""``placement``: BN before vs after the activation, for sigmoid and ReLU networks, over seeds.
Setup, the rules fixed before any run and each setting's source: ``placement.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .._replicates import mean_over_replicates, replicate_seed
from ..claims_spec import Claims, Declared, listed
from ..datasets import Dataset
from ..declare import activation_inputs, columns, mlp_for, seeded, train_seeds
from ..experiment import Experiment, PerSeed, first_reaching
from ..figures import NamedFigures, dress, pyplot
from ..progress import Progress
from ..training import TrainResult, TrainSpec, evaluate

_PLACES = {"none": ("tab:blue", "-"), "before": ("tab:red", "-"), "after": ("tab:green", "--")}  # colour, line style


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``placement.settings.toml``."""

    steps: int
    checkpoint_every: int
    replicates: int


def _named(place: str) -> str:
    """How figures and evidence name a placement: "no BN", "BN before", "BN after"."""
    return "no BN" if place == "none" else f"BN {place}"


def _train_arm(
    s: Settings, data: Sequence[Dataset], seeds: Sequence[int], arm: str, progress: Progress
) -> list[list[dict[str, Any]]]:
    """One network (arm "activation/placement"), every replicate of every seed trained together;
    ``out[k][r]`` is replicate r of seed k."""
    act, place = arm.split("/")
    runs = [(d, replicate_seed(seed, r)) for d, seed in zip(data, seeds) for r in range(s.replicates)]
    norm, at = (None, "before") if place == "none" else ("bn", place)
    std: float | Literal["he"] = 0.1 if act == "sigmoid" else "he"
    models = [
        mlp_for(d, s.hidden, act=act, norm=norm, placement=at, init_std=std, generator=seeded(g)) for d, g in runs
    ]
    recs: list[dict[str, Any]] = [
        {"step": [], "test_acc": [], **({"input_std": [], "saturated": []} if i % s.replicates == 0 else {})}
        for i in range(len(runs))
    ]

    def record(step: int, _results: list[TrainResult]) -> None:
        for model, (d, _), rec in zip(models, runs, recs):
            rec["step"].append(step)
            rec["test_acc"].append(evaluate(model, d.test_x, d.test_y)[1])
            if "input_std" in rec:  # activation-input statistics: the first replicate of each seed
                inputs = activation_inputs(model, d.test_x)
                rec["input_std"].append([float(z.std(dim=0).mean()) for z in inputs])
                rec["saturated"].append([float((z.abs() > s.saturation_threshold).float().mean()) for z in inputs])

    spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=s.lr)
    checkpoints = range(0, s.steps + 1, s.checkpoint_every)
    train_data, gens, label = [d for d, _ in runs], [g for _, g in runs], f"{act}, BN {place}"
    results = train_seeds(
        models, train_data, gens, spec, label, progress, order_offset=1, checkpoints=checkpoints, on_checkpoint=record
    )
    for rec, result in zip(recs, results):
        rec["diverged"] = result.diverged
    return [recs[k * s.replicates : (k + 1) * s.replicates] for k in range(len(seeds))]


def _late(rec: dict[str, Any]) -> float:
    """Mean test accuracy over the last quarter of the checkpoints."""
    acc = rec["test_acc"]
    return float(np.mean(acc[-max(1, len(acc) // 4) :]))


def _quantities(m: dict[str, Any], frac: float) -> dict[str, float]:
    """One seed's numbers behind the claims: the mean over its replicates."""
    reps = [{key: recs[r] for key, recs in m.items()} for r in range(len(m["sigmoid/none"]))]
    q = mean_over_replicates([_replicate_quantities(rep, frac) for rep in reps])
    # saturation: recorded for the first replicate only
    q["sat_before"] = float(np.mean(m["sigmoid/before"][0]["saturated"][-1]))
    q["sat_after"] = float(np.mean(m["sigmoid/after"][0]["saturated"][-1]))
    return q


def _replicate_quantities(m: dict[str, Any], frac: float) -> dict[str, float]:
    """One network per arm: the numbers behind the claims (accuracies as fractions)."""
    none = m["sigmoid/none"]
    target = max(none["test_acc"])
    reach = {key: first_reaching(rec["step"], rec["test_acc"], target) for key, rec in m.items()}
    # the early checkpoint: the first (> 0) at or past ``frac`` of training
    i = min(j for j, step in enumerate(none["step"]) if step >= frac * none["step"][-1] and step > 0)
    early = {key: m[key]["test_acc"][i] for key in m}
    return {
        "target": target,
        "steps_none": reach["sigmoid/none"],
        "steps_bn": max(reach["sigmoid/before"], reach["sigmoid/after"]),
        "early_step": float(none["step"][i]),
        "gain_sigmoid": min(early["sigmoid/before"], early["sigmoid/after"]) - early["sigmoid/none"],
        "gain_relu": max(early["relu/before"], early["relu/after"]) - early["relu/none"],
        **{f"early {key}": v for key, v in early.items()},
        **{f"late {key}": _late(m[key]) for key in m},
    }


class Placement(Experiment):
    """BN before vs after the activation over several seeds."""

    DESCRIPTION = (
        "BN before vs after the activation (sigmoid and ReLU): training speed, final accuracy, activation-input scale"
    )

    def run_seeds(self, s: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress) -> PerSeed:
        arms = {arm: _train_arm(s, data, seeds, arm, progress) for arm in s.arms}
        return [{arm: recs[k] for arm, recs in arms.items()} for k in range(len(seeds))]

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """BN in either place speeds up the sigmoid net; less so the ReLU net; 'before' suits
        sigmoid; ReLU is indifferent."""
        t = results["config"]
        frac = float(t["early_checkpoint_fraction"])
        col = columns(_quantities(m, frac) for m in results["metrics"]["per_seed"])
        return Claims(
            __name__,
            results,
            **col,
            pct={key: listed((100 * v for v in values), "{:.1f}", "/") + "%" for key, values in col.items()},
            early_pct=100 * frac,
            tol_pp=100 * float(t["sigmoid_before_tolerance"]),
            band_pp=100 * float(t["relu_placement_band"]),
        ).all()

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Accuracy curves per activation (mean over seeds, seeds as thin lines); activation-input
        spread and saturation by layer (the first seed)."""
        plt, per, seeds = pyplot(), results["metrics"]["per_seed"], results["metrics"]["seeds"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, act in zip(axes, ("sigmoid", "relu")):
            for place, (color, ls) in _PLACES.items():
                recs = [m[f"{act}/{place}"] for m in per]  # per seed, its replicates
                runs = np.asarray([np.mean([r["test_acc"] for r in reps], axis=0) for reps in recs])  # (seeds, steps)
                for run in runs:  # each seed a thin faint line, then their mean
                    ax.plot(recs[0][0]["step"], run, ls, alpha=0.25, linewidth=0.8, color=color)
                label = "no BN" if place == "none" else f"BN {place} the {act}"
                ax.plot(recs[0][0]["step"], runs.mean(axis=0), ls, label=label, color=color)
            title = f"{act}: test accuracy, mean of {len(per)} seeds (thin: each)"
            ax.set(xlabel="training step", ylim=(0.0, 1.0))
            dress(ax, title, title_size=10, grid=True, legend={"loc": "lower right"})
        axes[0].set_ylabel("test accuracy")
        yield "placement_accuracy.png", fig

        m = {key: recs[0] for key, recs in per[0].items()}  # the first seed's first replicate
        hidden = np.arange(1, len(results["config"]["hidden"]) + 1)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for place, (color, ls) in _PLACES.items():
            for act, marker in (("sigmoid", "o"), ("relu", "s")):
                last = m[f"{act}/{place}"]["input_std"][-1]
                axes[0].plot(hidden, last, ls, marker=marker, color=color, label=f"{act}, {_named(place)}")
            rec = m[f"sigmoid/{place}"]
            axes[1].plot(rec["step"], [v[-1] for v in rec["input_std"]], ls, color=color, label=_named(place))
        ylabel = "std of the activation's input (test set, mean over units)"
        title = f"Scale of the activation inputs at the end (seed {seeds[0]})"
        labels = {"xlabel": "hidden layer", "ylabel": ylabel}
        dress(axes[0], title, yscale="log", xticks=hidden, **labels, grid=True, legend={"fontsize": 7})
        title = f"Sigmoid network: scale of the last layer's input (seed {seeds[0]})"
        ylabel = "std of the last sigmoid layer's input"
        dress(axes[1], title, xlabel="training step", ylabel=ylabel, grid=True, legend=True)
        yield "placement_activation_inputs.png", fig


EXPERIMENT = Placement()
