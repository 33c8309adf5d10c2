"""``watch``: batch-norm mistakes in what a block of code does (training steps, evaluation).

One forward pre-hook per batch-norm layer tallies each training-mode forward in Python; nothing
is read back from the device during the block, so a training step costs a few Python operations
more per layer (``python -m benchmarks.doctor_watch`` measures it).

How each code is detected:

- ``small-batch``: the input's leading dim N (times the number of processes for a
  SyncBatchNorm under torch.distributed) is below 16. Batch renorm, a remedy for small batches,
  is not reported. For ghost batch norm N is the whole batch, which its running statistics use.
- ``train-mode-under-no-grad``: ``torch.is_grad_enabled()`` is false (``torch.no_grad``, or
  ``torch.inference_mode``) in a forward that updates running statistics. The first forward of
  a reentrant ``torch.utils.checkpoint`` runs under no_grad by design and is recognised by its
  frame (its recomputation is ``updated-in-backward``).
- ``updated-in-backward``: a training forward runs while autograd's engine executes a backward
  pass (``torch._C._current_graph_task_id() != -1``, the test torch's own checkpoint and
  ``register_multi_grad_hook`` use): activation checkpointing recomputing the forward. It is
  reported only when the recomputation did write the statistics (``num_batches_tracked``
  moved), which non-reentrant checkpointing can stop short of for batchnorm's layers.
- ``non-finite-batch``: batchnorm's layers count the training batches whose statistics were not
  finite (``num_batches_skipped``, read when the block ends). Other layers write such a batch
  into their running statistics, which stay NaN/inf from then on: finite statistics at the
  start that are not finite at the end mean at least one such batch (no cost per forward). A
  layer that does not update its statistics (or whose statistics were already not finite) has
  the sum of its input checked at each training forward, in float32 (float64 for float64
  input): NaN/inf in the input, the cause in practice.
- ``frozen-in-train``: a forward that updates running statistics while the layer's weight and
  bias do not require grad.
"""

from __future__ import annotations

import math
import sys
from types import CodeType, TracebackType
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import SyncBatchNorm as TorchSyncBatchNorm

from ...nn.renorm import BatchRenormBase
from ...nn.sync import SyncBatchNorm
from .. import _dataflow
from ..stats import _layer_input
from ._diagnose import frozen_fix
from ._finding import CODES, SMALL_BATCH, Finding, updates_running_stats

__all__ = ["Watch", "watch"]

_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def _in_backward() -> bool:
    """Whether autograd's engine is executing a backward pass in this thread."""
    if _graph_task_id is not None:
        return bool(_graph_task_id() != -1)
    return torch._C._current_autograd_node() is not None  # older spelling of the same question


def _checkpoint_codes() -> frozenset[CodeType]:
    from torch.utils.checkpoint import CheckpointFunction

    return frozenset({CheckpointFunction.forward.__code__})


def _in_reentrant_checkpoint_forward() -> bool:
    """Whether a caller's frame is reentrant ``torch.utils.checkpoint``'s forward (which runs under no_grad)."""
    codes = _checkpoint_codes()
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _world_size(m: nn.Module) -> int:
    """Processes a SyncBatchNorm's statistics span under torch.distributed (1 for other layers)."""
    if not isinstance(m, (TorchSyncBatchNorm, SyncBatchNorm)):
        return 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(getattr(m, "process_group", None)))


def _finite_stats(m: nn.Module) -> bool:
    """running_mean and running_var hold no NaN/inf."""
    return all(bool(torch.isfinite(getattr(m, k)).all()) for k in ("running_mean", "running_var"))


