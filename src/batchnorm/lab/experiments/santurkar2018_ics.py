"""``santurkar2018-ics``: Santurkar et al. 2018, Def. 2.1 and Fig. 3 — internal covariate shift
measured as the change of a layer's gradient after the earlier layers are updated; BN does
not make it smaller.
Setup, the rules fixed before any run and each setting's source: ``santurkar2018_ics.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..claims_spec import Claims, Declared
from ..datasets import Dataset
from ..declare import gradients, probing, seeded, step_from
from ..experiment import Experiment
from ..figures import NamedFigures, dress, pyplot
from ..models import MLP, blocks
from ..progress import Progress
from ..training import TrainSpec, train
from ._santurkar import COLORS, LABELS, build, probe_batch, window_means


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``santurkar2018_ics.settings.toml``."""

    dln_steps: int
    dln_checkpoints: int
    mlp_steps: int
    mlp_checkpoints: int


def ics(model: nn.Module, x: Tensor, y: Tensor, lr: float, loss_fn: Any) -> list[dict[str, float]]:
    """Santurkar et al.'s ICS (Def. 2.1) for every hidden block i >= 2 of a lab model.

    Returns one dict per layer i (1-based ``layer``): ``l2`` = ||G - G'||, ``rel_l2`` =
    ||G - G'|| / ||G||, ``cos`` = cos(G, G'), ``grad_norm`` = ||G||, where G is the gradient of
    the loss on (x, y) w.r.t. block i's Linear weight and G' the same after the parameters of
    blocks < i took the SGD step ``-lr * grad`` (taken block by block, each once). The model's
    parameters, gradients, buffers and training flags are left as they were.
    """
    hidden = list(blocks(model))
    out = []
    with probing(model) as start:
        _, grads = gradients(model, x, y, loss_fn)
        for i in range(1, len(hidden)):
            step_from(hidden[i - 1].parameters(), start, grads, lr)  # blocks < i - 1 stepped in earlier rounds
            weight = next(hidden[i].parameters())  # block i's Linear weight
            g_before = grads[weight].flatten()  # (out * in,)
            g_after = gradients(model, x, y, loss_fn)[1][weight].flatten()
            diff = float((g_before - g_after).norm())
            norm = float(g_before.norm())
            cos = float(F.cosine_similarity(g_before, g_after, dim=0))
            out.append({"layer": i + 1, "l2": diff, "rel_l2": diff / max(norm, 1e-30), "cos": cos, "grad_norm": norm})
    return out


def _dln_data(seed: int, n: int = 4096) -> tuple[Tensor, Tensor]:
    g = seeded(seed + 11)
    x = torch.randn(n, 32, generator=g)  # (n, 32)
    a = torch.randn(32, 10, generator=g) / 32**0.5  # (32, 10)
    return x, x @ a  # (n, 32), (n, 10)


