"""``santurkar2018-noisy``: Santurkar et al. 2018, Fig. 2 — BN with injected, time-varying "covariate
shift" trains about as well as BN and far better than no BN, though its layer inputs are less stable.
Setup, the rules fixed before any run and each setting's source: ``santurkar2018_noisy.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
import torch

from ..claims_spec import Claims, Declared
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import activation_inputs, seeded, train_seeds
from ..experiment import Experiment, PerSeed, column
from ..figures import NamedFigures, categories, dress, mean_band, pyplot
from ..progress import Progress
from ..training import TrainResult, TrainSpec, evaluate
from ..verdict import Part
from ._calibration import calibration_data, epoch_rule
from ._santurkar import COLORS, EPOCHS, LABELS, NoisyReLU, build, noisy, seed_slot, window_means

_ARMS = ("none", "bn", "noisy")
_DRIFTS = ("step_location", "step_spread", "total_location", "total_spread")
_COMPARED = ("step_location", "step_spread")
_PROBED = ("mean", "std", "percentiles")
_DIVERGED = 1e3  # the mean training loss and the drift recorded for a run that diverged


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``santurkar2018_noisy.settings.toml``."""

    depth: int
    width: int
    steps: int
    steps_rule: str
    checkpoint_every: int
    noise_grid: tuple[float, ...]
    noise_magnitude: float
    calibration: dict[str, Any]


def _drift(means: Any, stds: Any, ok: bool = True) -> dict[str, float]:
    """The ``drift`` setting's numbers (``_DRIFTS``) of one layer's T checkpoints, each a median over units;
    ``_DIVERGED`` for a run not ``ok`` or left with < 3 checkpoints. Shape: means, stds (T, units)."""
    start = max(1, len(means) // 10)
    means, stds = (np.asarray(v, dtype=float)[start:] for v in (means, stds))
    if not ok or means.shape[0] < 3:
        return dict.fromkeys(_DRIFTS, _DIVERGED)
    scale = np.maximum(stds.mean(axis=0), 1e-12)  # (units,)
    steps = [np.sqrt((np.diff(v, axis=0) ** 2).mean(axis=0)) / scale for v in (means, stds)]
    totals = [v.std(axis=0) / scale for v in (means, stds)]
    return {key: float(np.median(v)) for key, v in zip(_DRIFTS, steps + totals)}


def _train(
    s: Settings, data: Seq[Dataset], seeds: Seq[int], arm: str, lr: float, a: Seq[float], p: Progress
) -> PerSeed:
    """Train one arm at one lr for every seed together (``a[k]``: seed k's noise magnitude in the noisy arm,
    ``NoisyReLU``); per seed: probed layer inputs, drift, final accuracies, losses."""
    label = ("calibration: " if seeds[0] == s.calibration_seed else "") + f"{LABELS[arm]} lr {lr:g}"
    models = [build(d, s.depth, s.width, None if arm == "none" else "bn", seed) for d, seed in zip(data, seeds)]
    if arm == "noisy":
        gens = [seeded(seed + 7) for seed in seeds]
        noisy(models, [NoisyReLU(gens, a) for _ in range(s.depth)])
    relu = "act.relu" if arm == "noisy" else "act"  # the ReLU whose input is probed, after any noise
    checkpoints = list(range(0, s.steps + 1, s.checkpoint_every))
    recs: PerSeed = [{"step": [], **{q: {str(i): [] for i in s.tracked_layers} for q in _PROBED}} for _ in seeds]

    def record(step: int, results: list[TrainResult]) -> None:
        for k, (model, rec, d, result) in enumerate(zip(models, recs, data, results)):
            if result.diverged:
                continue
            probe = d.train_x[:256]
            with seed_slot(model, k):
                z = activation_inputs(model, probe, batch=probe.shape[0], layers=s.tracked_layers, at=relu)
            if not all(torch.isfinite(v).all() for v in z):
                continue
            rec["step"].append(step)
            for i, v in zip(s.tracked_layers, z):
                probed = (v.mean(dim=0), v.std(dim=0), np.percentile(v[:, 0].numpy(), [15, 50, 85]))
                for q, value in zip(_PROBED, probed):
                    rec[q][str(i)].append(value.tolist())

    spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=lr)
    results = train_seeds(models, data, seeds, spec, label, p, checkpoints=checkpoints, on_checkpoint=record)
    for k, (model, rec, d, r) in enumerate(zip(models, recs, data, results)):
        with seed_slot(model, k):
            train_loss, train_acc = evaluate(model, d.train_x, d.train_y)
            test_acc = evaluate(model, d.test_x, d.test_y)[1]
        ok, means, stds = not r.diverged, rec.pop("mean"), rec.pop("std")  # summarized by the drift numbers
        rec.update(diverged=r.diverged, diverged_at=r.diverged_at, loss_curve=window_means(r.losses, checkpoints))
        rec.update(mean_train_loss=float(np.asarray(r.losses, dtype=float).mean()) if ok else _DIVERGED)
        rec.update(final_train_acc=train_acc if ok else 0.0, final_test_acc=test_acc if ok else 0.0)
        rec.update(final_train_loss=train_loss, drift={i: _drift(means[i], stds[i], ok) for i in means})
    return recs