class _Tally:
    """What the forwards of one batch-norm layer did during a watch; its hook is `hook`."""

    def __init__(self, name: str, m: nn.Module) -> None:
        self.name = name
        self.module = m
        self.world = _world_size(m)
        self.check_small = not isinstance(m, BatchRenormBase)
        self.params = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]
        # non-finite batches: batchnorm's layers count them ("counter"); a layer that writes them into
        # its finite running statistics shows them there when the block ends ("stats", no cost per
        # forward, at least one); otherwise the input's sum is checked at every training forward
        skipped = getattr(m, "num_batches_skipped", None)
        self.skipped_start = skipped.detach().clone() if isinstance(skipped, Tensor) else None
        self.stats_start = self.skipped_start is None and updates_running_stats(m) and _finite_stats(m)
        self.check_input = self.skipped_start is None and not self.stats_start
        self.forwards = 0
        self.small = 0
        self.smallest = math.inf
        self.no_grad = 0
        self.inference = 0
        self.recomputed = 0
        self.updated_in_backward = 0
        self.frozen = 0
        self.bad_host = 0
        self.bad_device: Tensor | None = None
        self.pending: Tensor | None = None

    def hook(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not m.training:
            return
        if self.pending is not None:
            self.resolve()
        if _in_backward():  # recomputation (activation checkpointing): judged at the next forward / exit
            self.recomputed += 1
            if updates_running_stats(m):
                self.pending = self._marker()
            return
        x = args[0] if args else _layer_input(m, args, kwargs)
        self.forwards += 1
        n = int(x.shape[0]) * self.world if x.dim() else 0
        if 0 < n < SMALL_BATCH and self.check_small:
            self.small += 1
            self.smallest = min(self.smallest, n)
        if not torch.is_grad_enabled() and updates_running_stats(m) and not _in_reentrant_checkpoint_forward():
            if torch.is_inference_mode_enabled():
                self.inference += 1
            else:
                self.no_grad += 1
        for p in self.params:
            if p.requires_grad:
                break
        else:
            if self.params and updates_running_stats(m):
                self.frozen += 1
        if self.check_input and x.numel():
            s = x.detach().sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            if s.device.type == "cpu":
                self.bad_host += not math.isfinite(float(s))
            else:  # no host sync: counted on the device, read when the block ends
                if self.bad_device is None:
                    self.bad_device = torch.zeros((), dtype=torch.long, device=s.device)
                self.bad_device.add_(torch.isfinite(s).logical_not())

    def _marker(self) -> Tensor:
        """What a running-statistics update changes: num_batches_tracked (running_mean if absent)."""
        nbt = getattr(self.module, "num_batches_tracked", None)
        ref = nbt if isinstance(nbt, Tensor) else self.module.running_mean
        return cast(Tensor, ref).detach().clone()

    def resolve(self) -> None:
        """Did the recomputation since the marker write the running statistics?"""
        if self.pending is not None and not torch.equal(self._marker(), self.pending):
            self.updated_in_backward += 1
        self.pending = None

    def nonfinite(self) -> tuple[int, str]:
        """(number of non-finite training batches, "" or "at least " when only the first one is visible)."""
        skipped = getattr(self.module, "num_batches_skipped", None)
        if self.skipped_start is not None and isinstance(skipped, Tensor):
            return max(0, int(skipped) - int(self.skipped_start)), ""
        if self.stats_start:
            return (0 if _finite_stats(self.module) else 1), "at least "
        return self.bad_host + (int(self.bad_device) if self.bad_device is not None else 0), ""

    def findings(self) -> list[Finding]:
        self.resolve()
        out: list[Finding] = []
        of = f"of {self.forwards} training forward(s)"
        if self.small:
            where = f" over {self.world} processes" if self.world > 1 else ""
            out.append(
                Finding(
                    "small-batch",
                    self.name,
                    f"{self.small} {of} had fewer than {SMALL_BATCH} examples{where} (smallest: {self.smallest}): "
                    "statistics of so few examples are noisy, so training normalizes unlike inference and the "
                    "running statistics follow the noise.",
                    f"train with batches of {SMALL_BATCH} or more (DataLoader(drop_last=True) drops a small last "
                    "batch); where memory forbids: batchnorm.BatchRenorm*d, batchnorm.SyncBatchNorm across "
                    "processes, GroupNorm, or batchnorm.freeze to keep trusted statistics while fine-tuning.",
                )
            )
        if self.no_grad or self.inference:
            under = " and ".join(
                f"{k} under {what}"
                for k, what in ((self.no_grad, "torch.no_grad"), (self.inference, "inference_mode"))
                if k
            )
            out.append(
                Finding(
                    "train-mode-under-no-grad",
                    self.name,
                    f"{self.no_grad + self.inference} {of} ran without gradients ({under}): in training mode the "
                    "layer normalized with batch statistics and wrote them into its running statistics. Usually an "
                    "evaluation that forgot model.eval(): its outputs depend on the batch and the evaluation data "
                    "leaked into the running statistics.",
                    "call model.eval() before evaluating and model.train() after; to re-estimate statistics "
                    "without training use batchnorm.recompute_statistics.",
                )
            )
        if self.updated_in_backward:
            out.append(
                Finding(
                    "updated-in-backward",
                    self.name,
                    f"the running statistics were updated {self.updated_in_backward} time(s) during backward passes "
                    f"({self.recomputed} forward(s) recomputed there, against {self.forwards} ordinary training "
                    "forward(s)): activation checkpointing re-runs the forward in backward, so each step moves "
                    "running_mean/running_var and num_batches_tracked twice (momentum effectively doubled).",
                    "keep batch norm outside checkpointed segments, or pass checkpoint(..., use_reentrant=False) a "
                    "context_fn whose recomputation context saves the running statistics and num_batches_tracked "
                    "and restores them on exit (an example is in the doctor's documentation).",
                )
            )
        bad, at_least = self.nonfinite()
        if bad:
            ours = self.skipped_start is not None
            effect = (
                "this layer left them out of its running statistics (num_batches_skipped)"
                if ours
                else "this layer wrote them into running_mean/running_var (NaN/inf from then on)"
            )
            out.append(
                Finding(
                    "non-finite-batch",
                    self.name,
                    f"{at_least}{bad} {of} saw a batch whose statistics are not finite (NaN/inf in the layer's "
                    f"input); {effect}.",
                    "find where the NaN/inf comes from (learning rate, loss scaling, data; "
                    "torch.autograd.detect_anomaly); then repair the running statistics with "
                    "batchnorm.recompute_statistics (batchnorm's layers skip such batches).",
                )
            )
        if self.frozen:
            out.append(
                Finding(
                    "frozen-in-train",
                    self.name,
                    f"{self.frozen} {of} ran in training mode with weight and bias not requiring grad (frozen, "
                    "e.g. for fine-tuning): they normalized with batch statistics and moved running_mean/running_var.",
                    frozen_fix(self.module),
                )
            )
        return sorted(out, key=lambda f: CODES.index(f.code))


class Watch:
    """The context manager `watch` returns; ``findings`` is filled when the block ends."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self.findings: list[Finding] = []
        """The findings of the last block (empty until it ends), in module order then `CODES` order."""
        self._tallies: list[_Tally] = []
        self._handles: list[Any] = []

    def __enter__(self) -> Watch:
        if self._handles:
            raise RuntimeError("watch: this watch is already active; nest a new batchnorm.watch(model) instead")
        self.findings = []
        self._tallies = [
            _Tally(name, m)
            for name, m in self.model.named_modules()
            if _dataflow.is_batchnorm(m) and not getattr(m, "frozen", False)
        ]
        try:
            for t in self._tallies:
                self._handles.append(t.module.register_forward_pre_hook(t.hook, with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._remove()
        finally:
            self.findings = [f for t in self._tallies for f in t.findings()]
            self._tallies = []


def watch(model: nn.Module) -> Watch:
    """Watch what a block of code does to ``model``'s batch-norm layers; ``w.findings`` after it.

        with batchnorm.watch(model) as w:
            for x, y in loader:                 # training steps, evaluation, ...
                ...
        for finding in w.findings:
            print(finding)

    Reports, one `Finding` per (code, layer) with counts:

    - ``small-batch``: training forwards with fewer than 16 examples;
    - ``train-mode-under-no-grad``: training-mode forwards that update running statistics under
      ``torch.no_grad``/``torch.inference_mode`` (an evaluation without ``model.eval()``);
    - ``updated-in-backward``: running statistics updated during a backward pass (activation
      checkpointing recomputes the forward: reentrant and non-reentrant);
    - ``non-finite-batch``: training batches whose statistics are not finite;
    - ``frozen-in-train``: training forwards of a layer whose weight and bias do not require grad.

    Works on every batch norm (torch's ``_BatchNorm`` and subclasses, SyncBatchNorm, batchnorm's
    layers; frozen layers are skipped: they never update). Eval-mode forwards cost one attribute
    read; nothing is read back from the device before the block ends. The model is not changed:
    the hooks are removed when the block ends, also on an exception. Detection details are in
    `batchnorm.tools.doctor._watch`.
    """
    return Watch(model)
