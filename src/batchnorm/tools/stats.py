"""Streaming per-channel moments and exact population statistics for batch-norm layers.

Two layers of API:

- [`Moments`][batchnorm.Moments] — a (count, mean, M2) accumulator in float64 for tensors, merged with Chan's
  parallel formula; independent of how the data was split; one collective to merge across
  ``torch.distributed`` ranks.
- [`recompute_statistics`][batchnorm.recompute_statistics] — runs a model over a data set once and writes every batch-norm
  layer's exact population mean and *unbiased* variance into ``running_mean``/``running_var``.

Why this estimator (and not the ones other libraries use):

- ``torch.optim.swa_utils.update_bn`` averages per-batch variances. The population variance is
  ``E_B[var_B] + Var_B[mean_B]`` (law of total variance); the second term, the spread between
  batch means, is lost. On batches sorted by class that is most of the variance.
- fvcore's PreciseBN pools ``E[x^2] - E[x]^2`` in float32. For mean 1e4 and std 1e-2,
  ``E[x^2] = 1e8`` has a float32 ulp of 8, far above the variance 1e-4: it returns 0.
- Here each batch contributes its own *centred* second moment ``M2_B = sum (x - mean_B)^2``,
  computed in float64 after centring (no large numbers are squared), and batches are merged
  with Chan et al.'s pairwise update (see [`Moments.merge`][batchnorm.Moments.merge]). Both terms of the total
  variance are kept exactly; nothing cancels.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._kernels.torch_ops import merge_moments
from ..nn.renorm import BatchRenormBase
from . import _moments_cpu

__all__ = ["Moments", "all_reduce_moments", "LayerStatistics", "recompute_statistics", "is_recomputable"]

_F64 = torch.float64


@dataclass(frozen=True)
class Moments:
    """Count, mean and centred second moment (M2) of a stream of values, per channel, in float64.

        count = n,   mean = (1/n) sum x,   M2 = sum (x - mean)^2
        var(unbiased=False) = M2 / n,   var(unbiased=True) = M2 / (n - 1)

    Shape:
        ``count`` is a 0-dim float64 tensor (exact for counts below 2**53); ``mean`` and ``m2``
        have the shape of the non-reduced dims, e.g. (C,) for an (N, C, H, W) input reduced
        over dims (0, 2, 3).

    Merging two parts A and B (Chan, Golub & LeVeque 1979), with delta = mean_B - mean_A:

        n    = n_A + n_B
        mean = mean_A + delta * n_B / n
        M2   = M2_A + M2_B + delta^2 * n_A * n_B / n

    Every term is non-negative, so M2 never becomes negative and no large quantities are
    subtracted: the only subtraction, ``delta``, is of two means of the *same* variable.
    The result does not depend on the order or the grouping of the parts (up to float64
    rounding, ~1e-16 relative), hence not on the batch size or on how batches are sorted.
    """

    count: Tensor
    """Number of values per channel (0-dim float64)."""
    mean: Tensor
    """Per-channel mean (float64)."""
    m2: Tensor
    """Per-channel sum of squared deviations from ``mean`` (float64, >= 0)."""

    @classmethod
    def empty(cls, shape: int | Sequence[int], device: torch.device | str | None = None) -> Moments:
        """The moments of no data: count 0, mean 0, M2 0 (the identity of [`merge`][batchnorm.Moments.merge])."""
        size = (shape,) if isinstance(shape, int) else tuple(shape)
        zero = torch.zeros(size, dtype=_F64, device=device)
        return cls(torch.zeros((), dtype=_F64, device=device), zero, zero.clone())

    @classmethod
    def from_tensor(cls, x: Tensor, dims: int | Sequence[int]) -> Moments:
        """Moments of ``x`` reduced over ``dims`` (e.g. ``(0, 2, 3)`` for an (N, C, H, W) input).

        Computed in float64 whatever the dtype of ``x`` (float16/bfloat16/float32/float64):
        for the per-channel case (dims = all but 1) of a CPU float32/float64 tensor, one numba
        pass of float64 sums shifted by a sample (see ``_moments_cpu``; falls back below when
        the shift was an extreme outlier); otherwise a float64 copy and a two-pass (centred,
        Welford) ``torch.var_mean``. Non-finite values propagate (the caller decides).
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"Moments.from_tensor: expected a floating-point tensor, got {got}")
        given = (dims,) if isinstance(dims, int) else tuple(dims)
        bad = [d for d in given if isinstance(d, bool) or not isinstance(d, int) or not -x.dim() <= d < x.dim()]
        if bad or not given:
            raise ValueError(
                f"Moments.from_tensor: expected dims in [-{x.dim()}, {x.dim() - 1}] for an input of shape "
                f"{tuple(x.shape)}, got {dims!r}"
            )
        rdims = sorted({d % x.dim() for d in given})
        keep = [s for d, s in enumerate(x.shape) if d not in rdims]
        n = math.prod(x.shape[d] for d in rdims)
        if n == 0:
            return cls.empty(keep, device=x.device)
        if x.dim() >= 2 and rdims == [0, *range(2, x.dim())]:
            fast = _moments_cpu.shifted_sums(x)  # the per-channel case, one numba pass
            if fast is not None:
                shift, s1, s2 = fast
                m2 = (s2 - s1.square() / n).clamp_min(0.0)
                if not _moments_cpu.needs_two_pass(s1, m2, n):
                    count = torch.tensor(float(n), dtype=_F64)
                    return cls(count, shift + s1 / n, m2)
        x64 = x.detach().to(_F64)
        var, mean = torch.var_mean(x64, dim=rdims, correction=0)
        count = torch.tensor(float(n), dtype=_F64, device=x.device)
        return cls(count, mean, var * n)

    def merge(self, other: Moments) -> Moments:
        """The moments of the union of both parts (Chan's formula in the class docstring)."""
        if self.mean.shape != other.mean.shape:
            raise ValueError(
                f"Moments.merge: expected moments of the same shape, got {tuple(self.mean.shape)} "
                f"and {tuple(other.mean.shape)}"
            )
        counts = torch.stack([self.count, other.count])  # (2,)
        n, mean, m2 = merge_moments(counts, torch.stack([self.mean, other.mean]), torch.stack([self.m2, other.m2]))
        return Moments(n, mean, m2)

    __add__ = merge

    def var(self, unbiased: bool = True) -> Tensor:
        """M2 / (n - 1) (``unbiased=True``, what ``running_var`` stores) or M2 / n; float64.

        NaN where there are too few values (n <= 1 unbiased, n == 0 biased).
        """
        denom = self.count - 1.0 if unbiased else self.count
        if float(denom) <= 0:
            return torch.full_like(self.m2, math.nan)
        return (self.m2 / denom).clamp_min(0.0)

    def to_vector(self) -> Tensor:
        """Pack as one flat float64 vector ``[count, mean..., m2...]`` (for collectives)."""
        return torch.cat([self.count.reshape(1), self.mean.reshape(-1), self.m2.reshape(-1)])

    @classmethod
    def from_vector(cls, v: Tensor, shape: Sequence[int]) -> Moments:
        """Inverse of [`to_vector`][batchnorm.Moments.to_vector] for moments whose mean has ``shape``."""
        k = math.prod(shape)
        return cls(v[0].clone(), v[1 : 1 + k].reshape(shape).clone(), v[1 + k : 1 + 2 * k].reshape(shape).clone())

    def all_reduce(self, group: Any = None) -> Moments:
        """Merge these moments across all ranks of ``group``; every rank gets the same result."""
        return all_reduce_moments([self], group=group)[0]


