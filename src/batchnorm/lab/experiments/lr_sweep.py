"""``lr-sweep``: final accuracy and divergence over a log grid of learning rates, with and
without BN (Ioffe & Szegedy 2015 BN-x5/x30; Bjorck et al. 2018).
Setup, the rules fixed before any run and each setting's source: ``lr_sweep.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..claims_spec import Claims, Declared, listed
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import mlp_for, seeded, train_seeds
from ..experiment import Experiment, PerSeed, capped_log10
from ..figures import NamedFigures, dress, mean_band, pyplot
from ..models import MLP, blocks
from ..progress import Progress
from ..training import TrainSpec, evaluate, minibatches
from ._calibration import calibration_data, epoch_rule
from .santurkar2018_landscape import landscape

_EPOCHS = {"quick": 15.0, "full": 120.0}
_ALPHAS = {"tiny": 4, "quick": 15, "full": 29}  # step_probe_alphas: that many points from 0.01 to 10^1.5
_ARMS = {"plain": (None, "without BN", "tab:blue"), "bn": ("bn", "with BN", "tab:red")}  # norm, label, color
_CAP = 1e30  # stands for an infinite loss ratio or activation growth in the log-scale claims
_PROBES = ("step_probe_loss_ratio", "activation_rms_init", "activation_rms_after_large_steps", "large_steps_taken")


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``lr_sweep.settings.toml``."""

    hidden: tuple[int, ...]
    steps: int
    steps_rule: str
    lrs: tuple[float, ...]
    step_probe_alphas: tuple[float, ...]
    plain_best_lr: float
    high_lr: float
    calibration: dict[str, Any]


def _model(data: Dataset, s: Settings, norm: str | None, seed: int) -> MLP:
    """The sweep's ReLU MLP, He-initialized from ``seed`` (the same weights in both arms)."""
    return mlp_for(data, s.hidden, act="relu", norm=norm, init_std="he", generator=seeded(seed))


def _step_probe(model: nn.Module, x: Tensor, y: Tensor, alphas: list[float]) -> list[float]:
    """L(w - alpha g) / L(w) on one batch: ``landscape``'s walk along the gradient (training mode, model restored)."""
    losses = landscape(model, x, y, alphas)["losses"]
    return [v / losses[0] if math.isfinite(v) else math.inf for v in losses[1:]]


def _activation_scales(model: MLP, x: Tensor) -> list[float]:
    """RMS of every hidden block's output on x (training-mode forward through the blocks)."""
    with torch.no_grad():
        outputs = list(itertools.accumulate(blocks(model), lambda h, block: block(h), initial=x))[1:]
    return [float(h.pow(2).mean().sqrt()) for h in outputs]


def _sweep(s: Settings, data: Sequence[Dataset], seeds: Sequence[int], norm: str | None, progress: Progress) -> PerSeed:
    """Train every seed at every rate; per seed and rate: test and training accuracy (0 if diverged), diverged step."""
    out: PerSeed = [{"test_acc": [], "train_acc": [], "diverged_at": []} for _ in seeds]
    label = ("calibration: " if seeds[0] == s.calibration_seed else "") + ("BN" if norm else "no BN")
    for lr in s.lrs:
        models = [_model(d, s, norm, seed) for d, seed in zip(data, seeds)]
        spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=lr)
        runs = train_seeds(models, data, seeds, spec, f"{label} sweep, lr {lr:g}", progress, order_offset=1)
        for rec, model, d, r in zip(out, models, data, runs):
            rec["test_acc"].append(0.0 if r.diverged else evaluate(model, d.test_x, d.test_y)[1])
            rec["train_acc"].append(0.0 if r.diverged else evaluate(model, d.train_x, d.train_y)[1])
            rec["diverged_at"].append(r.diverged_at)
    return out


def _best_lr(lrs: Sequence[float], acc: Sequence[float], tol: float) -> float:
    """The largest rate whose accuracy is within ``tol`` of the best."""
    return max(lr for lr, a in zip(lrs, acc) if a >= max(acc) - tol)


