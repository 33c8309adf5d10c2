"""``diagnose``: batch-norm mistakes visible in a model's state and, given data, in its statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _dataflow
from ..inspect import _sample_moments
from ..stats import Moments, _default_forward, is_recomputable
from ..surgery import RedundantBias, find_redundant_biases
from ._finding import CODES, KERAS_MOMENTUM, STALE_MEAN_SHIFT, STALE_VAR_RATIO, Finding, updates_running_stats

__all__ = ["diagnose"]

_STAT_BUFFERS = ("running_mean", "running_var", "running_std")


def _stat_tensors(m: nn.Module) -> dict[str, Tensor]:
    """The running-statistic buffers of a layer (batch renorm: running_mean and running_std, its
    ``running_var`` being a property derived from running_std)."""
    buffers = dict(m.named_buffers(recurse=False))
    return {name: buffers[name] for name in _STAT_BUFFERS if isinstance(buffers.get(name), Tensor)}


def _keras_momentum(name: str, m: nn.Module) -> Finding | None:
    momentum = getattr(m, "momentum", None)
    if getattr(m, "frozen", False) or not isinstance(momentum, (int, float)) or momentum <= KERAS_MOMENTUM:
        return None
    m_ = float(momentum)
    return Finding(
        "keras-momentum",
        name,
        f"momentum={m_:g} gives the new batch weight {m_:g} and the running value only {1 - m_:.3g} "
        f"(running = (1 - momentum) * running + momentum * batch): the running statistics remember about "
        f"{1 / m_:.3g} batch(es), nearly the last batch alone. A momentum above {KERAS_MOMENTUM} is probably a "
        "Keras/Flax momentum, which weights the OLD value.",
        f"set momentum={1 - m_:.3g} (= 1 - {m_:g}); batchnorm.from_keras_momentum({m_:g}) converts one value, "
        "batchnorm.from_keras(momentum, epsilon) a layer's Keras settings (eps too).",
    )


def _low_precision(name: str, m: nn.Module) -> Finding | None:
    low = {k: t.dtype for k, t in _stat_tensors(m).items() if t.dtype in (torch.float16, torch.bfloat16)}
    if not low:
        return None
    what = ", ".join(f"{k} in {str(dt).removeprefix('torch.')}" for k, dt in low.items())
    return Finding(
        "low-precision-stats",
        name,
        f"{what}: float16 overflows above 65504 (a variance of activations around 256 in size) and keeps 11 "
        "significant bits, bfloat16 only 8, so a momentum update smaller than 0.05% (float16) or 0.4% "
        "(bfloat16) of the value rounds away and the running statistics stop following the data.",
        "keep batch norm in float32: call .float() on the batch-norm layers after model.half() or "
        ".to(torch.bfloat16) (torch's and batchnorm's layers take float16/bfloat16 input with float32 "
        "statistics), or train with torch.autocast instead of casting the model.",
    )


def _redundant_bias(name: str, rb: RedundantBias | None, model: nn.Module) -> Finding | None:
    if rb is None:
        return None
    kind = type(model.get_submodule(rb.layer)).__name__
    return Finding(
        "redundant-bias",
        name,
        f"the bias of {kind} {rb.layer!r} ({rb.parameters} parameters) feeds straight into this batch norm, which "
        "subtracts the mean: the bias has no effect on the output and gets zero gradient.",
        f"build {rb.layer!r} with bias=False, or batchnorm.strip_redundant_bias(model) (outputs unchanged).",
    )


def _batch_stats_at_eval(name: str, m: nn.Module) -> Finding | None:
    if getattr(m, "frozen", False) or isinstance(getattr(m, "running_mean", None), Tensor):
        return None
    return Finding(
        "batch-stats-at-eval",
        name,
        "no running statistics (track_running_stats=False): in eval mode the layer normalizes with the "
        "statistics of the evaluation batch itself, so an example's output depends on the other examples "
        "in its batch, and a batch of one example fails.",
        "build the layer with track_running_stats=True (the default) and fill its statistics by training or "
        "with batchnorm.recompute_statistics; for outputs that never depend on the batch, GroupNorm or LayerNorm.",
    )


def _non_finite_stats(name: str, m: nn.Module) -> Finding | None:
    bad = {k: int((~torch.isfinite(t)).sum()) for k, t in _stat_tensors(m).items()}
    bad = {k: v for k, v in bad.items() if v}
    if not bad:
        return None
    c = int(getattr(m, "num_features", 0))
    what = ", ".join(f"{k}: {v} of {c}" for k, v in bad.items())
    return Finding(
        "non-finite-stats",
        name,
        f"NaN/inf in the running statistics ({what} channels): every eval-mode output of those channels is NaN.",
        "recompute them on clean data: batchnorm.recompute_statistics(model, loader) (command line: batchnorm "
        "recalibrate); find the batch that caused it with batchnorm.watch (non-finite-batch). batchnorm's layers "
        "leave such batches out of their running statistics.",
    )


def _frozen_in_train(name: str, m: nn.Module) -> Finding | None:
    if not (m.training and updates_running_stats(m) and is_frozen_affine(m)):
        return None
    return Finding(
        "frozen-in-train",
        name,
        "weight and bias do not require grad (frozen, e.g. for fine-tuning), but the layer is in training "
        "mode: each training forward still normalizes with batch statistics and moves running_mean/running_var.",
        frozen_fix(m),
    )


def frozen_fix(m: nn.Module) -> str:
    """The fix of ``frozen-in-train`` for layer ``m``: `batchnorm.freeze` where it applies."""
    keep_eval = "call .eval() on these layers after every model.train()"
    if _dataflow.is_plain_batchnorm(m) and isinstance(m, _BatchNorm):
        return f"batchnorm.freeze(model) (FrozenBatchNorm: fixed statistics in every mode), or {keep_eval}."
    return f"{keep_eval} (batchnorm.freeze leaves a {type(m).__name__} alone: it has its own forward)."


def is_frozen_affine(m: nn.Module) -> bool:
    """The layer has learnable parameters and none of them requires grad."""
    params = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]
    return bool(params) and not any(p.requires_grad for p in params)


def _stale(name: str, m: nn.Module, mo: Moments) -> Finding | None:
    n = float(mo.count)
    if n < 2:
        return None
    eps = float(cast(float, m.eps))
    pop_mean = mo.mean
    pop_var = mo.var(unbiased=True)  # running_var's convention
    rm = cast(Tensor, m.running_mean).detach().to(device=pop_mean.device, dtype=torch.float64)
    rv = cast(Tensor, m.running_var).detach().to(device=pop_mean.device, dtype=torch.float64)
    shift = (rm - pop_mean).abs() / torch.sqrt(pop_var + eps)  # in population stds (eps: dead channels)
    ratio = (rv.clamp_min(0) + eps) / (pop_var + eps)
    finite = torch.isfinite(shift) & torch.isfinite(ratio)  # non-finite running stats: non-finite-stats
    shift = torch.where(finite, shift, 0.0)
    spread = torch.where(finite, torch.maximum(ratio, 1.0 / ratio), 1.0)
    bad_mean = shift > STALE_MEAN_SHIFT
    bad_var = spread > STALE_VAR_RATIO
    k = int((bad_mean | bad_var).sum())
    if k == 0:
        return None
    cm, cv = int(shift.argmax()), int(spread.argmax())
    fix = (
        "recompute them on training data: batchnorm.recompute_statistics(model, loader) (command line: "
        "batchnorm recalibrate); always after weight averaging (SWA/EMA), pruning or fine-tuning."
    )
    if not is_recomputable(m):
        fix += f" recompute_statistics leaves this {type(m).__name__} alone: convert it to BatchNorm*d first."
    return Finding(
        "stale-statistics",
        name,
        f"on {k} of {shift.numel()} channels the running statistics are far from the population statistics of "
        f"the given batches ({n:.0f} values per channel, eval mode): the running mean is more than "
        f"{STALE_MEAN_SHIFT} population stds off on {int(bad_mean.sum())} channel(s) (worst: "
        f"{float(shift[cm]):.3g} on channel {cm}); the running/population variance ratio is outside "
        f"[{1 / STALE_VAR_RATIO:.3g}, {STALE_VAR_RATIO}] on {int(bad_var.sum())} channel(s) (worst: "
        f"{float(ratio[cv]):.3g} on channel {cv}).",
        fix,
    )


def _check_batches(batches: Any) -> Iterable[Any] | None:
    if batches is None:
        return None
    if isinstance(batches, Tensor):
        return [batches]
    if not isinstance(batches, Iterable) or isinstance(batches, Mapping):
        raise TypeError(
            "diagnose: expected batches to be None, a tensor, or an iterable of batches (a DataLoader, a list "
            f"of tensors or (input, target) tuples), got {type(batches).__name__}"
        )
    return batches


def diagnose(
    model: nn.Module, batches: Any = None, *, forward: Callable[[nn.Module, Any], Any] | None = None
) -> list[Finding]:
    """Batch-norm mistakes of ``model`` that silently cost accuracy, one `Finding` per (code, layer).

    From the model alone, for every batch norm (torch's ``_BatchNorm`` subclasses, SyncBatchNorm,
    batchnorm's layers, frozen and renorm layers):

    - ``keras-momentum``: momentum > 0.5 (PyTorch's momentum weights the new batch: 0.99 means
      the running statistics are the last batch's; probably a Keras/Flax momentum);
    - ``low-precision-stats``: running statistics stored in float16/bfloat16;
    - ``redundant-bias``: a Linear/Conv bias feeding straight into the batch norm
      (`batchnorm.find_redundant_biases`, by torch.fx dataflow);
    - ``batch-stats-at-eval``: no running statistics (``track_running_stats=False``);
    - ``non-finite-stats``: NaN/inf in the running statistics;
    - ``frozen-in-train``: weight and bias do not require grad but the layer is in training mode
      (its running statistics still move).

    With ``batches``, the model runs once over them in eval mode under ``torch.no_grad`` and each
    layer's input is reduced to population statistics per channel (float64, Chan's merge, as
    `batchnorm.recompute_statistics` does in eval mode):

    - ``stale-statistics``: on some channel ``|running_mean - mean| > 0.5 * sqrt(var + eps)``
      or ``(running_var + eps) / (var + eps)`` outside [1/1.5, 1.5], with ``mean``/``var``
      (unbiased) the population statistics of the layer's input.

    The model is not changed: nothing is written, training flags are restored and the hooks
    removed, even on error.

    Args:
        model: any module.
        batches: None, one input tensor, or an iterable of batches fed as in
            `batchnorm.recompute_statistics` (tensor, (input, target, ...) tuple, dict).
        forward: ``forward(model, batch)`` to run one batch, if the default does not fit.

    Returns:
        the findings, in module order and, per layer, in the order of `CODES`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose: expected an nn.Module, got {type(model).__name__}")
    data = _check_batches(batches)
    bns = [(name, m) for name, m in model.named_modules() if _dataflow.is_batchnorm(m)]
    if not bns:
        return []
    biases = {rb.bn: rb for rb in find_redundant_biases(model)}
    found: list[Finding | None] = []
    for name, m in bns:
        found += [
            _keras_momentum(name, m),
            _low_precision(name, m),
            _redundant_bias(name, biases.get(name), model),
            _batch_stats_at_eval(name, m),
            _non_finite_stats(name, m),
            _frozen_in_train(name, m),
        ]
    if data is not None:
        tracked = [
            (n, m)
            for n, m in bns
            if isinstance(getattr(m, "running_mean", None), Tensor)
            and isinstance(getattr(m, "running_var", None), Tensor)
        ]
        run = forward if forward is not None else _default_forward

        def run_all(mod: nn.Module, items: Iterable[Any]) -> None:
            for batch in items:
                run(mod, batch)

        moments = _sample_moments(model, tracked, data, run_all)
        found += [_stale(n, m, moments[n]) for n, m in tracked if n in moments]
    order = {name: i for i, (name, _) in enumerate(bns)}
    out = [f for f in found if f is not None]
    return sorted(out, key=lambda f: (order[f.layer], CODES.index(f.code)))