def all_reduce_moments(parts: Sequence[Moments], group: Any = None) -> list[Moments]:
    """Merge each of several moments across the ranks of ``group`` in ONE collective.

    Every rank packs all its moments into one float64 vector ``[count, mean, M2]...``; one
    ``all_gather`` gives every rank every vector; each rank then merges them with Chan's
    formula in rank order. The computation is the same on every rank, so the results are
    bit-identical across ranks (an all-reduce of sums would be neither as stable nor, with
    some backends, reproducible). All ranks must pass moments of the same shapes, in the
    same order. Without an initialized process group this returns ``parts`` unchanged.
    """
    import torch.distributed as dist

    parts = list(parts)
    if not (dist.is_available() and dist.is_initialized()):
        return parts
    world = dist.get_world_size(group)
    if world == 1 or not parts:
        return parts
    local = torch.cat([p.to_vector() for p in parts])  # (sum_i (1 + 2 * C_i),)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    merged: list[Moments] = []
    offset = 0
    for p in parts:
        size = 1 + 2 * p.mean.numel()
        total = Moments.empty(p.mean.shape, device=p.mean.device)
        for vec in gathered:
            total = total.merge(Moments.from_vector(vec[offset : offset + size], p.mean.shape))
        merged.append(total)
        offset += size
    return merged


