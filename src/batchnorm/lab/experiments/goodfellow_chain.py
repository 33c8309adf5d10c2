"""``goodfellow-chain``: the deep linear chain y = x·w1·w2···wL (Goodfellow, Bengio & Courville,
*Deep Learning* §8.7.1): a simultaneous gradient step on all layers changes the loss by
higher-order terms that grow with depth and weight scale, so no single learning rate is safe;
normalizing every layer (BN) removes that dependence.

For each depth L and weight scale s (all w_i = s), with a batch of N Gaussian inputs x and the
target t = 2x, the loss is f = mean((y - t)^2)/2. One step w <- w - lr·g (g = grad f) is
predicted to change the loss by -lr·|g|^2 (first order); the actual change is measured
exactly (float64). With BN, every layer is h_i = BN(h_{i-1}·w_i) = gamma_i·x_hat + beta_i
(``batchnorm.functional.batch_norm`` in training mode).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...functional import batch_norm
from ..config import RunConfig
from ..progress import Progress

ID = "goodfellow-chain"
DESCRIPTION = "Deep linear chain y = x*w1*...*wL: first-order vs actual loss change of one step, with and without per-layer BN"
QUICK_SECONDS = 1.0
EXPLANATION = """
Gradient descent updates every layer at once, each by the gradient computed as if the other
layers stayed where they were. Goodfellow, Bengio & Courville (Deep Learning, section 8.7.1)
illustrate why this is a problem with the simplest deep network: a chain of scalar weights,
y = x * w1 * w2 * ... * wL. A step of size lr is predicted to lower the loss by lr * |g|^2
(the first-order term of a Taylor expansion), but the actual change also contains products of
the updates of two, three, ... L layers. Those higher-order terms are multiplied by products
of the other weights: they grow with depth when the weights are larger than 1 and vanish
when they are smaller, so the learning rate that is safe for one network is far too large,
or needlessly small, for another.

Batch normalization fixes the scale of every layer's output: h_i = gamma_i * normalize(h_(i-1)
* w_i) + beta_i. The output no longer depends on the product of the lower weights (in this
linear chain it depends only on the last gamma and beta), so the effect of a step is
predictable and the same for every depth and weight scale. (The price in a linear chain is
that the lower layers stop mattering at all; in a real network the nonlinearities keep them
useful.)

Measured here, for every depth and weight scale: the loss change predicted by the first-order
term, the actual change, and the largest "safe" learning rate — the largest step on a
log-spaced grid for which every step up to it changes the loss by 50% to 150% of the
prediction. The inputs are N Gaussian numbers, the target is t = 2x, the loss is the mean
squared error, in float64. This experiment ignores --data (the chain is synthetic).
"""

_SAFE_BAND = (0.5, 1.5)
_REF_LR = 0.1


def _settings(cfg: RunConfig) -> dict[str, Any]:
    return {
        "depths": cfg.pick(tiny=[2, 4], quick=[2, 4, 8, 16], full=[2, 4, 8, 16, 32]),
        "scales": cfg.pick(tiny=[1.0, 1.2], quick=[0.8, 1.0, 1.2, 1.5], full=[0.5, 0.8, 1.0, 1.2, 1.5]),
        "lrs": np.logspace(-6, 1, cfg.pick(tiny=8, quick=29, full=57)).tolist(),
        "batch": 256,
        "target": "t = 2x",
        "loss": "f = mean((y - t)^2) / 2",
        "init": "every w_i = scale; BN: gamma_i = 1, beta_i = 0",
        "bn_eps": 1e-12,
        "dtype": "float64",
        "step": "one simultaneous step on every parameter: p <- p - lr * df/dp",
        "predicted_change": "-lr * |g|^2 (first order)",
        "safe_band": list(_SAFE_BAND),
        "safe_lr_definition": "largest lr on the grid such that actual/predicted is within the safe band for it and every smaller lr",
        "reference_lr": _REF_LR,
        "data_note": "synthetic (x ~ N(0, 1), seeded); --data is ignored",
    }


def _output(x: Tensor, ws: list[Tensor], gammas: list[Tensor], betas: list[Tensor], bn: bool, eps: float) -> Tensor:
    """The chain's output for a batch x (N, 1)."""
    h = x
    for w, g, b in zip(ws, gammas, betas):
        h = h * w
        if bn:
            h = batch_norm(h, None, None, g, b, training=True, eps=eps)
    return h