def _measured(model: nn.Module, net: tuple[Any, ...], seed: int, label: str, progress: Progress) -> dict[str, Any]:
    """Train ``model`` on ``net = ((x, y), loss_fn, spec, checkpoints)`` (minibatch order seeded
    ``seed + 2``), measuring ``ics`` on a 128-example slice at ``checkpoints`` evenly spaced steps
    (and step 0)."""
    (x, y), loss_fn, spec, checkpoints = net
    marks = list(range(0, spec.steps + 1, max(1, spec.steps // checkpoints)))
    rec: dict[str, Any] = {"step": [], "ics": []}

    def record(step: int, _result: object) -> None:
        rec["ics"].append(ics(model, *probe_batch(x, y, len(rec["step"])), spec.lr, loss_fn))
        rec["step"].append(step)

    with progress.task(f"{label} seed {seed}", total=spec.steps) as tick:
        order = seeded(seed + 2)
        result = train(
            model, x, y, spec, generator=order, checkpoints=marks, on_checkpoint=record, tick=tick, loss_fn=loss_fn
        )
    return {**rec, "loss_curve": window_means(result.losses, marks), "diverged": result.diverged}


def _median(rec: dict[str, Any], key: str) -> float:
    """Median of ``key`` over one run's checkpoints after step 0 and its layers."""
    vals = [float(v[key]) for step, layers in zip(rec["step"], rec["ics"]) if step != 0 for v in layers]
    return float(np.nanmedian(vals)) if vals else float("nan")


_NETS = {"dln": "25-layer deep linear net", "mlp": "10-layer ReLU MLP"}


class Ics(Experiment):
    """Santurkar et al.'s ICS measurement over several seeds (one seed at a time: the DLN's MSE
    loss and the per-layer measurement dominate, not the training steps)."""

    DESCRIPTION = "Santurkar 2018 Def. 2.1: ICS as the change of a layer's gradient after earlier layers update (l2, cosine); BN's is not lower"

    def run_seed(self, settings: Settings, data: Dataset, seed: int, progress: Progress) -> dict[str, Any]:
        s, xy, out = settings, (data.train_x, data.train_y), {"dln": {}, "mlp": {}}
        dln = (_dln_data(seed), F.mse_loss, TrainSpec(s.dln_steps, s.batch_size, s.dln_lr), s.dln_checkpoints)
        mlp = (xy, F.cross_entropy, TrainSpec(s.mlp_steps, s.batch_size, s.mlp_lr), s.mlp_checkpoints)
        for norm, bn in (("none", None), ("bn", "bn")):
            init = {"init_std": (1.0 / s.dln_width) ** 0.5, "generator": seeded(seed + 1)}
            model = MLP(32, [s.dln_width] * s.dln_depth, 10, act="identity", norm=bn, **init)
            out["dln"][norm] = _measured(model, dln, seed, f"DLN {norm}", progress)
            model = build(data, s.mlp_depth, s.mlp_width, bn, seed)
            out["mlp"][norm] = _measured(model, mlp, seed, f"MLP {norm}", progress)
        return out

    def describe_data(self, settings: Settings, first: Dataset) -> dict[str, Any]:
        note = "the DLN part uses its own Gaussian data (see config: dln_*)"
        return {**super().describe_data(settings, first), "note": note}

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """BN's ICS is not lower than the plain network's, in the DLN and in the MLP."""
        per_seed, norms = results["metrics"]["per_seed"], ("bn", "none")
        diverged = {net: sum(bool(m[net][norm]["diverged"]) for m in per_seed for norm in norms) for net in _NETS}
        return Claims(
            __name__,
            results,
            **{
                f"{net}_{norm}_{key}": [_median(m[net][norm], key) for m in per_seed]
                for net in _NETS
                for norm in norms
                for key in ("l2", "rel_l2", "cos")
            },
            **{f"{net}_diverged": f"; {n} run(s) diverged" if n else "" for net, n in diverged.items()},
        ).all()

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Per network: l2 and cosine over training (median and IQR over layers and seeds), and per layer."""
        per_seed = results["metrics"]["per_seed"]
        for net, name in _NETS.items():
            fig, axes = pyplot().subplots(2, 2, figsize=(10.5, 7.0))
            for (top, bottom), key in zip(axes.T, ("l2", "cos")):
                for norm in ("none", "bn"):
                    runs, line = [m[net][norm] for m in per_seed], {"color": COLORS[norm], "marker": "o", "ms": 3}
                    t = min(len(r["ics"]) for r in runs)
                    per_step = np.asarray([[[float(v[key]) for v in r["ics"][i]] for r in runs] for i in range(t)])
                    per_step = per_step.reshape(t, -1)  # (checkpoints, seeds * layers)
                    label = f"{LABELS[norm]} (median over layers and seeds)"
                    top.plot(runs[0]["step"][:t], np.median(per_step, axis=1), label=label, **line)
                    lo, hi = (np.percentile(per_step, q, axis=1) for q in (25, 75))
                    top.fill_between(runs[0]["step"][:t], lo, hi, color=COLORS[norm], alpha=0.2, linewidth=0)
                    layers = [v["layer"] for v in runs[0]["ics"][0]]
                    after = [(r, i) for r in runs for i in range(len(r["step"])) if r["step"][i] > 0]
                    per_layer = np.asarray([[float(r["ics"][i][j][key]) for r, i in after] for j in range(len(layers))])
                    label = f"{LABELS[norm]} (median over checkpoints after step 0)"
                    bottom.plot(layers, np.median(per_layer, axis=1), label=label, **line)
                l2 = key == "l2"
                style: dict[str, Any] = {"ylabel": "||G - G'||" if l2 else "cos(G, G')", "legend": {"fontsize": 8}}
                style |= {"yscale": "log"} if l2 else {}  # the l2 difference spans decades
                what = "l2 difference" if l2 else "cosine"
                dress(top, f"{name}: {what} over training", xlabel="training step", **style)
                dress(bottom, f"{name}: per layer", xlabel="layer i", **style)
            yield f"ics_{net}.png", fig


EXPERIMENT = Ics()
