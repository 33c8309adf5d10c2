"""``lr-sweep``: final accuracy and divergence over a log grid of learning rates, with and
without BN (Ioffe & Szegedy 2015 BN-x5/x30; Bjorck et al. 2018).
Setup, the rules fixed before any run and each setting's source: ``lr_sweep.md``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
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
from ..declare import listed, mlp_for, probing, seeded
from ..experiment import Experiment, load_for
from ..figures import mean_band
from ..models import MLP, blocks
from ..progress import Progress
from ..results import number
from ..stacked import train_stacked
from ..training import TrainSpec, evaluate, minibatches
from ..verdict import part
from ._calibration import calibration_split, epochs_to_steps

ID = "lr-sweep"
DESCRIPTION = (
    "Accuracy and divergence over a log grid of learning rates, with and without BN (Ioffe BN-x5/x30, Bjorck 2018)"
)
QUICK_SECONDS = 120.0
_EPOCHS = {"quick": 15.0, "full": 120.0}
_PROBE_ALPHA = 10.0
_CAP = 1e30  # stands for an infinite loss ratio or activation growth in the log-scale claims


@dataclass(frozen=True)
class Settings(Declared):
    """The settings the code computes or reads; every constant one is in ``lr_sweep.settings.toml``
    (each one's meaning and source: ``lr_sweep.md``)."""

    hidden: tuple[int, ...]
    steps: int
    steps_rule: str
    lrs: tuple[float, ...]
    step_probe_alphas: tuple[float, ...]
    plain_best_lr: float
    high_lr: float
    calibration: dict[str, Any]
    calibration_seed: int
    best_tolerance: float
    batch_size: int
    blowup_lr: float
    blowup_steps: int


def _model(data: Dataset, s: Settings, norm: str | None, seed: int) -> MLP:
    """The sweep's ReLU MLP, He-initialized from ``seed`` (the same weights in both arms)."""
    return mlp_for(data, s.hidden, act="relu", norm=norm, init_std="he", generator=seeded(seed))


def _step_probe(model: nn.Module, x: Tensor, y: Tensor, alphas: list[float]) -> list[float]:
    """L(w - alpha g) / L(w) on one batch (training-mode forward); parameters, buffers and the
    training flag are restored afterwards."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    ratios = []
    with probing(model):
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for alpha in alphas:
                for p, w, g in zip(params, saved, grads):
                    p.copy_(w - alpha * g)
                value = float(F.cross_entropy(model(x), y))
                ratios.append(value / float(loss.detach()) if math.isfinite(value) else math.inf)
    return ratios


def _activation_scales(model: nn.Module, x: Tensor) -> list[float]:
    """RMS of every hidden block's output on x (training-mode forward)."""
    scales: list[float] = []
    handles = [
        b.register_forward_hook(lambda _m, _i, out: scales.append(float(out.detach().pow(2).mean().sqrt())))
        for b in blocks(model)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return scales


def _large_steps(
    model: nn.Module, data: Dataset, s: Settings, generator: torch.Generator, xb: Tensor
) -> tuple[list[float], int]:
    """Up to ``s.blowup_steps`` SGD steps at ``blowup_lr``; the per-layer activation RMS on ``xb``
    after the last step whose loss and activations were still finite, and that step's number."""
    profile = _activation_scales(model, xb)
    taken = 0
    stream = minibatches(data.train_x.shape[0], s.batch_size, generator)
    opt = torch.optim.SGD(model.parameters(), lr=s.blowup_lr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batch statistics are not finite", category=RuntimeWarning)
        for step in range(1, s.blowup_steps + 1):
            idx = next(stream)
            model.train()
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            if not torch.isfinite(loss):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            now = _activation_scales(model, xb)
            if not all(math.isfinite(v) for v in now):
                break
            profile = now
            taken = step
    return profile, taken


def _sweep(
    s: Settings, data: Sequence[Dataset], seeds: Sequence[int], norm: str | None, label: str, progress: Progress
) -> tuple[list[list[float]], list[list[int | None]], list[list[float]]]:
    """Train every seed at every rate (seeds together); per seed and rate: test accuracy (0 if
    diverged), the diverged step (None) and the training accuracy."""
    acc: list[list[float]] = [[] for _ in seeds]
    train_acc: list[list[float]] = [[] for _ in seeds]
    diverged: list[list[int | None]] = [[] for _ in seeds]
    with progress.task(label, total=len(s.lrs) * s.steps) as tick:
        for lr in s.lrs:
            models = [_model(d, s, norm, seed) for d, seed in zip(data, seeds)]
            results = train_stacked(
                [models],
                [d.train_x for d in data],
                [d.train_y for d in data],
                TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=lr),
                [minibatches(d.train_x.shape[0], s.batch_size, seeded(seed + 1)) for d, seed in zip(data, seeds)],
                tick=tick,
            )
            tick.update(s.steps - max(r.steps_done for r in results))
            for k, (model, d, r) in enumerate(zip(models, data, results)):
                acc[k].append(0.0 if r.diverged else evaluate(model, d.test_x, d.test_y)[1])
                train_acc[k].append(0.0 if r.diverged else evaluate(model, d.train_x, d.train_y)[1])
                diverged[k].append(r.diverged_at)
    return acc, diverged, train_acc


def _best_lr(lrs: Sequence[float], acc: Sequence[float], tol: float) -> float:
    """The largest rate whose accuracy is within ``tol`` of the best."""
    best = max(acc)
    return max(lr for lr, a in zip(lrs, acc) if a >= best - tol)


def _probes(s: Settings, d: Dataset, norm: str | None, seed: int) -> dict[str, Any]:
    """Step probe at initialization and activation scales after large steps, for one seed."""
    batch = next(minibatches(d.train_x.shape[0], s.batch_size, seeded(seed + 2)))
    xb, yb = d.train_x[batch], d.train_y[batch]
    probe = _step_probe(_model(d, s, norm, seed), xb, yb, list(s.step_probe_alphas))
    blow = _model(d, s, norm, seed)
    before = _activation_scales(blow, xb)
    after, taken = _large_steps(blow, d, s, seeded(seed + 3), xb)
    return {
        "step_probe_loss_ratio": probe,
        "activation_rms_init": before,
        "activation_rms_after_large_steps": after,
        "large_steps_taken": taken,
    }


def _log10(v: float) -> float:
    v = number(v)
    return math.log10(min(max(v, 1e-30), _CAP)) if not math.isnan(v) else math.log10(_CAP)


def _growth(profile: Sequence[Any], plain: bool) -> float:
    """Last/first layer RMS (plain) or max/min over layers (BN); ``_CAP`` for a non-finite profile."""
    v = [number(x) for x in profile]
    if not all(math.isfinite(x) for x in v) or min(v) <= 0:
        return _CAP
    return v[-1] / v[0] if plain else max(v) / min(v)


def _accuracies(per_seed: list[dict[str, Any]], arm: str, j: int) -> str:
    """Test accuracy per seed at the ``j``-th rate; "diverged" for a run that diverged
    (results.json stores its accuracy as 0 and its ``diverged_at`` step)."""
    return ", ".join(
        "diverged" if m[arm]["diverged_at"][j] is not None else f"{100 * m[arm]['test_acc'][j]:.1f}%" for m in per_seed
    )


def _claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """At 10x the plain best rate the plain network fails and BN matches the plain best; blow-up; step probe."""
    t = results["config"]
    lrs = [float(v) for v in t["lrs"]]
    per_seed = results["metrics"]["per_seed"]
    seeds = [int(v) for v in results["metrics"]["seeds"]]
    best, high = float(t["plain_best_lr"]), float(t["high_lr"])
    jb, jh = lrs.index(best), lrs.index(high)
    plain_best = [m["plain"]["test_acc"][jb] for m in per_seed]
    plain_high = [m["plain"]["test_acc"][jh] for m in per_seed]
    bn_high = [m["bn"]["test_acc"][jh] for m in per_seed]
    div_high = sum(m["plain"]["diverged_at"][jh] is not None for m in per_seed)
    gp = [_growth(m["plain"]["activation_rms_after_large_steps"], True) for m in per_seed]
    gb = [_growth(m["bn"]["activation_rms_after_large_steps"], False) for m in per_seed]
    alphas = [float(v) for v in t["step_probe_alphas"]]
    i = max(j for j, a in enumerate(alphas) if a <= _PROBE_ALPHA * (1 + 1e-9))
    pr = [number(m["plain"]["step_probe_loss_ratio"][i]) for m in per_seed]
    br = [number(m["bn"]["step_probe_loss_ratio"][i]) for m in per_seed]
    factor = [p / b if b > 0 else _CAP for p, b in zip(pr, br)]
    make = Claims(
        __name__,
        results,
        fails_pp=100 * float(t["high_lr_fails_by"]),
        tol_pp=100 * float(t["high_lr_as_accurate_within"]),
        growth_log10=math.log10(float(t["plain_growth_at_least"])),
        probe_log10=math.log10(float(t["probe_factor_at_least"])),
        alpha=alphas[i],
    )
    return [
        make(
            "plain_fails_at_high_lr",
            a=bn_high,
            b=plain_high,
            evidence=f"test accuracy at lr {high:g} per seed: BN {_accuracies(per_seed, 'bn', jh)}, plain "
            f"{_accuracies(per_seed, 'plain', jh)} (plain diverged on {div_high} of {len(seeds)} seeds; a diverged run "
            "counts as accuracy 0)",
        ),
        make(
            "bn_high_as_accurate",
            a=bn_high,
            b=plain_best,
            evidence=f"per seed: BN at lr {high:g} {_accuracies(per_seed, 'bn', jh)}; plain at lr {best:g} "
            f"{_accuracies(per_seed, 'plain', jb)}; BN's own best rate per seed "
            + listed((_best_lr(lrs, m["bn"]["test_acc"], float(t["best_tolerance"])) for m in per_seed), "{:g}"),
        ),
        make(
            "activation_blowup",
            a=[_log10(v) for v in gp],
            also=[part([_log10(v) for v in gb], below=math.log10(float(t["bn_growth_at_most"])))],
            evidence=f"growth per seed: plain {listed(gp, '{:.3g}x')} (after "
            f"{', '.join(str(m['plain']['large_steps_taken']) for m in per_seed)} finite steps); BN {listed(gb, '{:.3g}x')}",
        ),
        make(
            "step_probe",
            a=[_log10(v) for v in factor],
            evidence=f"L(w - alpha g)/L(w) per seed: plain {', '.join(f'{v:.3g}' for v in pr)}; BN {', '.join(f'{v:.3g}' for v in br)}",
        ),
    ]


def _figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Accuracy vs lr; L(w - alpha g)/L(w) at init; activation RMS per layer."""
    from ..figures import dress, pyplot, save

    plt = pyplot()
    cfg = results["config"]
    lrs = cfg["lrs"]
    per_seed = results["metrics"]["per_seed"]
    paths = []
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(7, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    n = len(per_seed)
    for k, (arm, label, color) in enumerate((("plain", "without BN", "tab:blue"), ("bn", "with BN", "tab:red"))):
        acc = np.asarray([m[arm]["test_acc"] for m in per_seed], dtype=float)  # (seeds, lrs)
        diverged = np.asarray([[d is not None for d in m[arm]["diverged_at"]] for m in per_seed])  # (seeds, lrs)
        # a diverged run is stored with accuracy 0; it is counted below, never drawn as 0%
        mean_band(ax, lrs, np.where(diverged, np.nan, acc), f"{label}, seeds that trained", color=color, marker="o")
        counts = diverged.sum(axis=0)
        shift = 1.0 + 0.08 * (2 * k - 1)  # the two arms side by side on the log axis
        strip.bar(np.asarray(lrs) * shift, counts, width=0.12 * np.asarray(lrs), color=color, label=label)
    ax.axvline(
        cfg["plain_best_lr"], color="tab:blue", linestyle=":", linewidth=1, label="plain best rate (calibration)"
    )
    ax.axvline(cfg["high_lr"], color="black", linestyle=":", linewidth=1, label="10x that rate")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    title = f"Learning-rate sweep: {len(cfg['hidden'])}-layer ReLU MLP"
    ylabel = f"test accuracy after {cfg['steps']} steps"
    dress(ax, title, ylabel=ylabel, grid=True, legend={"loc": "lower left", "fontsize": 8})
    strip.set_ylim(0, n)
    strip.set_yticks(range(0, n + 1, max(1, n // 3)))
    xlabel = "learning rate (SGD, constant; diverged = NaN/inf training loss)"
    dress(strip, xlabel=xlabel, ylabel=f"diverged\n(of {n} seeds)", grid="y")
    paths.append(save(fig, Path(outdir) / "accuracy_vs_lr.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, label, color in (("plain", "without BN", "tab:blue"), ("bn", "with BN", "tab:red")):
        m = per_seed[0][arm]
        r = np.asarray([number(v) for v in m["step_probe_loss_ratio"]])
        axes[0].plot(
            cfg["step_probe_alphas"], np.where(np.isfinite(r), r, np.nan), "o-", color=color, label=label, markersize=3
        )
        layers = np.arange(1, len(m["activation_rms_init"]) + 1)
        after = f"{label}, after {m['large_steps_taken']} step(s) at lr {cfg['blowup_lr']:g}"
        for key, style, line in (
            ("activation_rms_init", "--", f"{label}, at init"),
            ("activation_rms_after_large_steps", "o-", after),
        ):
            axes[1].plot(layers, [number(v) for v in m[key]], style, color=color, label=line)
    axes[0].axhline(1.0, color="black", linestyle=":", linewidth=1)
    title = "How far the gradient direction stays downhill (first seed)"
    ylabel = "L(w - alpha g) / L(w) at initialization"
    xlabel = "step size alpha along the gradient"
    dress(axes[0], title, xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, grid=True, legend=True)
    ylabel = "RMS of the layer's output (one batch)"
    title = "Activation scale by depth (first seed)"
    dress(axes[1], title, yscale="log", xlabel="hidden layer", ylabel=ylabel, grid=True, legend={"fontsize": 8})
    paths.append(save(fig, Path(outdir) / "step_probe_and_activations.png"))
    return paths


class LrSweep(Experiment):
    """The learning-rate sweep over several seeds, the plain best rate fixed by calibration."""

    ID, DESCRIPTION, QUICK_SECONDS = ID, DESCRIPTION, QUICK_SECONDS

    def settings(self, cfg: RunConfig) -> Settings:
        if cfg.mode == "tiny":
            return Settings.of(
                hidden=(32,) * 3,
                steps=30,
                steps_rule="tiny: 30 steps (a smoke test)",
                lrs=(0.1, 1.0),
                step_probe_alphas=tuple(np.logspace(-2, 1.5, 4).tolist()),
            )
        n = load_for(cfg, cfg.seed).train_x.shape[0]
        epochs = _EPOCHS[cfg.mode]
        lrs = (
            (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
            if cfg.mode == "quick"
            else (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
        )
        return Settings.of(
            hidden=(100,) * 8,
            steps=epochs_to_steps(epochs, n, 60),
            steps_rule=f"{epochs:g} passes over the training set ({n} examples, batch 60), the same rule on every data set",
            lrs=lrs,
            step_probe_alphas=tuple(np.logspace(-2, 1.5, 15 if cfg.mode == "quick" else 29).tolist()),
        )

    def prepare(self, cfg: RunConfig, settings: Settings, progress: Progress) -> Settings:
        """Calibrate the plain network's best rate on the calibration seed's own split."""
        s = settings
        cal = calibration_split(load_for(cfg, s.calibration_seed), s.calibration_seed)
        cal_acc_all, cal_div_all, _ = _sweep(s, [cal], [s.calibration_seed], None, "calibration: no BN sweep", progress)
        cal_acc, cal_div = cal_acc_all[0], cal_div_all[0]
        best = _best_lr(s.lrs, cal_acc, s.best_tolerance)
        j = int(np.argmin([abs(math.log(lr / (10 * best))) for lr in s.lrs]))
        return dataclasses.replace(
            s,
            plain_best_lr=best,
            high_lr=float(s.lrs[j]),
            calibration={
                "seed": s.calibration_seed,
                "split": f"80/20 stratified split of seed {s.calibration_seed}'s training set ({cal.train_x.shape[0]} / "
                f"{cal.test_x.shape[0]} examples); test set unused",
                "validation_acc": {f"{lr:g}": a for lr, a in zip(s.lrs, cal_acc)},
                "diverged": {f"{lr:g}": d is not None for lr, d in zip(s.lrs, cal_div)},
            },
        )

    def run_seeds(
        self, settings: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress
    ) -> list[dict[str, Any]]:
        """Both arms at every rate (each arm's seeds together), then each seed's probes."""
        s = settings
        sets = list(data)
        acc, div, tr = _sweep(s, sets, seeds, None, "no BN sweep", progress)
        bn_acc, bn_div, bn_tr = _sweep(s, sets, seeds, "bn", "BN sweep", progress)
        per_seed = []
        for k, (d, seed) in enumerate(zip(sets, seeds)):
            per_seed.append(
                {
                    arm: {"test_acc": a[k], "train_acc": t[k], "diverged_at": dv[k], **_probes(s, d, norm, seed)}
                    for arm, norm, a, t, dv in (("plain", None, acc, tr, div), ("bn", "bn", bn_acc, bn_tr, bn_div))
                }
            )
        return per_seed

    claims = staticmethod(_claims)
    figures = staticmethod(_figures)


EXPERIMENT = LrSweep()
run, claims, figures = EXPERIMENT.run, EXPERIMENT.claims, EXPERIMENT.figures
