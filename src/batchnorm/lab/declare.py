"""Small pieces the experiments' declarations share, written once: the seeds of one arm trained
together under a progress bar, an MLP sized for a data set, a measurement that moves a model's
weights and puts them back (with the gradients it steps along), the inputs of a network's
activations, and non-i.i.d. minibatches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .datasets import Dataset
from .models import MLP, blocks
from .progress import Progress
from .stacked import train_stacked
from .training import TrainResult, TrainSpec, minibatches

__all__ = [
    "activation_inputs",
    "batch_stats_accuracy",
    "columns",
    "mlp_for",
    "non_iid_batches",
    "gradients",
    "probing",
    "seeded",
    "step_from",
    "train_seeds",
]


def seeded(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded ``seed`` (initial weights, minibatch order, masks: each draw
    has its own, so arms that share a seed share what it draws)."""
    return torch.Generator().manual_seed(seed)


def mlp_for(data: Dataset, hidden: Sequence[int], **options: Any) -> MLP:
    """``MLP(data.features, hidden, data.classes, **options)``: an MLP sized for ``data``."""
    return MLP(data.features, list(hidden), data.classes, **options)


def train_seeds(
    models: Sequence[MLP],
    data: Sequence[Dataset],
    seeds: Sequence[int],
    spec: TrainSpec,
    label: str,
    progress: Progress,
    *,
    order_offset: int = 2,
    batches: Callable[[int, int, torch.Generator], Iterator[Tensor]] = minibatches,
    **options: Any,
) -> list[TrainResult]:
    """Train one arm's ``models[k]`` on ``data[k]``'s training set for every seed together
    (``stacked.train_stacked`` with ``options``), seed k's batches drawn by ``batches`` from a
    generator seeded ``seeds[k] + order_offset`` (the same in every arm: arms are paired)."""
    with progress.task(label, total=spec.steps) as tick:
        return train_stacked(
            [models],
            [d.train_x for d in data],
            [d.train_y for d in data],
            spec,
            [batches(d.train_x.shape[0], spec.batch_size, seeded(s + order_offset)) for d, s in zip(data, seeds)],
            tick=tick,
            **options,
        )


@contextlib.contextmanager
def probing(model: nn.Module) -> Iterator[dict[Tensor, Tensor]]:
    """For a measurement that moves the weights: inside, the model is in training mode and the
    yield is ``{parameter: its value on entry}``; on exit parameters, gradients, buffers (BN
    running statistics) and training flags are as they were."""
    params, buffers = list(model.parameters()), list(model.buffers())
    weights, saved = [p.detach().clone() for p in params], [b.clone() for b in buffers]
    grads = [p.grad for p in params]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        yield dict(zip(params, weights))
    finally:
        with torch.no_grad():
            for p, w in zip(params + buffers, weights + saved):
                p.copy_(w)
        for p, g in zip(params, grads):
            p.grad = g
        for m, flag in flags:
            m.training = flag


def gradients(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: Any = F.cross_entropy
) -> tuple[float, dict[Tensor, Tensor]]:
    """The loss on (x, y) and a copy of its gradient w.r.t. each parameter (``{parameter:
    gradient}``, zeros where it has none)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    grads: dict[Tensor, Tensor] = {
        p: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()
    }
    return float(loss.detach()), grads


def step_from(params: Iterable[Tensor], start: dict[Tensor, Tensor], grads: dict[Tensor, Tensor], lr: float) -> None:
    """In place, without autograd: each of ``params`` becomes ``w - lr * g`` (``w``: its value in
    ``start``, as ``probing`` yields it; ``g``: its gradient in ``grads``)."""
    with torch.no_grad():
        for p in params:
            p.copy_(start[p] - lr * grads[p])


def non_iid_batches(
    y: Tensor, classes: int, generator: torch.Generator, batch: int = 32, group: int = 4, per_class: int = 2
) -> Iterator[Tensor]:
    """Endless index batches of ``batch`` made of groups of ``group`` examples, each group holding
    ``group // per_class`` distinct random classes with ``per_class`` random examples of each.

    Shape: each yielded tensor is (batch,) int64; group g is entries g*group .. g*group + group - 1.
    """
    by_class = [torch.nonzero(y == c).flatten() for c in range(classes)]
    by_class = [idx for idx in by_class if idx.numel() > 0]
    k = group // per_class
    while True:
        parts = []
        for _ in range(batch // group):
            chosen = torch.randperm(len(by_class), generator=generator)[:k]
            for c in chosen.tolist():
                pool = by_class[c]
                parts.append(pool[torch.randint(pool.numel(), (per_class,), generator=generator)])
        yield torch.cat(parts)


@torch.no_grad()
def activation_inputs(
    model: nn.Module,
    x: Tensor,
    *,
    batch: int | None = None,
    layers: Sequence[int] | None = None,
    at: str = "act",
) -> list[Tensor]:
    """The input of submodule ``at`` (default the activation) of hidden blocks ``layers`` (0-based;
    default all) over ``x``: in eval mode in one pass, or, with ``batch``, in training mode on
    each full ``batch``-sized slice (under ``probing``).

    Shape: x (N, D) -> one (N', width) per layer, N' = N, or batch * (N // batch) with ``batch``.
    """
    hidden = list(blocks(model))
    chosen = range(len(hidden)) if layers is None else layers
    captured: list[list[Tensor]] = [[] for _ in chosen]
    hooked = [hidden[i].get_submodule(at) for i in chosen]
    handles = [
        m.register_forward_pre_hook(lambda _m, inp, out=out: out.append(inp[0].detach().clone()))
        for m, out in zip(hooked, captured)
    ]
    try:
        with probing(model):
            if batch is None:
                model.eval()
                model(x)
            else:
                for start in range(0, x.shape[0] - batch + 1, batch):
                    model(x[start : start + batch])
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(parts) for parts in captured]


def columns(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[float]]:
    """One column per key of per-seed mappings: ``{key: [float(row[key]) for row in rows]}``, in
    the first row's key order, text values (words for the evidence) left out."""
    rows = list(rows)
    return {key: [float(row[key]) for row in rows] for key, v in rows[0].items() if not isinstance(v, str)}


@torch.no_grad()
def batch_stats_accuracy(model: nn.Module, x: Tensor, y: Tensor, size: int, orders: Iterable[Tensor] = ()) -> float:
    """Accuracy when BN normalizes each batch of ``size`` by its own statistics (under ``probing``):
    consecutive slices of ``x``, or of each permutation in ``orders``; a tail that fills no batch
    is left out.

    Shape: x (N, ...), y (N,); each order (N,) int64.
    """
    correct = total = 0
    with probing(model):
        for order in list(orders) or [torch.arange(x.shape[0])]:
            for idx in order[: (x.shape[0] // size) * size].split(size):
                correct += int((model(x[idx]).argmax(dim=1) == y[idx]).sum())
                total += size
    return correct / max(total, 1)