def _measure(x: Tensor, depth: int, scale: float, bn: bool, lrs: list[float], eps: float) -> dict[str, Any]:
    t = 2.0 * x
    ws = [torch.full((1,), scale, dtype=torch.float64, requires_grad=True) for _ in range(depth)]
    gammas = [torch.ones(1, dtype=torch.float64, requires_grad=bn) for _ in range(depth)]
    betas = [torch.zeros(1, dtype=torch.float64, requires_grad=bn) for _ in range(depth)]
    params = ws + (gammas + betas if bn else [])
    loss = 0.5 * ((_output(x, ws, gammas, betas, bn, eps) - t) ** 2).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    g2 = float(sum((g.detach() ** 2).sum() for g in grads))
    base = float(loss.detach())
    predicted = []
    actual = []
    with torch.no_grad():
        for lr in lrs:
            new = [p.detach() - lr * g for p, g in zip(params, grads)]
            new_ws = new[:depth]
            new_g = new[depth : 2 * depth] if bn else gammas
            new_b = new[2 * depth :] if bn else betas
            after = float(0.5 * ((_output(x, new_ws, new_g, new_b, bn, eps) - t) ** 2).mean())
            predicted.append(-lr * g2)
            actual.append(after - base if math.isfinite(after) else math.inf)
    ratios = [a / p if p != 0 else math.nan for a, p in zip(actual, predicted)]
    safe = None
    for lr, r in zip(lrs, ratios):
        if math.isfinite(r) and _SAFE_BAND[0] <= r <= _SAFE_BAND[1]:
            safe = lr
        else:
            break
    return {"loss": base, "grad_norm2": g2, "predicted": predicted, "actual": actual, "ratio": ratios, "safe_lr": safe}


