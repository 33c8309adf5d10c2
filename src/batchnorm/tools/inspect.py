"""``inspect_model``: one report per batch-norm layer, and a plain-text table of them.

For each batch norm (torch's, ours, subclasses, SyncBatchNorm, frozen) it reports:

- kind, features, eps, affine, mode;
- momentum in both conventions: ours/PyTorch's (weight of the *new* batch statistic,
  ``running = (1 - m) * running + m * batch``) and Keras/Flax's (weight of the *old* value,
  ``1 - m``); ``None`` means the cumulative average (no Keras equivalent);
- health of the running statistics: non-finite entries, channels whose running variance is
  0 or tiny (< eps: the layer then divides by ~sqrt(eps) and amplifies noise);
- with a sample batch, the train/eval discrepancy: how far the batch statistics of the
  layer's input are from its running statistics, as
  ``mean_shift = max_c |mean_B - running_mean| / sqrt(running_var + eps)`` (in running standard
  deviations) and ``var_ratio = max_c max(r, 1/r)`` with ``r = (var_B + eps) / (running_var + eps)``
  (1 = no discrepancy). The model runs in eval mode, so each layer sees the inference
  network's input; large values mean eval outputs differ from what training saw;
- the Linear/Conv right before it whose bias it makes redundant, with the parameter count;
- whether [`fold`][batchnorm.fold] can fold it, and into what, or why not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import _dataflow
from .stats import Moments, _default_forward, _layer_input

__all__ = ["LayerReport", "inspect_model", "format_table"]


@dataclass(frozen=True)
class LayerReport:
    """Everything [`inspect_model`][batchnorm.tools.inspect_model] found out about one batch-norm layer."""

    name: str
    """Qualified module name."""
    kind: str
    """Class name."""
    features: int
    """Number of channels C."""
    momentum: float | None
    """Ours/PyTorch's momentum (weight of the new batch statistic); None = cumulative average."""
    keras_momentum: float | None
    """The same in Keras/Flax's convention (weight of the old value) = 1 - momentum."""
    eps: float
    """Added to the variance inside the square root."""
    affine: bool
    """Has a learnable (or frozen) scale and shift."""
    training: bool
    """The layer's train/eval flag."""
    has_running_stats: bool
    """Tracks running_mean/running_var (False: batch statistics in eval too)."""
    nonfinite: int
    """Number of NaN/inf entries in running_mean and running_var."""
    zero_var: int
    """Channels whose running variance is exactly 0 (or negative)."""
    tiny_var: int
    """Channels whose running variance is positive but below eps."""
    mean_shift: float | None
    """Train/eval discrepancy of the mean on the sample (running std units); None without sample."""
    var_ratio: float | None
    """Train/eval discrepancy of the variance on the sample (max ratio >= 1); None without sample."""
    redundant_bias: str | None
    """The layer whose bias this batch norm cancels, if any."""
    wasted_parameters: int
    """Size of that bias."""
    foldable: bool
    """Whether [`fold`][batchnorm.fold] folds this layer."""
    fold_note: str
    """Into which layer it folds, or why it cannot."""

    @property
    def healthy(self) -> bool:
        """No non-finite entries and no zero variance."""
        return self.nonfinite == 0 and self.zero_var == 0


def _health(bn: nn.Module) -> tuple[int, int, int]:
    rm = getattr(bn, "running_mean", None)
    rv = getattr(bn, "running_var", None)
    if not isinstance(rm, Tensor) or not isinstance(rv, Tensor):
        return 0, 0, 0
    nonfinite = int((~torch.isfinite(rm)).sum() + (~torch.isfinite(rv)).sum())
    finite_var = rv.detach().double()
    zero = int((finite_var <= 0).sum())
    tiny = int(((finite_var > 0) & (finite_var < float(bn.eps))).sum())
    return nonfinite, zero, tiny


