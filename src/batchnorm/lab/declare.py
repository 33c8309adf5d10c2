"""Small pieces the experiments' declarations share, written once: the seeds of one arm trained
together under a progress bar, a measurement that moves a model's weights and puts them back,
and per-seed numbers as text for a claim's evidence."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .datasets import Dataset
from .models import MLP
from .progress import Progress
from .stacked import train_stacked
from .training import TrainResult, TrainSpec, minibatches

__all__ = ["listed", "probing", "restore_buffers", "seeded", "train_seeds"]


def seeded(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded ``seed`` (initial weights, minibatch order, masks: each draw
    has its own, so arms that share a seed share what it draws)."""
    return torch.Generator().manual_seed(seed)


def train_seeds(
    models: Sequence[MLP],
    data: Sequence[Dataset],
    seeds: Sequence[int],
    spec: TrainSpec,
    label: str,
    progress: Progress,
    *,
    order_offset: int = 2,
    checkpoints: Iterable[int] = (),
    on_checkpoint: Callable[[int, list[TrainResult]], None] | None = None,
) -> list[TrainResult]:
    """Train one arm's ``models[k]`` on ``data[k]``'s training set for every seed together
    (``stacked.train_stacked``, one arm), seed ``seeds[k]``'s minibatch order drawn from a generator
    seeded ``seeds[k] + order_offset`` (the same in every arm of a seed, so arms are paired),
    under one progress bar named ``label``."""
    with progress.task(label, total=spec.steps) as tick:
        return train_stacked(
            [models],
            [d.train_x for d in data],
            [d.train_y for d in data],
            spec,
            [minibatches(d.train_x.shape[0], spec.batch_size, seeded(s + order_offset)) for d, s in zip(data, seeds)],
            checkpoints=checkpoints,
            on_checkpoint=on_checkpoint,
            tick=tick,
        )


def listed(values: Iterable[float], fmt: str = "{:.1f}") -> str:
    """Per-seed numbers as ``"a, b, c"`` (each ``fmt.format(float(v))``), the form every claim's
    evidence uses so a reader sees the spread over seeds."""
    return ", ".join(fmt.format(float(v)) for v in values)


class restore_buffers:
    """Context manager: snapshot every buffer (BN running statistics) and restore it on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: dict[str, Tensor] = {}

    def __enter__(self) -> nn.Module:
        self.saved = {name: buf.clone() for name, buf in self.model.named_buffers()}
        return self.model

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                buf.copy_(self.saved[name])


@contextlib.contextmanager
def probing(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager for a measurement that moves the weights (a walk along the gradient, a
    step of the earlier layers): inside, the model is in training mode; on exit its parameters,
    gradients, buffers (BN running statistics) and training flags are as they were."""
    params = list(model.parameters())
    weights = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    flags = [(m, m.training) for m in model.modules()]
    try:
        with restore_buffers(model):
            model.train()
            yield model
    finally:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        for p, g in zip(params, grads):
            p.grad = g
        for m, flag in flags:
            m.training = flag
