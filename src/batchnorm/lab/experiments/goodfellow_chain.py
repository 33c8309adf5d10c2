"""``goodfellow-chain``: the deep linear chain y = x·w1···wL (Goodfellow et al., *Deep Learning*
§8.7.1): one step's higher-order terms grow with depth and weight scale; BN on every layer removes
that. Setup, rules and sources: ``goodfellow_chain.md``."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...functional import batch_norm
from ..claims_spec import Claims, Declared, listed
from ..config import RunConfig
from ..declare import columns, seeded
from ..experiment import Experiment, PerSeed, capped_log10
from ..figures import NamedFigures, dress, log_ticks, pyplot
from ..progress import Progress

_GRID_POINTS = {"tiny": 8, "quick": 29, "full": 57}


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``goodfellow_chain.settings.toml``."""

    depths: tuple[int, ...]
    scales: tuple[float, ...]
    lrs: tuple[float, ...]


def _measure(
    x: Tensor, depth: int, scale: float, bn: bool, lrs: Sequence[float], eps: float, band: Sequence[float] = (0.5, 1.5)
) -> dict[str, Any]:
    """Loss, |g|^2, predicted and actual change for every lr, and the largest safe lr of one
    chain. Shape: x (N, 1) float64."""
    t = 2.0 * x
    ws, gammas, betas = (
        [torch.full((1,), v, dtype=torch.float64, requires_grad=grad) for _ in range(depth)]
        for v, grad in ((scale, True), (1.0, bn), (0.0, bn))
    )
    params = ws + (gammas + betas if bn else [])

    def loss_of(p: list[Tensor]) -> Tensor:  # weights p[:depth]; with BN, gammas and betas after them
        h = x
        for w, g, b in zip(p[:depth], *((p[depth : 2 * depth], p[2 * depth :]) if bn else (gammas, betas))):
            h = batch_norm(h * w, None, None, g, b, training=True, eps=eps) if bn else h * w
        return 0.5 * ((h - t) ** 2).mean()

    loss = loss_of(params)
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    g2 = float(sum((g.detach() ** 2).sum() for g in grads))
    base = float(loss.detach())
    predicted = [-lr * g2 for lr in lrs]
    with torch.no_grad():
        after = [float(loss_of([p.detach() - lr * g for p, g in zip(params, grads)])) for lr in lrs]
    actual = [a - base if math.isfinite(a) else math.inf for a in after]
    ratios = [a / p if p != 0 else math.nan for a, p in zip(actual, predicted)]
    n_safe = next((i for i, r in enumerate(ratios) if not (math.isfinite(r) and band[0] <= r <= band[1])), len(ratios))
    safe = lrs[n_safe - 1] if n_safe else None  # the largest lr that, with every smaller one, stays in the band
    return {"loss": base, "grad_norm2": g2, "predicted": predicted, "actual": actual, "ratio": ratios, "safe_lr": safe}


def _cases(m: dict[str, Any], arm: str) -> list[dict[str, Any]]:
    return [c for c in m["cases"] if c["arm"] == arm]


def _safe(c: dict[str, Any], lrs: Sequence[float] | None = None) -> float:
    """Safe lr as a number. None (even the smallest lr on the grid is unsafe) gives NaN, or,
    with ``lrs``, the smallest grid lr — an upper bound on the true safe lr."""
    unsafe = float(lrs[0]) if lrs is not None else math.nan
    return float(c["safe_lr"]) if c["safe_lr"] is not None else unsafe


def _error_at(c: dict[str, Any], lrs: Sequence[float], lr: float) -> float:
    """|actual/predicted - 1| at the grid point nearest ``lr`` (inf when the step overflowed)."""
    r = float(c["ratio"][int(np.argmin([abs(math.log(v / lr)) for v in lrs]))])
    return abs(r - 1.0) if math.isfinite(r) else math.inf


_CAP = 1e300  # an error that overflowed to inf counts as this in the log-scale claims


