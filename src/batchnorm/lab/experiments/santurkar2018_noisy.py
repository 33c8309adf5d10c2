"""``santurkar2018-noisy``: Santurkar et al. 2018, Fig. 2 — BN with deliberately injected,
time-varying "covariate shift" trains about as well as BN and far better than no BN, although
its layer inputs are less stable than those of the network without BN.
Setup, the rules fixed before any run and each setting's source: ``santurkar2018_noisy.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..claims_spec import Claims, Declared
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import activation_inputs, seeded, train_seeds
from ..experiment import Experiment, column, load_for
from ..progress import Progress
from ..training import TrainResult, TrainSpec, evaluate
from ..verdict import part
from ._calibration import calibration_split, epochs_to_steps
from ._santurkar import NoisyReLU, act_input, build, noisy, seed_slot, window_means

ID = "santurkar2018-noisy"
DESCRIPTION = "Santurkar 2018 Fig. 2: BN with injected time-varying noise trains like BN, far better than none, though its layer inputs drift more"
QUICK_SECONDS = 60.0
_ARMS = ("none", "bn", "noisy")
_LABELS = {"none": "no BN", "bn": "BN", "noisy": "noisy BN"}
_DRIFTS = ("step_location", "step_spread", "total_location", "total_spread")
_COMPARED = ("step_location", "step_spread")
_EPOCHS = {"quick": 40.0, "full": 300.0}
_TINY_STEPS = 40
_NOISE_GRID = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # doubling from 0.05
_DIVERGED_LOSS = 1e3  # mean training loss recorded for a run that diverged
_DIVERGED_DRIFT = 1e3  # drift recorded for a run that diverged (its inputs became non-finite)


@dataclass(frozen=True)
class Settings(Declared):
    """The settings the code computes or reads; every constant one is in ``santurkar2018_noisy.settings.toml``
    (each one's meaning and source: ``santurkar2018_noisy.md``)."""

    depth: int
    width: int
    steps: int
    steps_rule: str
    checkpoint_every: int
    noise_grid: tuple[float, ...]
    noise_magnitude: float
    calibration: dict[str, Any]
    calibration_seed: int
    batch_size: int
    lrs: tuple[float, ...]
    tracked_layers: tuple[int, ...]


def _noise(a: float) -> tuple[float, float, float]:
    """(noise_mean, noise_scale, per_sample) of magnitude a."""
    return a, 1.0 + a, a / 5.0


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


def _train(
    s: Settings,
    data: Sequence[Dataset],
    seeds: Sequence[int],
    arm: str,
    lr: float,
    magnitudes: Sequence[float],
    label: str,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Train one arm at one learning rate for every seed together (``magnitudes[k]``: seed k's
    noise a, noisy arm only); per seed: probed layer inputs, drift, final accuracies, losses."""
    models = [build(d, s.depth, s.width, None if arm == "none" else "bn", seed) for d, seed in zip(data, seeds)]
    if arm == "noisy":
        gens = [seeded(seed + 7) for seed in seeds]
        shifts, scales, per_sample = ([n[j] for n in map(_noise, magnitudes)] for j in range(3))
        noisy(models, [NoisyReLU(gens, shifts, scales, per_sample) for _ in range(s.depth)])
    checkpoints = list(range(0, s.steps + 1, s.checkpoint_every))
    layers = list(s.tracked_layers)
    probes = [d.train_x[:256] for d in data]
    probed = ("mean", "std", "percentiles")
    recs: list[dict[str, Any]] = [{"step": [], **{q: {str(i): [] for i in layers} for q in probed}} for _ in seeds]

    def record(step: int, results: list[TrainResult]) -> None:
        for k, (model, rec, probe, result) in enumerate(zip(models, recs, probes, results)):
            if result.diverged:
                continue
            with seed_slot(model, k):
                z = dict(
                    zip(layers, activation_inputs(model, probe, batch=probe.shape[0], layers=layers, at=act_input))
                )
            if not all(torch.isfinite(z[i]).all() for i in layers):
                continue
            rec["step"].append(step)
            for i in layers:
                rec["mean"][str(i)].append(z[i].mean(dim=0).tolist())
                rec["std"][str(i)].append(z[i].std(dim=0).tolist())
                rec["percentiles"][str(i)].append(np.percentile(z[i][:, 0].numpy(), [15, 50, 85]).tolist())

    spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=lr)
    results = train_seeds(models, data, seeds, spec, label, progress, checkpoints=checkpoints, on_checkpoint=record)
    out = []
    for k, (model, rec, d, result) in enumerate(zip(models, recs, data, results)):
        with seed_slot(model, k):
            train_loss, train_acc = evaluate(model, d.train_x, d.train_y)
            _test_loss, test_acc = evaluate(model, d.test_x, d.test_y)
        losses = np.asarray(result.losses, dtype=float)
        start = max(1, len(rec["step"]) // 10)
        drift = {}
        for i in layers:
            means = np.asarray(rec["mean"][str(i)], dtype=float)[start:]
            stds = np.asarray(rec["std"][str(i)], dtype=float)[start:]
            ok = means.shape[0] >= 3 and not result.diverged
            drift[str(i)] = _drift(means, stds) if ok else {key: _DIVERGED_DRIFT for key in _DRIFTS}
        del rec["mean"], rec["std"]  # summarized by the drift numbers (keeps results.json small)
        rec.update(
            {
                "diverged": result.diverged,
                "diverged_at": result.diverged_at,
                "loss_curve": window_means(result.losses, checkpoints),
                "mean_train_loss": float(losses.mean()) if not result.diverged else _DIVERGED_LOSS,
                "final_train_acc": train_acc if not result.diverged else 0.0,
                "final_test_acc": test_acc if not result.diverged else 0.0,
                "final_train_loss": train_loss,
                "drift": drift,
            }
        )
        out.append(rec)
    return out


def _col(results: dict[str, Any], arm: str, lr: float, key: str) -> list[float]:
    return column(results["metrics"]["per_seed"], f"{arm}@{lr:g}", key)


def _drift_col(results: dict[str, Any], arm: str, lr: float, layer: str, kind: str) -> list[float]:
    return column(results["metrics"]["per_seed"], f"{arm}@{lr:g}", "drift", layer, kind)


def _runs(results: dict[str, Any], arm: str, lr: float, key: str, fmt: str | None = None) -> str:
    """One arm's per-seed values as text (percent by default, else ``fmt``); a run that diverged
    reads "diverged" (results.json stores it with ``"diverged": true``, accuracy 0 and loss and
    drift 1e3, the values the claims are judged on)."""
    runs = [m[f"{arm}@{lr:g}"] for m in results["metrics"]["per_seed"]]
    show = (lambda v: f"{100 * v:.1f}") if fmt is None else fmt.format
    return ", ".join("diverged" if r.get("diverged") else show(float(r[key])) for r in runs)


def _claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Noisy BN ~ BN >> none in training; noisy BN's layer inputs drift more than no BN's."""
    t = results["config"]
    seeds = [int(v) for v in results["metrics"]["seeds"]]
    lo, hi = float(t["lrs"][0]), float(t["lrs"][-1])

    def acc(arm: str, lr: float) -> list[float]:
        return _col(results, arm, lr, "final_train_acc")

    def acc_text(arm: str, lr: float) -> str:
        return _runs(results, arm, lr, "final_train_acc")

    tol = float(t["close_to_bn_within"])
    parts = {lr: part(acc("noisy", lr), acc("bn", lr), above=-tol) for lr in (lo, hi)}
    ratio = float(t["faster_loss_ratio_at_least"])
    none_loss = _col(results, "none", lo, "mean_train_loss")
    noisy_part = part(none_loss, _col(results, "noisy", lo, "mean_train_loss"), effect="ratio", above=ratio)
    gap = float(t["high_lr_gap_at_least"])
    noisy_hi = part(acc("noisy", hi), acc("none", hi), above=gap)
    diverged = sum(bool(m[f"none@{hi:g}"]["diverged"]) for m in results["metrics"]["per_seed"])
    least = float(t["drift_ratio_at_least"])
    layers = [str(i) for i in t["tracked_layers"]]
    parts_d, ev = [], []
    for layer in layers:
        for kind in _COMPARED:
            noisy_drift, none_drift = (_drift_col(results, arm, lo, layer, kind) for arm in ("noisy", "none"))
            v = part(noisy_drift, none_drift, effect="ratio", above=least)
            parts_d.append(v)
            ev.append(f"layer {int(layer) + 1} {kind.replace('step_', '')}: noisy / no BN {v.estimate:.2f}x")
    layer_names = ", ".join(str(int(x) + 1) for x in layers)
    make = Claims(__name__, results, lr_lo=lo, lr_hi=hi, tol_pp=100 * tol, gap_pp=100 * gap, layers=layer_names)
    return [
        make(
            "noisy_trains_like_bn",
            a=acc("noisy", lo),
            b=acc("bn", lo),
            also=[parts[hi]],
            evidence="; ".join(
                f"lr {lr:g}: noisy BN {acc_text('noisy', lr)}% vs BN {acc_text('bn', lr)}% "
                f"per seed (noisy - BN {100 * parts[lr].estimate:+.1f} pp, mean)"
                for lr in (lo, hi)
            ),
        ),
        make(
            "bn_arms_train_faster",
            a=none_loss,
            b=_col(results, "bn", lo, "mean_train_loss"),
            also=[noisy_part],
            evidence=f"mean training loss over {t['steps']} steps per seed: "
            + "; ".join(f"{_LABELS[arm]} {_runs(results, arm, lo, 'mean_train_loss', '{:.3g}')}" for arm in _ARMS)
            + f" (noisy part: {noisy_part.estimate:.3g}x, geometric mean); final training accuracy: no BN "
            f"{acc_text('none', lo)}%, BN {acc_text('bn', lo)}%",
        ),
        make(
            "plain_fails_at_high_lr",
            a=acc("bn", hi),
            b=acc("none", hi),
            also=[noisy_hi],
            evidence=f"final training accuracy at lr {hi:g} per seed: no BN {acc_text('none', hi)}% ({diverged} of {len(seeds)} "
            f"diverged), BN {acc_text('bn', hi)}%, noisy BN {acc_text('noisy', hi)}%",
        ),
        make(
            "noisy_inputs_drift",
            a=_drift_col(results, "noisy", lo, layers[0], _COMPARED[0]),
            b=_drift_col(results, "none", lo, layers[0], _COMPARED[0]),
            also=parts_d[1:],
            evidence="; ".join(ev)
            + f" (RMS change per {t['checkpoint_every']} steps / average std, median over units; geometric means over seeds)",
        ),
    ]


def _figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Training loss vs step per learning rate; layer-input percentiles over training; drift bars."""
    from ..figures import categories, dress, mean_band, pyplot, save

    plt = pyplot()
    s = results["config"]
    per_seed = results["metrics"]["per_seed"]
    colors = {"none": "tab:gray", "bn": "tab:blue", "noisy": "tab:orange"}
    lrs = [float(v) for v in s["lrs"]]
    paths = []

    fig, axes = plt.subplots(1, len(lrs), figsize=(5.2 * len(lrs), 3.8), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for arm in _ARMS:
            runs = [m[f"{arm}@{lr:g}"] for m in per_seed]
            steps = list(range(s["checkpoint_every"], s["steps"] + 1, s["checkpoint_every"]))
            curves = [[np.nan if v is None else v for v in r["loss_curve"]][: len(steps)] for r in runs]
            curves = [c + [np.nan] * (len(steps) - len(c)) for c in curves]
            lost = sum(bool(r["diverged"]) for r in runs)  # a diverged run's curve stops where it diverged
            label = _LABELS[arm] + (f" ({lost} of {len(runs)} diverged)" if lost else "")
            mean_band(ax, steps, curves, label, color=colors[arm])
        ylabel = "training cross-entropy (window mean)"
        dress(ax, f"Training loss, lr {lr:g}", yscale="log", xlabel="step", ylabel=ylabel, legend={"fontsize": 8})
    paths.append(save(fig, outdir / "training_loss.png"))

    lr = lrs[0]
    layers = [str(i) for i in s["tracked_layers"]]
    fig, axes = plt.subplots(len(layers), len(_ARMS), figsize=(4.2 * len(_ARMS), 3.0 * len(layers)), squeeze=False)
    for row, layer in enumerate(layers):
        for col, arm in enumerate(_ARMS):
            ax = axes[row][col]
            r = per_seed[0][f"{arm}@{lr:g}"]
            p = np.asarray(r["percentiles"][layer], dtype=float)  # (T, 3)
            steps = r["step"][: p.shape[0]]
            if p.size:
                band = {"color": colors[arm], "alpha": 0.25, "linewidth": 0, "label": "15th-85th percentile"}
                ax.fill_between(steps, p[:, 0], p[:, 2], **band)
                ax.plot(steps, p[:, 1], color=colors[arm], label="median")
            title = f"{_LABELS[arm]}: layer {int(layer) + 1}, unit 0 (lr {lr:g}, first seed)"
            dress(ax, title, title_size=9, xlabel="step", ylabel="input of the ReLU", legend={"fontsize": 7})
    paths.append(save(fig, outdir / "layer_inputs.png"))

    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [f"layer {int(layer) + 1}\n{kind.replace('step_', '')}" for layer in layers for kind in _COMPARED]
    x = np.arange(len(labels))
    width = 0.27
    for k, arm in enumerate(_ARMS):
        # a diverged run's drift is stored as 1e3: left out of the bar and counted in the legend
        trained = [not m[f"{arm}@{lr:g}"]["diverged"] for m in per_seed]
        vals = [
            float(np.mean([v for v, ok in zip(_drift_col(results, arm, lr, layer, kind), trained) if ok] or [np.nan]))
            for layer in layers
            for kind in _COMPARED
        ]
        lost = len(trained) - sum(trained)
        label = _LABELS[arm] + (f" ({lost} of {len(trained)} diverged, left out)" if lost else "")
        ax.bar(x + (k - 1) * width, vals, width, label=label, color=colors[arm])
    categories(ax.xaxis, labels)
    title = f"How much layer-input distributions move (lr {lr:g}, mean over seeds; noise a = {s['noise_magnitude']:g})"
    dress(ax, title, ylabel=f"RMS change per {s['checkpoint_every']} steps / avg std", legend=True)
    paths.append(save(fig, outdir / "drift.png"))
    return paths


class Noisy(Experiment):
    """Santurkar et al.'s noisy-BN experiment over several seeds."""

    ID, DESCRIPTION, QUICK_SECONDS = ID, DESCRIPTION, QUICK_SECONDS

    def settings(self, cfg: RunConfig) -> Settings:
        depth, width = (12, 100) if cfg.data == "mnist1d" else (10, 64)
        if cfg.mode == "tiny":
            steps, rule = _TINY_STEPS, f"tiny: {_TINY_STEPS} steps (a smoke test)"
            grid: tuple[float, ...] = (0.1, 0.5)
        else:
            n = load_for(cfg, cfg.seed).train_x.shape[0]
            epochs = _EPOCHS[cfg.mode]
            steps = epochs_to_steps(epochs, n, 128)
            rule = f"{epochs:g} passes over the training set ({n} examples, batch 128), the same rule on every data set"
            grid = _NOISE_GRID
        every = max(1, steps // (10 if cfg.mode == "tiny" else 30))
        return Settings.of(
            depth=depth, width=width, steps=steps, steps_rule=rule, checkpoint_every=every, noise_grid=grid
        )

    def prepare(self, cfg: RunConfig, settings: Settings, progress: Progress) -> Settings:
        """Fix the noise magnitude by the ``noise_rule`` setting on the calibration seed's own split."""
        s = settings
        seed = s.calibration_seed
        cal = calibration_split(load_for(cfg, seed), seed)
        lr = s.lrs[0]
        none = _train(s, [cal], [seed], "none", lr, [0.0], "calibration: no BN", progress)[0]
        grid = list(s.noise_grid)
        runs = len(grid)
        noisy_runs = _train(s, [cal] * runs, [seed] * runs, "noisy", lr, grid, "calibration: noisy BN grid", progress)
        keys = [(str(i), kind) for i in s.tracked_layers for kind in _COMPARED]
        exceeds = [
            all(r["drift"][layer][kind] > none["drift"][layer][kind] for layer, kind in keys) for r in noisy_runs
        ]
        chosen = next((a for a, ok in zip(grid, exceeds) if ok), grid[-1])
        record = {
            "seed": seed,
            "split": f"80/20 stratified split of seed {seed}'s training set ({cal.train_x.shape[0]} / {cal.test_x.shape[0]} examples); test set unused",
            "lr": lr,
            "none_drift": {f"{layer}/{kind}": none["drift"][layer][kind] for layer, kind in keys},
            "noisy_drift": {
                f"{a:g}": {f"{layer}/{kind}": r["drift"][layer][kind] for layer, kind in keys}
                for a, r in zip(grid, noisy_runs)
            },
            "exceeds": {f"{a:g}": ok for a, ok in zip(grid, exceeds)},
            "noisy_final_train_acc": {f"{a:g}": r["final_train_acc"] for a, r in zip(grid, noisy_runs)},
            "none_final_train_acc": none["final_train_acc"],
            "any_exceeds": any(exceeds),
        }
        return dataclasses.replace(s, noise_magnitude=float(chosen), calibration=record)

    def run_seeds(
        self, settings: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress
    ) -> list[dict[str, Any]]:
        per_seed: list[dict[str, Any]] = [{} for _ in seeds]
        a = settings.noise_magnitude
        for lr in settings.lrs:
            for arm in _ARMS:
                runs = _train(settings, data, seeds, arm, lr, [a] * len(seeds), f"{_LABELS[arm]} lr {lr:g}", progress)
                for rec, r in zip(per_seed, runs):
                    rec[f"{arm}@{lr:g}"] = r
        return per_seed

    claims = staticmethod(_claims)
    figures = staticmethod(_figures)


EXPERIMENT = Noisy()
run, claims, figures = EXPERIMENT.run, EXPERIMENT.claims, EXPERIMENT.figures