def run(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Measure predicted vs actual loss change for every (arm, depth, scale)."""
    s = _settings(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(s["batch"], 1, generator=gen, dtype=torch.float64)  # (N, 1)
    cases = []
    total = 2 * len(s["depths"]) * len(s["scales"])
    with progress.task("chains", total=total) as tick:
        for arm in ("plain", "bn"):
            for depth in s["depths"]:
                for scale in s["scales"]:
                    m = _measure(x, depth, scale, arm == "bn", s["lrs"], s["bn_eps"])
                    cases.append({"arm": arm, "depth": depth, "scale": scale, **m})
                    tick.update(1)
    return {"config": s, "data": {"name": "synthetic chain", "batch": s["batch"]}, "metrics": {"cases": cases}}


def _cases(results: dict[str, Any], arm: str) -> list[dict[str, Any]]:
    return [c for c in results["metrics"]["cases"] if c["arm"] == arm]


def _safe(c: dict[str, Any], lrs: list[float] | None = None) -> float:
    """Safe lr as a number. None (even the smallest lr on the grid is unsafe) gives NaN, or,
    with ``lrs``, the smallest grid lr — an upper bound on the true safe lr."""
    if c["safe_lr"] is not None:
        return float(c["safe_lr"])
    return float(lrs[0]) if lrs is not None else math.nan


def _fmt_safe(c: dict[str, Any], lrs: list[float]) -> str:
    return f"{c['safe_lr']:.2g}" if c["safe_lr"] is not None else f"< {lrs[0]:.0e}"


def _error_at(c: dict[str, Any], lrs: list[float], lr: float) -> float:
    i = int(np.argmin([abs(math.log(v / lr)) for v in lrs]))
    r = c["ratio"][i]
    r = float(r) if not isinstance(r, str) else float(r)
    return abs(r - 1.0) if math.isfinite(r) else math.inf


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """No single safe lr without normalization; depth makes the first-order error grow; BN removes both."""
    lrs = results["config"]["lrs"]
    plain = _cases(results, "plain")
    bn = _cases(results, "bn")
    out = []

    # an unsafe-everywhere chain counts with the smallest grid lr: a lower bound on the spread
    lo = min(plain, key=lambda c: _safe(c, lrs))
    hi = max(plain, key=lambda c: _safe(c, lrs))
    spread = _safe(hi, lrs) / _safe(lo, lrs)
    unsafe = sum(1 for c in plain if c["safe_lr"] is None)
    out.append(
        {
            "claim": "Without normalization no single learning rate is safe: the largest safe step varies by more than 100x across depths and weight scales",
            "holds": bool(hi["safe_lr"] is not None and spread > 100),
            "evidence": f"safe lr from {_fmt_safe(lo, lrs)} (depth {lo['depth']}, scale {lo['scale']}) to {_fmt_safe(hi, lrs)} "
            f"(depth {hi['depth']}, scale {hi['scale']}): at least {spread:.3g}x; {unsafe} chain(s) unsafe even at lr {lrs[0]:.0e}",
        }
    )

    scales = sorted({c["scale"] for c in plain if c["scale"] >= 1.0})
    monotone = []
    detail = []
    for scale in scales:
        row = sorted((c for c in plain if c["scale"] == scale), key=lambda c: c["depth"])
        errs = [_error_at(c, lrs, _REF_LR) for c in row]
        monotone.append(all(b >= a for a, b in zip(errs, errs[1:])) and errs[-1] > 2 * errs[0])
        detail.append(f"scale {scale}: " + ", ".join(f"L={c['depth']} {e:.2g}" for c, e in zip(row, errs)))
    out.append(
        {
            "claim": f"Without normalization the relative error of the first-order prediction at lr {_REF_LR:g} grows with depth (weights >= 1)",
            "holds": bool(monotone and all(monotone)),
            "evidence": "|actual/predicted - 1|: " + "; ".join(detail),
        }
    )

    b_safe = [_safe(c) for c in bn]
    b_finite = [v for v in b_safe if math.isfinite(v)]
    b_spread = max(b_finite) / min(b_finite) if b_finite else math.nan
    out.append(
        {
            "claim": "With BN on every layer the safe learning rate no longer depends on depth or weight scale (varies by less than 2x)",
            "holds": bool(len(b_finite) == len(b_safe) and b_spread < 2),
            "evidence": f"BN safe lr from {min(b_finite):.2g} to {max(b_finite):.2g} ({b_spread:.3g}x) over {len(bn)} chains"
            if b_finite
            else "no safe lr found with BN",
        }
    )
    b_err = max(_error_at(c, lrs, _REF_LR) for c in bn)
    p_err = max(_error_at(c, lrs, _REF_LR) for c in plain)
    out.append(
        {
            "claim": f"With BN the first-order prediction at lr {_REF_LR:g} is within 10% of the actual change for every depth and scale",
            "holds": bool(b_err <= 0.10),
            "evidence": f"largest |actual/predicted - 1| at lr {_REF_LR:g}: {b_err:.3g} with BN, {p_err:.3g} without",
        }
    )
    return out


def figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Predicted vs actual change (plain, BN) and safe lr vs depth."""
    from ..figures import pyplot, save

    plt = pyplot()
    cfg = results["config"]
    paths = []
    scale_shown = 1.2 if 1.2 in cfg["scales"] else cfg["scales"][-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(cfg["depths"])))
    for ax, arm, title in ((axes[0], "plain", "without normalization"), (axes[1], "bn", "BN on every layer")):
        for color, depth in zip(colors, cfg["depths"]):
            c = next(c for c in _cases(results, arm) if c["depth"] == depth and c["scale"] == scale_shown)
            pred = -np.asarray(c["predicted"], dtype=float)
            act = -np.asarray([float(v) for v in c["actual"]], dtype=float)
            ok = np.isfinite(act)
            ax.plot(pred[ok], act[ok], "o-", markersize=3, color=color, label=f"depth {depth}")
        lim = [1e-8, 1e8]
        ax.plot(lim, lim, ":", color="black", label="actual = predicted")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_xlim(1e-8, 1e6)
        ax.set_ylim(-1e12, 1e4)
        ax.set_xlabel("predicted loss decrease lr*|g|^2 (first order)")
        ax.set_title(f"{title} (all weights = {scale_shown})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    axes[0].set_ylabel("actual loss decrease (negative = loss went up)")
    fig.suptitle("One simultaneous gradient step on y = x*w1*...*wL")
    paths.append(save(fig, Path(outdir) / "predicted_vs_actual.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, style in (("plain", "-o"), ("bn", "--s")):
        for color, scale in zip(plt.cm.plasma(np.linspace(0, 0.85, len(cfg["scales"]))), cfg["scales"]):
            row = sorted((c for c in _cases(results, arm) if c["scale"] == scale), key=lambda c: c["depth"])
            ax.plot([c["depth"] for c in row], [_safe(c) for c in row], style, color=color, markersize=4,
                    label=f"{'no norm' if arm == 'plain' else 'BN'}, weights {scale}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth L")
    ax.set_ylabel("largest safe learning rate")
    ax.set_title("Largest step whose effect the gradient predicts within ±50%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    paths.append(save(fig, Path(outdir) / "safe_learning_rate.png"))
    return paths
