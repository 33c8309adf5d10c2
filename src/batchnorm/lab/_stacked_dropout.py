"""Train the seeds of a small MLP with dropout together, with any minibatch stream per seed.

``stacked.train_stacked`` refuses dropout (its masks could not match a single-seed run) and
draws its own shuffled minibatches. For experiments whose arms need dropout, or a fixed batch
composition, this module trains S MLPs of one architecture at once in the same way (batched
matmuls, one norm layer over seed-major columns; see ``batchnorm.lab.stacked``), adding

* inverted dropout after every hidden block: ``h * mask / (1 - p)``, ``mask ~ Bernoulli(1 - p)``
  drawn for the whole (S, B, C) activation from one seeded generator, so every seed gets its
  own independent masks (not the masks a single-seed run would draw);
* ``batches[k]``: seed k's stream of index tensors of shape (B,) (e.g. ``training.minibatches``
  or a fixed partition repeated every epoch);
* ``checkpoints`` / ``on_checkpoint(step)`` with the S models holding the current weights, and
  ``stop(step) -> bool`` to end training early at a checkpoint.

The models are ordinary ``MLP``s built *without* dropout (``dropout=0``): in eval mode dropout
is the identity, so evaluating them evaluates the trained dropout networks. Plain SGD only (no
momentum, no weight decay). Divergence follows the lab's one rule (``training``): a seed whose
loss turns non-finite stops, its model keeps the weights that gave that loss, and it leaves the
loss; its slices of the stacked weights are kept neutral and finite (``StackedMLP.silence``).

Shape: the stacked forward maps (S, B, in_features) -> (S, B, classes).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .models import MLP
from .stacked import StackedMLP
from .training import Tick, TrainResult, TrainSpec, record_losses

__all__ = ["StackedDropoutMLP", "train_stacked_dropout"]


class StackedDropoutMLP(StackedMLP):
    """``StackedMLP`` with inverted dropout of probability ``p`` after every hidden block (in
    training mode; masks from ``generator``)."""

    def __init__(self, models: Sequence[MLP], p: float, generator: torch.Generator) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"StackedDropoutMLP: expected 0 <= p < 1, got {p!r}")
        super().__init__(models)
        self.p = float(p)
        self.generator = generator

    def _after_block(self, h: Tensor) -> Tensor:
        """Inverted dropout in training mode: ``h * mask / (1 - p)``, mask (S, B, C) ~ Bernoulli(1 - p)."""
        if self.training and self.p > 0:
            keep = torch.rand(h.shape, generator=self.generator) >= self.p  # (S, B, C)
            h = h * keep / (1.0 - self.p)
        return h


def train_stacked_dropout(
    models: Sequence[MLP],
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    spec: TrainSpec,
    *,
    p: float,
    batches: Sequence[Iterator[Tensor]],
    mask_generator: torch.Generator,
    checkpoints: Iterable[int] = (),
    on_checkpoint: Callable[[int], None] | None = None,
    stop: Callable[[int], bool] | None = None,
    tick: Tick | None = None,
) -> list[TrainResult]:
    """Train ``models[k]`` on ``(xs[k], ys[k])`` with the index batches ``batches[k]`` and
    dropout ``p``, all seeds at once (see the module docstring); the models are updated in place.

    Args:
        models: S lab MLPs of one architecture, built without dropout.
        xs, ys: each seed's training set, shapes (N_k, D) and (N_k,).
        spec: steps, batch size (must match the streams' batches) and lr; momentum and weight
            decay must be 0.
        p: dropout probability after every hidden block (0: none).
        batches: one endless stream of (B,) index tensors per seed.
        mask_generator: draws every dropout mask.
        checkpoints, on_checkpoint: ``on_checkpoint(step)`` after the listed steps (0 = before
            training), with the models holding their current weights.
        stop: called after each checkpoint; ``True`` ends training there.
        tick: progress sink, one update per step.

    Returns:
        One ``TrainResult`` per seed (a diverged seed stops at its first non-finite loss).
    """
    n = len(models)
    if not (len(xs) == len(ys) == len(batches) == n):
        raise ValueError(
            f"train_stacked_dropout: expected one x, y and batch stream per model ({n}), got {len(xs)}, {len(ys)}, {len(batches)}"
        )
    if spec.momentum != 0.0 or spec.weight_decay != 0.0:
        raise ValueError(
            f"train_stacked_dropout: expected plain SGD (momentum 0, weight decay 0), got {spec.momentum}, {spec.weight_decay}"
        )
    stacked = StackedDropoutMLP(models, p, mask_generator)
    opt = torch.optim.SGD(stacked.parameters(), lr=spec.lr)
    results = [TrainResult() for _ in range(n)]
    marks = {int(c) for c in checkpoints}
    tick = tick if tick is not None else Tick()
    stopped: list[int] = []
    stacked.train()

    def alive() -> list[int]:
        return [k for k in range(n) if k not in stopped]

    def checkpoint(step: int) -> bool:
        if step not in marks:
            return False
        stacked.copy_into(models, alive())
        if on_checkpoint is not None:
            on_checkpoint(step)
        return stop is not None and stop(step)

    if checkpoint(0):
        return results
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batch statistics are not finite", category=RuntimeWarning)
        for step in range(1, spec.steps + 1):
            idx = [next(stream) for stream in batches]
            if any(i.shape[0] != spec.batch_size for i in idx):
                raise ValueError(
                    f"train_stacked_dropout: expected batches of {spec.batch_size}, got {[int(i.shape[0]) for i in idx]}"
                )
            xb = torch.stack([x[i] for x, i in zip(xs, idx)])  # (S, B, D)
            yb = torch.stack([y[i] for y, i in zip(ys, idx)])  # (S, B)
            per_seed = F.cross_entropy(stacked(xb).transpose(1, 2), yb, reduction="none").mean(dim=1)  # (S,)
            newly = record_losses(results, per_seed.detach().tolist(), stopped, step)
            if newly:
                stacked.copy_into(models, newly)  # the weights that gave the non-finite loss
                stopped.extend(newly)
            running = alive()
            if not running:
                break
            opt.zero_grad(set_to_none=True)
            per_seed[running].sum().backward()
            opt.step()
            if stopped:
                stacked.silence(stopped)
            for k in running:
                results[k].steps_done = step
            tick.update(1)
            if checkpoint(step):
                break
    stacked.copy_into(models, alive())
    return results