def _shown(runs: PerSeed, key: str, fmt: str | None = None) -> str:
    """Per-seed values of ``key`` as text (percent, or ``fmt``); "diverged" for a run stored as diverged."""
    show = (lambda v: f"{100 * v:.1f}") if fmt is None else fmt.format
    return ", ".join("diverged" if r.get("diverged") else show(float(r[key])) for r in runs)


class Noisy(Experiment):
    """Santurkar et al.'s noisy-BN experiment over several seeds."""

    DESCRIPTION = "Santurkar 2018 Fig. 2: BN with injected time-varying noise trains like BN, far better than none, though its layer inputs drift more"

    def settings(self, cfg: RunConfig) -> Settings:
        shape = {"depth": 12, "width": 100} if cfg.data == "mnist1d" else {"depth": 10, "width": 64}
        steps = epoch_rule(cfg, EPOCHS, 128)  # {} in tiny mode
        every = {"checkpoint_every": max(1, steps["steps"] // 30)} if steps else {}
        return Settings.of(cfg.mode, **shape, **steps, **every)

    def prepare(self, cfg: RunConfig, settings: Settings, progress: Progress) -> Settings:
        """Fix the noise magnitude by the ``noise_rule`` setting on the calibration seed's own split."""
        s, seed, lr, grid = settings, settings.calibration_seed, settings.lrs[0], list(settings.noise_grid)
        cal, record = calibration_data(cfg, seed)
        none = _train(s, [cal], [seed], "none", lr, [0.0], progress)[0]
        runs = _train(s, [cal] * len(grid), [seed] * len(grid), "noisy", lr, grid, progress)
        keys, names = [(str(i), kind) for i in s.tracked_layers for kind in _COMPARED], [f"{a:g}" for a in grid]
        drifts = [{f"{i}/{kind}": r["drift"][i][kind] for i, kind in keys} for r in [none, *runs]]
        exceeds = [all(d[key] > drifts[0][key] for key in d) for d in drifts[1:]]
        record |= {"lr": lr, "none_drift": drifts[0]}
        record |= {"noisy_drift": dict(zip(names, drifts[1:])), "exceeds": dict(zip(names, exceeds))}
        record |= {"noisy_final_train_acc": dict(zip(names, (r["final_train_acc"] for r in runs)))}
        record |= {"none_final_train_acc": none["final_train_acc"], "any_exceeds": any(exceeds)}
        chosen = float(next((a for a, ok in zip(grid, exceeds) if ok), grid[-1]))
        return dataclasses.replace(s, noise_magnitude=chosen, calibration=record)

    def run_seeds(self, settings: Settings, data: Seq[Dataset], seeds: Seq[int], progress: Progress) -> PerSeed:
        a = [settings.noise_magnitude] * len(seeds)
        per_seed: PerSeed = [{} for _ in seeds]
        for lr, arm in itertools.product(settings.lrs, _ARMS):
            for rec, r in zip(per_seed, _train(settings, data, seeds, arm, lr, a, progress)):
                rec[f"{arm}@{lr:g}"] = r
        return per_seed

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Noisy BN ~ BN >> none in training; noisy BN's layer inputs drift more than no BN's."""
        t, per_seed = results["config"], results["metrics"]["per_seed"]
        lrs = {"lo": float(t["lrs"][0]), "hi": float(t["lrs"][-1])}
        runs = {(arm, k): [m[f"{arm}@{lr:g}"] for m in per_seed] for arm in _ARMS for k, lr in lrs.items()}
        acc = {f"acc_{arm}_{k}": column(r, "final_train_acc") for (arm, k), r in runs.items()}
        loss = {f"loss_{arm}": column(runs[arm, "lo"], "mean_train_loss") for arm in _ARMS}
        tol, least = float(t["close_to_bn_within"]), float(t["drift_ratio_at_least"])
        pairs = [(str(layer), kind) for layer in t["tracked_layers"] for kind in _COMPARED]
        drift = {(arm, q): column(runs[arm, "lo"], "drift", *q) for arm in ("noisy", "none") for q in pairs}
        drifts = [Part(drift["noisy", q], drift["none", q], effect="ratio", above=least) for q in pairs]
        faster = Part(
            loss["loss_none"], loss["loss_noisy"], effect="ratio", above=float(t["faster_loss_ratio_at_least"])
        )
        make = Claims(
            __name__,
            results,
            **acc,
            **loss,
            shown={f"{arm}_{k}": _shown(r, "final_train_acc") for (arm, k), r in runs.items()},
            like={k: 100 * Part(acc[f"acc_noisy_{k}"], acc[f"acc_bn_{k}"], above=-tol).estimate for k in lrs},
            losses="; ".join(f"{LABELS[arm]} {_shown(runs[arm, 'lo'], 'mean_train_loss', '{:.3g}')}" for arm in _ARMS),
            faster=faster.estimate,
            diverged_hi=sum(bool(r["diverged"]) for r in runs["none", "hi"]),
            **{f"drift_{arm}": drift[arm, pairs[0]] for arm in ("noisy", "none")},
            moved="; ".join(
                f"layer {int(i) + 1} {k.replace('step_', '')}: noisy / no BN {v.estimate:.2f}x"
                for (i, k), v in zip(pairs, drifts)
            ),
            **{f"lr_{k}": lr for k, lr in lrs.items()},
            tol_pp=100 * tol,
            gap_pp=100 * float(t["high_lr_gap_at_least"]),
            layers=", ".join(str(int(x) + 1) for x in t["tracked_layers"]),
        )
        return make.all(noisy_inputs_drift=make("noisy_inputs_drift", also=drifts[1:]))  # a part per layer and quantity

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Training loss vs step per learning rate; layer-input percentiles over training; drift bars."""
        plt = pyplot()
        s, per_seed = results["config"], results["metrics"]["per_seed"]
        lrs, every, layers = [float(v) for v in s["lrs"]], s["checkpoint_every"], [str(i) for i in s["tracked_layers"]]
        steps = list(range(every, s["steps"] + 1, every))

        def label(runs: PerSeed, arm: str, note: str = "") -> str:  # naming how many of the runs diverged
            k = sum(bool(r["diverged"]) for r in runs)
            return LABELS[arm] + (f" ({k} of {len(runs)} diverged{note})" if k else "")

        fig, axes = plt.subplots(1, len(lrs), figsize=(5.2 * len(lrs), 3.8), squeeze=False)
        for ax, lr in zip(axes[0], lrs):
            for arm in _ARMS:
                runs = [m[f"{arm}@{lr:g}"] for m in per_seed]  # a diverged run's curve stops where it diverged
                curves = [[np.nan if v is None else v for v in r["loss_curve"]][: len(steps)] for r in runs]
                curves = [c + [np.nan] * (len(steps) - len(c)) for c in curves]
                mean_band(ax, steps, curves, label(runs, arm), color=COLORS[arm])
            ylabel = "training cross-entropy (window mean)"
            dress(ax, f"Training loss, lr {lr:g}", yscale="log", xlabel="step", ylabel=ylabel, legend={"fontsize": 8})
        yield "training_loss.png", fig

        lr = lrs[0]
        fig, axes = plt.subplots(len(layers), len(_ARMS), figsize=(4.2 * len(_ARMS), 3.0 * len(layers)), squeeze=False)
        for ax, (layer, arm) in zip(axes.flat, itertools.product(layers, _ARMS)):
            r = per_seed[0][f"{arm}@{lr:g}"]
            p, at = np.asarray(r["percentiles"][layer], dtype=float).reshape(-1, 3), r["step"]  # p: (T, 3)
            band = {"color": COLORS[arm], "alpha": 0.25, "linewidth": 0, "label": "15th-85th percentile"}
            ax.fill_between(at[: len(p)], p[:, 0], p[:, 2], **band)
            ax.plot(at[: len(p)], p[:, 1], color=COLORS[arm], label="median")
            title = f"{LABELS[arm]}: layer {int(layer) + 1}, unit 0 (lr {lr:g}, first seed)"
            dress(ax, title, title_size=9, xlabel="step", ylabel="input of the ReLU", legend={"fontsize": 7})
        yield "layer_inputs.png", fig

        fig, ax = plt.subplots(figsize=(7, 3.8))
        bars = [(layer, kind) for layer in layers for kind in _COMPARED]
        for k, arm in enumerate(_ARMS):
            runs = [m[f"{arm}@{lr:g}"] for m in per_seed]  # a diverged run's drift (1e3) is left out of the bar
            vals = [float(np.mean([r["drift"][i][q] for r in runs if not r["diverged"]] or [np.nan])) for i, q in bars]
            left_out = label(runs, arm, ", left out")
            ax.bar(np.arange(len(bars)) + (k - 1) * 0.27, vals, 0.27, label=left_out, color=COLORS[arm])
        categories(ax.xaxis, [f"layer {int(layer) + 1}\n{kind.replace('step_', '')}" for layer, kind in bars])
        title = (
            f"How much layer-input distributions move (lr {lr:g}, mean over seeds; noise a = {s['noise_magnitude']:g})"
        )
        dress(ax, title, ylabel=f"RMS change per {every} steps / avg std", legend=True)
        yield "drift.png", fig


EXPERIMENT = Noisy()