# ---------------------------------------------------------------------------------------------
# population statistics of a whole model


@dataclass(frozen=True)
class LayerStatistics:
    """What [`recompute_statistics`][batchnorm.recompute_statistics] did to one batch-norm layer."""

    name: str
    """Qualified module name (``""`` for the model itself)."""
    kind: str
    """Class name of the layer."""
    samples: int
    """Values per channel seen (N for (N, C) inputs, N*H*W for (N, C, H, W)), over all ranks."""
    updated: bool
    """Whether running_mean/running_var were written (False: no data, or a skipped layer)."""
    mean_change: float
    """max |new mean - old mean| / max(1, max |old mean|) over channels (0 if not updated)."""
    var_change: float
    """max |new var / old var - 1| over channels (inf where the old var was 0; 0 if not updated)."""
    note: str = ""
    """Why a layer was not updated, if it was not."""


def is_recomputable(module: nn.Module) -> bool:
    """True for batch-norm layers whose running_mean/running_var hold a mean and a variance.

    That is any ``torch.nn.modules.batchnorm._BatchNorm`` (torch's BatchNorm*d, SyncBatchNorm,
    ours, their subclasses) that tracks running statistics, unless the class declares
    ``running_var_is_variance = False`` (e.g. a layer storing a running std) or is frozen
    (``frozen = True``, as [`FrozenBatchNorm2d`][batchnorm.FrozenBatchNorm2d]).
    """
    if not isinstance(module, _BatchNorm):
        return False
    if getattr(module, "frozen", False) or not getattr(type(module), "running_var_is_variance", True):
        return False
    return isinstance(module.running_mean, Tensor) and isinstance(module.running_var, Tensor)


def _layer_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The input tensor of a batch-norm call, positional (``bn(x)``) or keyword (``bn(input=x)``).

    For forward pre-hooks registered with ``with_kwargs=True``. The keyword is the name of the
    first parameter of ``module.forward`` (``input`` for torch's and our layers); a forward
    without a named first parameter (``*args``) takes the only tensor among the keywords.
    """
    if args:
        return args[0]
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    named = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if params and params[0].kind in named and params[0].name in kwargs:
        return kwargs[params[0].name]
    tensors = [v for v in kwargs.values() if isinstance(v, Tensor)]
    if len(tensors) == 1:
        return tensors[0]
    raise TypeError(
        f"{type(module).__name__}: expected the input as the first positional argument or as the keyword "
        f"of forward's first parameter, got positional {len(args)} and keywords {sorted(kwargs)}"
    )


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """Tensor -> model(x); (input, target, ...) tuple/list -> model(input); dict -> model(**batch)."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(
        f"recompute_statistics: cannot feed a batch of type {type(batch).__name__} to the model; "
        "pass forward=lambda model, batch: model(...)"
    )