def _sample_moments(
    model: nn.Module, bns: list[tuple[str, nn.Module]], sample: Any, forward: Callable[[nn.Module, Any], Any]
) -> dict[str, Moments]:
    """Input moments of every batch norm on one eval-mode forward of ``sample``."""
    acc: dict[str, Moments] = {}
    flags = [(m, m.training) for m in model.modules()]

    def make_hook(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _layer_input(m, args, kwargs)  # bn(x) and bn(input=x) alike
            # (N, C, *) reduced over N and the spatial dims
            mo = Moments.from_tensor(x, [0, *range(2, x.dim())])
            acc[name] = acc[name].merge(mo) if name in acc else mo

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, m in bns]
    try:
        for m, _ in flags:  # flags set directly: exported programs' modules refuse .eval()
            m.training = False
        with torch.no_grad():
            forward(model, sample)
    finally:
        for h in handles:
            h.remove()
        for m, t in flags:
            m.training = t
    return acc


def _discrepancy(bn: nn.Module, mo: Moments) -> tuple[float, float]:
    eps = float(bn.eps)
    rm = bn.running_mean.detach().double()
    rv = bn.running_var.detach().double()
    batch_var = mo.var(unbiased=False)
    shift = ((mo.mean - rm).abs() / torch.sqrt(rv.clamp_min(0) + eps)).max()
    ratio = (batch_var + eps) / (rv.clamp_min(0) + eps)
    both = torch.maximum(ratio, 1.0 / ratio).max()
    return float(shift), float(both)


