"""Training in the lab: the spec, seeded minibatches, full-batch evaluation, and ``train``,
one model trained with SGD by the lab's one loop (``stacked.train_stacked``, one member).

    gen = torch.Generator().manual_seed(seed)
    result = train(model, data.train_x, data.train_y, TrainSpec(steps=5000, batch_size=60, lr=0.1),
                   generator=gen, checkpoints=range(0, 5001, 250), on_checkpoint=record)
    # record(step, result) is called after steps 0, 250, ..., 5000

Conventions:
- a *step* is one SGD update on one minibatch; steps are numbered 1..steps, and checkpoint
  ``s`` is called after step ``s`` (checkpoint 0 before any update);
- minibatches are drawn without replacement from a stream of seeded permutations of the
  training set: every batch has exactly ``batch_size`` examples (batches may straddle two
  epochs), so BN always normalizes over the same m;
- divergence (docs/lab.md, "Divergence, one rule"): a non-finite loss at step t stops the run
  with the weights that gave it, ``steps_done`` t - 1 and ``losses`` ending with that value;
- the number of torch threads is never changed here (the runner may do it for a whole run).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["TrainResult", "TrainSpec", "Tick", "evaluate", "minibatches", "train", "train_mode"]


class Tick:
    """Progress sink: ``update(n)`` is called once per step. The default does nothing."""

    def update(self, n: int = 1) -> None:  # noqa: D401
        """Advance by n steps."""


@dataclass(frozen=True)
class TrainSpec:
    """How to train: SGD with a constant learning rate."""

    steps: int
    """Number of SGD updates."""
    batch_size: int
    """Minibatch size m (also BN's normalization batch)."""
    lr: float
    """SGD learning rate (constant)."""
    momentum: float = 0.0
    """SGD momentum (0: plain SGD)."""
    weight_decay: float = 0.0
    """L2 penalty added by the optimizer."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"TrainSpec: expected steps >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainSpec: expected a finite lr > 0, got {self.lr!r}")


@dataclass
class TrainResult:
    """What ``train`` did."""

    steps_done: int = 0
    """Updates actually made (< spec.steps if it diverged)."""
    diverged: bool = False
    """True if a loss became NaN/inf."""
    diverged_at: int | None = None
    """The step whose loss was not finite."""
    losses: list[float] = field(default_factory=list)
    """Training loss of every step (the minibatch loss before the update)."""


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches of exactly ``batch_size`` from seeded permutations of range(n).

    Shape: each yielded tensor is (batch_size,) int64.
    """
    if batch_size > n:
        raise ValueError(f"minibatches: batch_size {batch_size} exceeds the {n} training examples")
    pool = torch.randperm(n, generator=generator)
    pos = 0
    while True:
        if pos + batch_size <= n:
            yield pool[pos : pos + batch_size]
            pos += batch_size
        else:
            rest = pool[pos:]
            pool = torch.randperm(n, generator=generator)
            take = batch_size - rest.shape[0]
            yield torch.cat([rest, pool[:take]])
            pos = take


@contextlib.contextmanager
def train_mode(model: nn.Module, mode: bool) -> Iterator[nn.Module]:
    """Set ``model.train(mode)`` and restore every module's flag afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(mode)
    try:
        yield model
    finally:
        for module, flag in saved:
            module.training = flag


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode on (x, y), in one full batch; the
    model's training flags are restored afterwards. A non-finite output gives loss ``inf`` and
    counts as wrong."""
    with train_mode(model, False):
        logits = model(x)
    loss = float(F.cross_entropy(logits, y, reduction="sum")) / x.shape[0]
    correct = int(((logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1)).sum())
    return (loss if math.isfinite(loss) else math.inf), correct / x.shape[0]


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: TrainSpec,
    *,
    generator: torch.Generator,
    checkpoints: Iterable[int] = (),
    on_checkpoint: Callable[[int, TrainResult], None] | None = None,
    tick: Tick | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> TrainResult:
    """Train ``model`` (a lab ``MLP`` or 1-D ``ConvNet``) in place with SGD for ``spec.steps``
    minibatch steps drawn by ``generator``: ``stacked.train_stacked`` with this one member,
    ``on_checkpoint(step, result)`` seeing its live ``TrainResult``. ``loss_fn(output, target)``
    is the minibatch's mean loss.
    """
    from .stacked import train_stacked  # the loop builds on this module's types

    return train_stacked(
        [[model]],
        [x],
        [y],
        spec,
        [minibatches(x.shape[0], spec.batch_size, generator)],
        checkpoints=checkpoints,
        on_checkpoint=None if on_checkpoint is None else lambda step, results: on_checkpoint(step, results[0]),
        tick=tick,
        loss=lambda out, target: loss_fn(out[0], target[0]).reshape(1),
    )[0]