def _quantities(m: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    """One seed's numbers behind the claims (and the words the evidence shows of the first seed)."""
    lrs, ref = s["lrs"], s["reference_lr"]
    plain, bn = _cases(m, "plain"), _cases(m, "bn")
    lo, hi = min(plain, key=lambda c: _safe(c, lrs)), max(plain, key=lambda c: _safe(c, lrs))
    safe = [f"{c['safe_lr']:.2g}" if c["safe_lr"] is not None else f"< {lrs[0]:.0e}" for c in (lo, hi)]
    chain = [f"{v} (depth {c['depth']}, scale {c['scale']})" for v, c in zip(safe, (lo, hi))]
    # growth of the first-order error with depth, for every weight scale >= 1
    growth, detail = [], []
    for scale in sorted({c["scale"] for c in plain if c["scale"] >= 1.0}):
        row = sorted((c for c in plain if c["scale"] == scale), key=lambda c: c["depth"])
        errs = [_error_at(c, lrs, ref) for c in row]
        logs = [capped_log10(e, 1e-300, _CAP) for e in errs]
        growth.append((min(b - a for a, b in zip(logs, logs[1:])), logs[-1] - logs[0]))
        detail.append(f"scale {scale:g}: " + ", ".join(f"L={c['depth']} {e:.2g}" for c, e in zip(row, errs)))
    b_safe = [_safe(c, lrs) for c in bn]
    return {
        "plain_spread_log10": math.log10(_safe(hi, lrs) / _safe(lo, lrs)),
        "plain_range": f"from {chain[0]} to {chain[1]}; {sum(c['safe_lr'] is None for c in plain)} chain(s) unsafe even at lr {lrs[0]:.0e}",
        "growth_min_step_log10": min(g[0] for g in growth),
        "growth_total_log10": min(g[1] for g in growth),
        "growth_detail": "; ".join(detail),
        "bn_spread": max(b_safe) / min(b_safe),
        "bn_safe_min": min(b_safe),
        "bn_safe_max": max(b_safe),
        "bn_unsafe": sum(1 for c in bn if c["safe_lr"] is None),
        "bn_error": max(_error_at(c, lrs, ref) for c in bn),
        "plain_error": max(_error_at(c, lrs, ref) for c in plain),
    }


class Chain(Experiment):
    """The linear chain over several seeds (each seed: its own inputs x)."""

    DESCRIPTION = "Deep linear chain y = x*w1*...*wL: first-order vs actual loss change of one step, with and without per-layer BN"
    USES_DATA = False
    """The chain is synthetic: ``--data`` is ignored (the replication matrix counts it once)."""

    def settings(self, cfg: RunConfig) -> Settings:
        return Settings.of(cfg.mode, lrs=tuple(float(v) for v in np.logspace(-6, 1, _GRID_POINTS[cfg.mode])))

    def load_seed(self, cfg: RunConfig, settings: Settings, seed: int) -> Tensor:
        """The seed's inputs x, (N, 1) float64 standard normal."""
        return torch.randn(settings.batch, 1, generator=seeded(seed), dtype=torch.float64)

    def describe_data(self, settings: Settings, first: Tensor) -> dict[str, Any]:
        return {"name": "synthetic chain", "batch": settings.batch, "split": "each seed draws its own inputs"}

    def run_seeds(self, s: Settings, data: Sequence[Tensor], seeds: Sequence[int], progress: Progress) -> PerSeed:
        """Each seed's inputs through every (arm, depth, scale)."""
        grid = list(itertools.product(("plain", "bn"), s.depths, s.scales))
        with progress.task("chains", total=len(grid) * len(seeds)) as tick:

            def case(x: Tensor, arm: str, depth: int, scale: float) -> dict[str, Any]:
                m = _measure(x, depth, scale, arm == "bn", s.lrs, s.bn_eps, s.safe_band)
                tick.update(1)
                return {"arm": arm, "depth": depth, "scale": scale, **m}

            return [{"cases": [case(x, *g) for g in grid]} for x in data]

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """No single safe lr without normalization; depth makes the first-order error grow; BN removes both."""
        s = results["config"]
        q = [_quantities(m, s) for m in results["metrics"]["per_seed"]]
        col = columns(q)
        return Claims(
            __name__,
            results,
            **col,
            **{key: q[0][key] for key in ("plain_range", "growth_detail")},
            spread_x=listed([10**v for v in col["plain_spread_log10"]], "{:.3g}x"),
            bn_spread_x=listed(col["bn_spread"], "{:.3g}x"),
            bn_lo=min(col["bn_safe_min"]),
            bn_hi=max(col["bn_safe_max"]),
            n_bn=len(_cases(results["metrics"]["per_seed"][0], "bn")),
            bn_unsafe_total=sum(int(v) for v in col["bn_unsafe"]),
            log10_cap=math.log10(_CAP),
            spread_log10=math.log10(float(s["plain_safe_lr_spread_at_least"])),
            growth_log10=math.log10(float(s["plain_error_growth_at_least"])),
            bn_error_pct=100 * s["bn_first_order_error_below"],
        ).all()

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Predicted vs actual change (plain, BN) and safe lr vs depth (the first seed)."""
        plt = pyplot()
        cfg, m, seed = results["config"], results["metrics"]["per_seed"][0], results["metrics"]["seeds"][0]
        scale_shown = 1.2 if 1.2 in cfg["scales"] else cfg["scales"][-1]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(cfg["depths"])))
        for ax, arm, title in zip(axes, ("plain", "bn"), ("without normalization", "BN on every layer")):
            for color, depth in zip(colors, cfg["depths"]):
                c = next(c for c in _cases(m, arm) if c["depth"] == depth and c["scale"] == scale_shown)
                pred, act = (-np.asarray([float(v) for v in c[k]], dtype=float) for k in ("predicted", "actual"))
                ok = np.isfinite(act)
                ax.plot(pred[ok], act[ok], "o-", markersize=3, color=color, label=f"depth {depth}")
            ax.plot([1e-8, 1e8], [1e-8, 1e8], ":", color="black", label="actual = predicted")
            ax.set_yscale("symlog", linthresh=1e-6)
            ticks = [-1e12, -1e8, -1e4, -1.0, -1e-4, 0.0, 1e-4, 1.0, 1e4]  # every 4 decades: no crowding at 0
            limits: dict[str, Any] = {"xscale": "log", "xlim": (1e-8, 1e6), "ylim": (-1e12, 1e4), "yticks": ticks}
            xlabel, legend = "predicted loss decrease lr*|g|^2 (first order)", {"loc": "lower left", "fontsize": 8}
            dress(ax, f"{title} (all weights = {scale_shown})", **limits, xlabel=xlabel, grid=True, legend=legend)
        axes[0].set_ylabel("actual loss decrease (negative = loss went up)")
        fig.suptitle(f"One simultaneous gradient step on y = x*w1*...*wL (seed {seed})")
        yield "predicted_vs_actual.png", fig

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm, style, name in (("plain", "-o", "no norm"), ("bn", "--s", "BN")):
            for color, scale in zip(plt.cm.plasma(np.linspace(0, 0.85, len(cfg["scales"]))), cfg["scales"]):
                row = sorted((c for c in _cases(m, arm) if c["scale"] == scale), key=lambda c: c["depth"])
                depths, safe = [c["depth"] for c in row], [_safe(c) for c in row]
                ax.plot(depths, safe, style, color=color, markersize=4, label=f"{name}, weights {scale}")
        log_ticks(ax.xaxis, cfg["depths"], base=2)
        title = f"Largest step whose effect the gradient predicts within ±50% (seed {seed})"
        ylabel = "largest safe learning rate"
        dress(ax, title, yscale="log", xlabel="depth L", ylabel=ylabel, grid=True, legend={"fontsize": 7, "ncol": 2})
        yield "safe_learning_rate.png", fig


EXPERIMENT = Chain()