def inspect_model(
    model: nn.Module, sample: Any = None, *, forward: Callable[[nn.Module, Any], Any] | None = None
) -> list[LayerReport]:
    """One [`LayerReport`][batchnorm.tools.LayerReport] per batch-norm layer of ``model``, in module order.

    Args:
        model: any module; it is not modified (flags are restored after the sample pass).
        sample: optional input batch for the train/eval discrepancy (fed as in
            [`recompute_statistics`][batchnorm.recompute_statistics]: tensor, (input, target) tuple, or dict).
        forward: ``forward(model, sample)`` to run it, if the default does not fit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inspect_model: expected an nn.Module, got {type(model).__name__}")
    bns = [(name, m) for name, m in model.named_modules() if _dataflow.is_batchnorm(m)]
    fold_info: dict[str, tuple[bool, str]] = {}
    bias_info: dict[str, tuple[str, int]] = {}
    try:
        flow = _dataflow.trace(model)
    except Exception as err:
        flow = None
        why = f"torch.fx cannot trace the model ({type(err).__name__})"
        fold_info = {name: (False, why) for name, _ in bns}
    if flow is not None:
        pairs, problems = _dataflow.bn_pairs(flow)
        for p in pairs:
            fold_info[p.bn] = (True, f"into {p.layer} ({'after' if p.bn_after else 'before'} it)")
        for name, why in problems.items():
            fold_info[name] = (False, why)
        for node in flow.graph.nodes:
            bn = flow.module(node)
            if bn is None or not _dataflow.is_batchnorm(bn):
                continue
            layer, _ = _dataflow.producer_problem(flow, node)
            if layer is not None and getattr(model.get_submodule(layer), "bias", None) is not None:
                bias_info[str(node.target)] = (layer, int(model.get_submodule(layer).bias.numel()))
    moments: dict[str, Moments] = {}
    if sample is not None:
        tracked = [(n, m) for n, m in bns if isinstance(getattr(m, "running_var", None), Tensor)]
        moments = _sample_moments(model, tracked, sample, forward or _default_forward)
    reports = []
    for name, bn in bns:
        momentum = getattr(bn, "momentum", None)
        if getattr(bn, "frozen", False):
            momentum = 0.0  # nothing is ever updated
        has_stats = isinstance(getattr(bn, "running_var", None), Tensor)
        nonfinite, zero, tiny = _health(bn)
        shift = ratio = None
        if name in moments and float(moments[name].count) > 0:
            shift, ratio = _discrepancy(bn, moments[name])
        layer, wasted = bias_info.get(name, (None, 0))
        foldable, note = fold_info.get(name, (False, "not called by the model's forward"))
        reports.append(
            LayerReport(
                name=name,
                kind=type(bn).__name__,
                features=int(bn.num_features),
                momentum=None if momentum is None else float(momentum),
                keras_momentum=None if momentum is None else 1.0 - float(momentum),
                eps=float(bn.eps),
                affine=getattr(bn, "weight", None) is not None,
                training=bn.training,
                has_running_stats=has_stats,
                nonfinite=nonfinite,
                zero_var=zero,
                tiny_var=tiny,
                mean_shift=shift,
                var_ratio=ratio,
                redundant_bias=layer,
                wasted_parameters=wasted,
                foldable=foldable,
                fold_note=note,
            )
        )
    return reports


def _fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if math.isinf(v) or math.isnan(v):
        return str(v)
    return format(v, spec)


_LEGEND = (
    "layer: module name; kind: class, [train] when in training mode; C: channels.",
    "momentum: ours/PyTorch (weight of the new batch); keras = 1 - momentum (weight of the old value).",
    "stats: running statistics: ok, none (not tracked), or how many entries are nonfinite (NaN/inf) and how many",
    "  channels have zero-var (variance <= 0) or tiny-var (0 < variance < eps).",
    "shift: max |batch mean - running mean| in running stds; var x: max ratio of batch to running variance",
    "  (both measured on the sample; '-' without one).",
    "bias: the layer before this batch norm whose bias it cancels, and that bias's size (strip_redundant_bias",
    "  removes it, outputs unchanged); '-' when there is none.",
    "fold: whether fold() merges this batch norm into the neighbouring Linear/Conv (why not: below).",
)
"""What each column of [`format_table`][batchnorm.tools.format_table] means, printed under it."""


def format_table(reports: list[LayerReport]) -> str:
    """A fixed-width text table of the reports (one row per layer), plus totals, a legend of the
    columns, and the reason for each layer that cannot be folded.

    The ``bias`` column names the layer whose bias the batch norm cancels and that bias's size,
    e.g. ``0 [8 params]``: module ``0`` holds an 8-element bias that the batch norm makes redundant.
    """
    head = ["layer", "kind", "C", "momentum", "keras", "eps", "stats", "shift", "var x", "bias", "fold"]
    rows = []
    for r in reports:
        if not r.has_running_stats:
            stats = "none"
        elif r.healthy and r.tiny_var == 0:
            stats = "ok"
        else:
            parts = [
                f"{r.nonfinite} nonfinite" if r.nonfinite else "",
                f"{r.zero_var} zero-var" if r.zero_var else "",
                f"{r.tiny_var} tiny-var" if r.tiny_var else "",
            ]
            stats = ",".join(p for p in parts if p)
        rows.append(
            [
                r.name or "<model>",
                r.kind + (" [train]" if r.training and r.momentum != 0.0 else ""),
                str(r.features),
                "cumul." if r.momentum is None else _fmt(r.momentum),
                "-" if r.keras_momentum is None else _fmt(r.keras_momentum),
                _fmt(r.eps),
                stats,
                _fmt(r.mean_shift, ".2f"),
                _fmt(r.var_ratio, ".2f"),
                f"{r.redundant_bias} [{r.wasted_parameters} params]" if r.redundant_bias else "-",
                "yes" if r.foldable else "no",
            ]
        )
    if not rows:
        return "no batch-norm layers found"
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    wasted = sum(r.wasted_parameters for r in reports)
    folds = sum(r.foldable for r in reports)
    lines.append("")
    lines.append(f"{len(reports)} batch-norm layer(s); {folds} foldable; {wasted} parameter(s) in redundant biases.")
    lines.append("\n".join(_LEGEND))
    for r in reports:
        if not r.foldable:
            lines.append(f"  {r.name or '<model>'}: not foldable: {r.fold_note}")
    return "\n".join(lines)