def _probes(s: Settings, d: Dataset, norm: str | None, seed: int) -> dict[str, Any]:
    """One seed's probes on one batch: step probe and layer RMS at init, RMS after large steps (``blowup_*``)."""
    batch = next(minibatches(d.train_x.shape[0], s.batch_size, seeded(seed + 2)))
    xb, model = d.train_x[batch], _model(d, s, norm, seed)
    probe = _step_probe(model, xb, d.train_y[batch], list(s.step_probe_alphas))  # leaves the model as it was
    before = after = _activation_scales(model, xb)
    taken, opt = 0, torch.optim.SGD(model.parameters(), lr=s.blowup_lr)
    stream = zip(range(1, s.blowup_steps + 1), minibatches(d.train_x.shape[0], s.batch_size, seeded(seed + 3)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batch statistics are not finite", category=RuntimeWarning)
        for step, idx in stream:
            loss = F.cross_entropy(model(d.train_x[idx]), d.train_y[idx])
            if not torch.isfinite(loss):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            now = _activation_scales(model, xb)
            if not all(math.isfinite(v) for v in now):
                break
            after, taken = now, step
    return dict(zip(_PROBES, (probe, before, after, taken)))


def _growth(profile: Sequence[Any], plain: bool) -> float:
    """Last/first layer RMS (plain) or max/min over layers (BN); ``_CAP`` for a non-finite profile."""
    v = [float(x) for x in profile]
    return _CAP if not all(map(math.isfinite, v)) or min(v) <= 0 else v[-1] / v[0] if plain else max(v) / min(v)


def _accuracies(per_seed: PerSeed, arm: str, j: int) -> str:
    """Test accuracy per seed at the ``j``-th rate; "diverged" for a run stored as diverged (accuracy 0)."""
    runs = [(m[arm]["diverged_at"][j], m[arm]["test_acc"][j]) for m in per_seed]
    return ", ".join("diverged" if at is not None else f"{100 * acc:.1f}%" for at, acc in runs)


class LrSweep(Experiment):
    """The learning-rate sweep over several seeds, the plain best rate fixed by calibration."""

    DESCRIPTION = (
        "Accuracy and divergence over a log grid of learning rates, with and without BN (Ioffe BN-x5/x30, Bjorck 2018)"
    )

    def settings(self, cfg: RunConfig) -> Settings:
        alphas = tuple(np.logspace(-2, 1.5, _ALPHAS[cfg.mode]).tolist())
        return Settings.of(cfg.mode, step_probe_alphas=alphas, **epoch_rule(cfg, _EPOCHS, 60))

    def prepare(self, cfg: RunConfig, s: Settings, progress: Progress) -> Settings:
        """Calibrate the plain network's best rate on the calibration seed's own split."""
        cal, calibration = calibration_data(cfg, seed := s.calibration_seed)
        run = _sweep(s, [cal], [seed], None, progress)[0]
        best = _best_lr(s.lrs, run["test_acc"], s.best_tolerance)
        high = min(s.lrs, key=lambda lr: abs(math.log(lr / (10 * best))))
        calibration["validation_acc"] = {f"{lr:g}": a for lr, a in zip(s.lrs, run["test_acc"])}
        calibration["diverged"] = {f"{lr:g}": d is not None for lr, d in zip(s.lrs, run["diverged_at"])}
        return dataclasses.replace(s, plain_best_lr=best, high_lr=float(high), calibration=calibration)

    def run_seeds(self, s: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress) -> PerSeed:
        """Both arms at every rate (each arm's seeds together), then each seed's probes."""
        sweeps = {arm: _sweep(s, data, seeds, norm, progress) for arm, (norm, _, _) in _ARMS.items()}
        return [
            {arm: {**sweeps[arm][k], **_probes(s, d, norm, seed)} for arm, (norm, _, _) in _ARMS.items()}
            for k, (d, seed) in enumerate(zip(data, seeds))
        ]

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """At 10x the plain best rate the plain network fails and BN matches the plain best; blow-up; step probe."""
        t, per_seed = results["config"], results["metrics"]["per_seed"]
        lrs = [float(v) for v in t["lrs"]]
        at = {"best": lrs.index(float(t["plain_best_lr"])), "high": lrs.index(float(t["high_lr"]))}
        gp, gb = (
            [_growth(m[arm]["activation_rms_after_large_steps"], arm == "plain") for m in per_seed] for arm in _ARMS
        )
        alphas = [float(v) for v in t["step_probe_alphas"]]
        i = max(j for j, a in enumerate(alphas) if a <= 10.0 * (1 + 1e-9))  # the step of 10 the probe claim reads
        pr, br = ([float(m[arm]["step_probe_loss_ratio"][i]) for m in per_seed] for arm in _ARMS)
        return Claims(
            __name__,
            results,
            **{f"acc_{arm}_{key}": [m[arm]["test_acc"][j] for m in per_seed] for arm in _ARMS for key, j in at.items()},
            **{f"{arm}_{key}": _accuracies(per_seed, arm, j) for arm in _ARMS for key, j in at.items()},
            diverged=sum(m["plain"]["diverged_at"][at["high"]] is not None for m in per_seed),
            own_best=[_best_lr(lrs, m["bn"]["test_acc"], float(t["best_tolerance"])) for m in per_seed],
            log_growth_plain=[capped_log10(v, 1e-30, _CAP) for v in gp],
            log_growth_bn=[capped_log10(v, 1e-30, _CAP) for v in gb],
            growth_plain=listed(gp, "{:.3g}x"),
            growth_bn=listed(gb, "{:.3g}x"),
            finite_steps=[m["plain"]["large_steps_taken"] for m in per_seed],
            probe_plain=pr,
            probe_bn=br,
            log_probe_ratio=[capped_log10(p / b if b > 0 else _CAP, 1e-30, _CAP) for p, b in zip(pr, br)],
            fails_pp=100 * float(t["high_lr_fails_by"]),
            tol_pp=100 * float(t["high_lr_as_accurate_within"]),
            growth_log10=math.log10(float(t["plain_growth_at_least"])),
            bn_flat_log10=math.log10(float(t["bn_growth_at_most"])),
            probe_log10=math.log10(float(t["probe_factor_at_least"])),
            alpha=alphas[i],
        ).all()

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Accuracy vs lr; L(w - alpha g)/L(w) at init; activation RMS per layer."""
        plt = pyplot()
        cfg, per_seed = results["config"], results["metrics"]["per_seed"]
        lrs, n, dotted = np.asarray(cfg["lrs"]), len(per_seed), {"linestyle": ":", "linewidth": 1}
        fig, (ax, strip) = plt.subplots(2, 1, figsize=(7, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        for k, (arm, (_norm, label, color)) in enumerate(_ARMS.items()):
            acc = np.asarray([m[arm]["test_acc"] for m in per_seed], dtype=float)  # (seeds, lrs)
            diverged = np.asarray([[d is not None for d in m[arm]["diverged_at"]] for m in per_seed])  # (seeds, lrs)
            # a diverged run is stored with accuracy 0: counted below (the arms side by side), never drawn as 0%
            mean_band(ax, lrs, np.where(diverged, np.nan, acc), f"{label}, seeds that trained", color=color, marker="o")
            side_by_side = lrs * (1.0 + 0.08 * (2 * k - 1))
            strip.bar(side_by_side, diverged.sum(axis=0), width=0.12 * lrs, color=color, label=label)
        ax.axvline(cfg["plain_best_lr"], color="tab:blue", label="plain best rate (calibration)", **dotted)
        ax.axvline(cfg["high_lr"], color="black", label="10x that rate", **dotted)
        title, ylabel = f"Learning-rate sweep: {len(cfg['hidden'])}-layer ReLU MLP", f"after {cfg['steps']} steps"
        legend = {"loc": "lower left", "fontsize": 8}
        dress(ax, title, xscale="log", ylim=(0, 1), ylabel=f"test accuracy {ylabel}", grid=True, legend=legend)
        xlabel, ylabel = "learning rate (SGD, constant; diverged = NaN/inf training loss)", f"diverged\n(of {n} seeds)"
        dress(strip, ylim=(0, n), yticks=range(0, n + 1, max(1, n // 3)), xlabel=xlabel, ylabel=ylabel, grid="y")
        yield "accuracy_vs_lr.png", fig

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for arm, (_norm, label, color) in _ARMS.items():
            m = per_seed[0][arm]
            r = [v if math.isfinite(v) else math.nan for v in map(float, m["step_probe_loss_ratio"])]
            axes[0].plot(cfg["step_probe_alphas"], r, "o-", color=color, label=label, markersize=3)
            layers = np.arange(1, len(m["activation_rms_init"]) + 1)
            after = f"{label}, after {m['large_steps_taken']} step(s) at lr {cfg['blowup_lr']:g}"
            for key, style, text in (("init", "--", f"{label}, at init"), ("after_large_steps", "o-", after)):
                axes[1].plot(layers, [float(v) for v in m[f"activation_rms_{key}"]], style, color=color, label=text)
        axes[0].axhline(1.0, color="black", **dotted)
        title = "How far the gradient direction stays downhill (first seed)"
        labels = {"xlabel": "step size alpha along the gradient", "ylabel": "L(w - alpha g) / L(w) at initialization"}
        dress(axes[0], title, xscale="log", yscale="log", **labels, grid=True, legend=True)
        title, ylabel = "Activation scale by depth (first seed)", "RMS of the layer's output (one batch)"
        dress(axes[1], title, yscale="log", xlabel="hidden layer", ylabel=ylabel, grid=True, legend={"fontsize": 8})
        yield "step_probe_and_activations.png", fig


EXPERIMENT = LrSweep()