def _batch_size(batch: Any) -> int | None:
    """The leading dim of the first tensor found in ``batch`` (None if there is none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            n = _batch_size(item)
            if n is not None:
                return n
    return None


def _truncate(batch: Any, n: int, size: int) -> Any:
    """``batch`` with every tensor whose leading dim is ``size`` cut to its first ``n`` rows."""
    if isinstance(batch, Tensor):
        return batch[:n] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return type(batch)((k, _truncate(v, n, size)) for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        items = [_truncate(v, n, size) for v in batch]
        if hasattr(batch, "_fields"):  # a namedtuple takes its fields as arguments
            return type(batch)(*items)
        return type(batch)(items)
    return batch


def _change(new_mean: Tensor, new_var: Tensor, old_mean: Tensor, old_var: Tensor) -> tuple[float, float]:
    """(max relative change of the mean, max relative change of the variance), in float64."""
    om = old_mean.to(_F64)
    ov = old_var.to(_F64)
    dm = float((new_mean - om).abs().max()) / max(1.0, float(om.abs().max()))
    with torch.no_grad():
        ratio = torch.where(ov > 0, new_var / ov.clamp_min(1e-300) - 1.0, torch.where(new_var == ov, 0.0, math.inf))
    return dm, float(ratio.abs().max())


def recompute_statistics(
    model: nn.Module,
    data: Iterable[Any],
    *,
    max_samples: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    mode: Literal["eval", "train"] = "eval",
    passes: int = 1,
) -> list[LayerStatistics]:
    """Set every batch-norm layer's running statistics to the exact population statistics of ``data``.

        running_mean = (1/n) sum_i x_i,   running_var = 1/(n-1) sum_i (x_i - running_mean)^2

    per channel over all n values the layer sees (unbiased variance: our convention and
    PyTorch's, so checkpoints stay interchangeable). The input of each layer is captured with a
    forward pre-hook and reduced to float64 (count, mean, M2), merged across batches with
    Chan's formula ([`Moments`][batchnorm.Moments]), so the result does not depend on how ``data`` is split
    into batches or ordered, and large means with a small spread do not cancel.

    Which network produces layer k's input? Ioffe & Szegedy's Algorithm 2 wants the statistics
    of the *inference* network: layer k sees the output of earlier layers in inference mode.

    - ``mode="eval"`` (default): the model runs in eval mode (dropout off, batch norm with its
      running statistics), so layer k's statistics are exact for the inference network given
      the earlier layers *as they currently are*, and they are exactly independent of batch
      size and order (every sample passes through the same fixed function). With
      ``passes=p`` the statistics are written after each pass and the next pass uses them, so
      after p passes every layer with at most p-1 batch-norm layers upstream holds the exact
      statistics of the final inference network (``passes`` = the BN depth + 1 makes all exact).
      Use one pass to recalibrate a model whose statistics are roughly right.
    - ``mode="train"``: batch-norm layers normalize with their batch statistics during the pass
      (what ``update_bn`` and PreciseBN do; useful after weight averaging, when the running
      statistics are meaningless), other modules stay in eval mode. Layer k's statistics are
      then exact for *that* network, which depends on the batch composition beyond the first
      batch-norm layer. torch's SyncBatchNorm cannot run this mode on CPU.

    Running statistics are only written after the whole pass succeeded (and, under
    ``torch.distributed``, after merging the moments of all ranks in one collective, so that
    every rank ends with identical statistics). Training flags, ``track_running_stats`` and the
    hooks are restored even on error; on error the running statistics are left as they were.
    ``num_batches_tracked`` and ``momentum`` are not changed. Under ``torch.distributed`` every
    rank must call this with the same model (as for any collective, an error on one rank leaves
    the others waiting).

    Args:
        model: any module containing batch-norm layers (ours, torch's, subclasses, SyncBatchNorm);
            frozen layers and layers without running statistics are reported, not changed.
        data: an iterable of batches (a DataLoader, a list of tensors, ...); re-iterable if
            ``passes > 1``.
        max_samples: stop after this many samples (leading dim of the first tensor of a batch;
            per rank), cutting the last batch so exactly ``max_samples`` are used.
        forward: ``forward(model, batch)`` runs one batch; default: a tensor ``x`` -> ``model(x)``,
            a tuple/list ``(x, y, ...)`` -> ``model(x)``, a dict -> ``model(**batch)``.
        mode: ``"eval"`` or ``"train"``, see above.
        passes: number of passes over ``data`` (>= 1).

    Returns:
        one [`LayerStatistics`][batchnorm.LayerStatistics] per batch-norm layer, in module order.

    Raises:
        ValueError: a layer's statistics are not finite (NaN/inf in the data), nothing is written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recompute_statistics: expected an nn.Module, got {type(model).__name__}")
    if mode not in ("eval", "train"):
        raise ValueError(f"recompute_statistics: expected mode 'eval' or 'train', got {mode!r}")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"recompute_statistics: expected passes to be an int >= 1, got {passes!r}")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(
            f"recompute_statistics: expected max_samples to be a positive int or None, got {max_samples!r}"
        )
    if not isinstance(data, Iterable) or isinstance(data, (Tensor, Mapping)):
        raise TypeError(
            "recompute_statistics: expected data to be an iterable of batches (a DataLoader, a list "
            f"of tensors, ...), got {type(data).__name__}; for a single tensor pass [x] or x.split(batch_size)"
        )
    if passes > 1 and isinstance(data, Iterator):
        raise ValueError(
            "recompute_statistics: passes > 1 needs re-iterable data (a list or DataLoader), got an iterator"
        )
    run = forward if forward is not None else _default_forward

    named = list(model.named_modules())
    layers = [(name, m) for name, m in named if is_recomputable(m)]
    others = [
        (name, m)
        for name, m in named
        if (isinstance(m, (_BatchNorm, BatchRenormBase)) or getattr(m, "frozen", False)) and not is_recomputable(m)
    ]
    originals = {name: (m.running_mean.detach().clone(), m.running_var.detach().clone()) for name, m in layers}
    flags = [(m, m.training) for _, m in named]
    tracking = [(m, m.track_running_stats) for _, m in layers]
    handles: list[Any] = []
    committed = False
    final: dict[str, Moments] = {}
    try:
        for _, m in named:  # flags set directly: exported programs' modules refuse .eval()
            m.training = False
        if mode == "train":
            for _, m in layers:
                m.training = True
                m.track_running_stats = False  # batch statistics, and no running-stat update
        for _ in range(passes):
            acc = {name: Moments.empty(m.num_features, device=m.running_mean.device) for name, m in layers}

            def make_hook(name: str) -> Callable[..., None]:
                def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                    x = _layer_input(module, args, kwargs)  # bn(x) and bn(input=x) alike
                    # (N, C, *) -> per-channel moments over N and the spatial dims
                    acc[name] = acc[name].merge(Moments.from_tensor(x, [0, *range(2, x.dim())]))  # noqa: B023 - hooks live for this pass only

                return hook

            handles = [m.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, m in layers]
            seen = 0
            with torch.no_grad():
                for batch in data:
                    if max_samples is not None:
                        size = _batch_size(batch)
                        if size is not None and seen + size > max_samples:
                            batch = _truncate(batch, max_samples - seen, size)
                            size = max_samples - seen
                        seen += size or 0
                    run(model, batch)
                    if max_samples is not None and seen >= max_samples:
                        break
            for h in handles:
                h.remove()
            handles = []
            merged = all_reduce_moments([acc[name] for name, _ in layers])
            final = dict(zip([name for name, _ in layers], merged))
            bad = [
                name or "<model>"
                for name, mo in final.items()
                if not (torch.isfinite(mo.mean).all() and torch.isfinite(mo.m2).all())
            ]
            if bad:
                raise ValueError(
                    f"recompute_statistics: statistics of {', '.join(bad)} are not finite (NaN/inf in the "
                    "data or upstream); running statistics left unchanged"
                )
            with torch.no_grad():
                for name, m in layers:
                    mo = final[name]
                    if float(mo.count) >= 2:
                        m.running_mean.copy_(mo.mean.to(m.running_mean.dtype))
                        m.running_var.copy_(mo.var(unbiased=True).to(m.running_var.dtype))
        committed = True
    finally:
        for h in handles:
            h.remove()
        for m, t in tracking:
            m.track_running_stats = t
        for m, was_training in flags:
            m.training = was_training
        if not committed:
            with torch.no_grad():
                for name, m in layers:
                    m.running_mean.copy_(originals[name][0])
                    m.running_var.copy_(originals[name][1])

    report: list[LayerStatistics] = []
    starved: list[str] = []
    skipped = {name: m for name, m in others}
    for name, m in named:
        if name in skipped:
            if getattr(m, "frozen", False):
                why = "frozen"
            elif isinstance(m, BatchRenormBase):
                why = "batch renorm keeps a running std, not a variance"
            else:
                why = "no running statistics of mean/variance"
            report.append(LayerStatistics(name, type(m).__name__, 0, False, 0.0, 0.0, why))
        elif name in final:
            mo = final[name]
            n = int(mo.count)
            if n < 2:
                starved.append(name or "<model>")
                report.append(
                    LayerStatistics(name, type(m).__name__, n, False, 0.0, 0.0, "fewer than 2 values per channel")
                )
                continue
            dm, dv = _change(mo.mean, mo.var(unbiased=True), *originals[name])
            report.append(LayerStatistics(name, type(m).__name__, n, True, dm, dv))
    if starved:
        warnings.warn(
            f"recompute_statistics: {', '.join(starved)} saw fewer than 2 values per channel; "
            "their running statistics were left unchanged",
            RuntimeWarning,
            stacklevel=2,
        )
    return report
