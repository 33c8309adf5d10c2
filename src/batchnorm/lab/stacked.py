"""The lab's one training loop (docs/lab.md: "one training loop", "Divergence, one rule"): many
small networks of one architecture — several *arms* (one normalization each: BN, BN over groups,
Batch Renorm, Ghost BN, Group Norm, ...) times several seeds — trained as one batched network, so
that M members cost about as many Python-level operations as one. ``training.train`` is this loop
with a single member.

    arms = [[MLP(64, [100] * 3, 10, norm=factory_a) for seed in seeds],   # arm a, one per seed
            [MLP(64, [100] * 3, 10, norm=factory_b) for seed in seeds]]
    streams = [minibatches(x.shape[0], 60, seeded(seed + 2)) for x, seed in ...]  # one per member
    results = train_stacked(arms, xs, ys, spec, streams, checkpoints=range(0, 5001, 100),
                            on_checkpoint=record)  # record(step, results) sees the models' weights

Members are the models of all arms, arm-major (member j of arm a). Member k trains on
``(xs[k], ys[k])`` with the index batches of its own stream and ends as if trained alone by a
plain SGD loop on the ``nn.Module``, up to float rounding:

* MLP Linear: one ``torch.bmm`` / ``torch.baddbmm`` over weights (M, out, in):
  (M, B, in) -> (M, B, out).
* Conv1d: the members' kernels as ONE grouped convolution (``groups=M``) over their channels
  side by side: (B, M*in, L) -> (B, M*out, L'); member k's channels are k*out .. (k+1)*out - 1.
* Normalization: an arm's S members share one layer of S*C features (a deep copy of the first
  member's layer, parameters and buffers concatenated along the feature axis; ``nn.GroupNorm``
  gets S times the groups) on the arm's member-major columns (B, S*C[, L]). Statistics are per
  column, i.e. per member and feature, over that member's batch (or its groups); Group Norm's
  groups never straddle two members. Layers must not mix columns.
* Dropout (``dropout=p`` > 0): inverted dropout ``h * mask / (1 - p)`` after every hidden block,
  ``mask ~ Bernoulli(1 - p)`` drawn for the whole stacked activation from ``mask_generator``
  (each member its own masks, not those a single-model run would draw); none in eval mode.
* Loss: the sum of the members' mean losses; no parameter is shared, so each member gets its own
  gradient, and SGD (momentum and weight decay included) acts element-wise.
* Divergence: a member whose loss at step t is not finite stops with the weights that gave it;
  its input rows are zeroed and its slices reset after every later update (``silence``); in step
  t the merged norms of its arm refuse the whole batch (the others of the arm skip that update).
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .models import MLP, ConvNet, norm_act
from .training import Tick, TrainResult, TrainSpec

__all__ = ["StackedNet", "cross_entropy", "train_stacked"]


def _merge_norm(norms: Sequence[nn.Module]) -> nn.Module:
    """One layer of S*C features holding the S layers ``norms`` side by side (see module doc)."""
    layers: list[Any] = list(norms)
    first = layers[0]
    if isinstance(first, nn.Identity):
        return nn.Identity()
    merged: Any = copy.deepcopy(first)
    for name, _p in first.named_parameters(recurse=False):
        merged._parameters[name] = nn.Parameter(torch.cat([n._parameters[name].detach() for n in layers]).clone())
    for name, b in first.named_buffers(recurse=False):
        if b.dim() >= 1:
            merged._buffers[name] = torch.cat([n._buffers[name] for n in layers]).clone()
    if isinstance(first, nn.GroupNorm):
        merged.num_groups = first.num_groups * len(layers)
        merged.num_channels = first.num_channels * len(layers)
    elif hasattr(first, "num_features"):
        merged.num_features = int(first.num_features) * len(layers)
    else:
        raise TypeError(
            f"StackedNet: expected a batch-norm-like layer (num_features) or nn.GroupNorm, got {type(first).__name__}"
        )
    return merged


def _linear(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Every member's Linear: (M, B, in), weights (M, out, in), biases (M, out) or empty -> (M, B, out)."""
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2)) if b.numel() else torch.bmm(h, w.transpose(1, 2))


class StackedNet(nn.Module):
    """The members of several arms (lab ``MLP``s, or ``ConvNet``s on 1-D signals, all of one
    architecture, with or without biases; one normalization per arm) evaluated together, with
    inverted dropout ``dropout`` after every hidden block in training mode (masks from
    ``generator``).

    Shape: (M, B, D) -> (M, B, out), M = total members, D the flat input size.
    """

    def __init__(
        self, arms: Sequence[Sequence[nn.Module]], dropout: float = 0.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        members: list[Any] = [m for arm in arms for m in arm]
        if not arms or any(len(arm) == 0 for arm in arms):
            raise ValueError("StackedNet: expected at least one arm and at least one model per arm")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"StackedNet: expected 0 <= dropout < 1, got {dropout!r}")
        first = members[0]
        if not all(type(m) is type(first) for m in members) or type(first) not in (MLP, ConvNet):
            raise TypeError(
                f"StackedNet: expected lab MLPs or ConvNets of one kind, got {[type(m).__name__ for m in members]}"
            )
        self.conv = isinstance(first, ConvNet)
        if self.conv and len(first.input_shape) != 2:
            raise ValueError(f"StackedNet: expected a 1-D ConvNet (input (C, L)), got input_shape {first.input_shape}")
        self.input_shape = first.input_shape
        self.dropout, self.generator = float(dropout), generator
        self.sizes = [len(arm) for arm in arms]
        self.starts = [sum(self.sizes[:a]) for a in range(len(arms))]  # arm -> its first member
        self.arm_of = [(a, j) for a, size in enumerate(self.sizes) for j in range(size)]  # member -> (arm, index)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norms = nn.ModuleList()
        self.template = list(first.blocks)  # activation, placement, conv geometry (not registered: no weights)
        for i in range(len(first.blocks)):
            layers = [m.blocks[i].layer for m in members]
            self.weights.append(nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]).clone()))
            bias = [layer.bias.detach() for layer in layers if layer.bias is not None]
            self.biases.append(nn.Parameter(torch.stack(bias).clone() if bias else torch.empty(0)))  # (M, out) or empty
            self.norms.append(
                nn.ModuleList(
                    _merge_norm([m.blocks[i].norm for m in members[s : s + n]]) for s, n in zip(self.starts, self.sizes)
                )
            )
        self.head_w = nn.Parameter(torch.stack([m.head.weight.detach() for m in members]).clone())  # (M, out, width)
        self.head_b = nn.Parameter(torch.stack([m.head.bias.detach() for m in members]).clone())  # (M, out)

    def _normalize(self, i: int, h: Tensor) -> Tensor:
        """Apply layer i's arm norms to h: conv activations (B, M*C, L) as they are, MLP
        activations (M, B, C) laid out as (B, M*C) (member-major columns) and back."""
        norms = list(cast(nn.ModuleList, self.norms[i]))
        if all(isinstance(norm, nn.Identity) for norm in norms):
            return h
        c = self.weights[i].shape[1]
        flat = h if self.conv else h.transpose(0, 1).reshape(h.shape[1], -1)  # (B, M*C[, L])
        parts = [norm(flat[:, s * c : (s + n) * c]) for s, n, norm in zip(self.starts, self.sizes, norms)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out if self.conv else out.reshape(h.shape[1], h.shape[0], c).transpose(0, 1)

    def _drop(self, h: Tensor) -> Tensor:
        """Inverted dropout in training mode: ``h * mask / (1 - p)``, one mask for all of h."""
        if self.training and self.dropout > 0:
            h = h * (torch.rand(h.shape, generator=self.generator) >= self.dropout) / (1.0 - self.dropout)
        return h

    def forward(self, x: Tensor) -> Tensor:
        m, b = x.shape[0], x.shape[1]
        h = x  # MLP: (M, B, D); activations (M, B, C)
        if self.conv:  # (M, B, C*L) -> (B, M*C, L): member k's channels side by side
            h = x.reshape(m, b, *self.input_shape).transpose(0, 1).reshape(b, m * self.input_shape[0], -1)
        for i, (w, block) in enumerate(zip(self.weights, self.template)):
            if self.conv:
                bias = self.biases[i].reshape(-1) if self.biases[i].numel() else None
                # (B, M*in, L) -> (B, M*out, L'): member k's kernels on its own channels
                h = F.conv1d(h, w.flatten(0, 1), bias, block.layer.stride, block.layer.padding, groups=m)
            else:
                h = _linear(h, w, self.biases[i])  # (M, B, out)
            h = self._drop(norm_act(h, functools.partial(self._normalize, i), block.act, block.placement))
        if self.conv:
            h = h.mean(dim=2).reshape(b, m, -1).transpose(0, 1)  # (M, B, C_last)
        return _linear(h, self.head_w, self.head_b)

    def _views(self, k: int, model: Any) -> Iterator[tuple[str, Tensor, Tensor]]:
        """(name, member k's slice of the stacked tensor, ``model``'s own tensor) for every layer
        weight and bias and every norm parameter and buffer of member k (``model``)."""
        arm, j = self.arm_of[k]
        for i, block in enumerate(model.blocks):
            yield "weight", self.weights[i][k], block.layer.weight
            if block.layer.bias is not None:
                yield "bias", self.biases[i][k], block.layer.bias
            merged, c = cast(nn.ModuleList, self.norms[i])[arm], self.weights[i].shape[1]
            for name, t in [*block.norm.named_parameters(recurse=False), *block.norm.named_buffers(recurse=False)]:
                full = getattr(merged, name)
                yield name, full[j * c : (j + 1) * c] if t.dim() >= 1 else full, t  # a 0-dim buffer is shared
        yield "weight", self.head_w[k], model.head.weight
        yield "bias", self.head_b[k], model.head.bias

    @torch.no_grad()
    def copy_into(self, members: Sequence[nn.Module], which: Iterable[int]) -> None:
        """Write member k's weights and norm state into ``members[k]`` for k in ``which``."""
        for k in which:
            for _, view, t in self._views(k, members[k]):
                t.copy_(view)

    @torch.no_grad()
    def silence(self, members: Sequence[nn.Module], which: Iterable[int]) -> None:
        """Reset the slices of members ``which`` to a neutral, finite state: weights, biases and
        norm parameters 0, running means 0, running variances and stds 1."""
        for k in which:
            for name, view, t in self._views(k, members[k]):
                if t.dim() >= 1:
                    view.fill_(1.0 if name in ("running_var", "running_std") else 0.0)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Each member's mean cross-entropy: (M, B, classes), (M, B) -> (M,)."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)


def train_stacked(
    arms: Sequence[Sequence[nn.Module]],
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    spec: TrainSpec,
    streams: Sequence[Iterator[Tensor]],
    *,
    dropout: float = 0.0,
    mask_generator: torch.Generator | None = None,
    checkpoints: Iterable[int] = (),
    on_checkpoint: Callable[[int, list[TrainResult]], None] | None = None,
    stop: Callable[[int], bool] | None = None,
    tick: Tick | None = None,
    loss: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
) -> list[TrainResult]:
    """Train every member (arm-major: ``[m for arm in arms for m in arm]``, all of one
    architecture, one normalization kind per arm) on its own ``(xs[k], ys[k])``, shapes (N_k, D)
    and (N_k, ...), with the (spec.batch_size,) index batches of the endless ``streams[k]``, all
    at once with SGD (see the module docstring); the models are updated in place.

    ``on_checkpoint(step, results)`` runs after the steps in ``checkpoints`` (0 = before
    training) with the models in training mode holding their current weights (``results[k]`` is
    member k's live ``TrainResult``); then ``stop(step)`` True ends training. ``dropout`` after
    every hidden block draws its masks from ``mask_generator``; ``tick`` gets one update per
    step; ``loss`` gives each member's mean loss, (M, B, out), (M, B, ...) -> (M,).
    Returns one ``TrainResult`` per member (a diverged one stops at its first non-finite loss).
    """
    members = [m for arm in arms for m in arm]
    n = len(members)
    if not (len(xs) == len(ys) == len(streams) == n):
        raise ValueError(
            f"train_stacked: expected one x, y and stream per member ({n}), got {len(xs)}, {len(ys)}, {len(streams)}"
        )
    if dropout > 0 and mask_generator is None:
        raise ValueError("train_stacked: dropout needs a mask_generator")
    net = StackedNet(arms, dropout, mask_generator).train()
    opt = torch.optim.SGD(net.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    results = [TrainResult() for _ in range(n)]
    marks = {int(c) for c in checkpoints}
    tick = tick if tick is not None else Tick()
    stopped: list[int] = []
    for m in members:
        m.train()

    def checkpoint(step: int) -> bool:
        if step not in marks:
            return False
        net.copy_into(members, [k for k in range(n) if k not in stopped])
        if on_checkpoint is not None:
            on_checkpoint(step, results)
        return stop is not None and stop(step)

    if checkpoint(0):
        return results
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batch statistics are not finite", category=RuntimeWarning)
        for step in range(1, spec.steps + 1):
            idx = [next(stream) for stream in streams]
            if any(int(i.shape[0]) != spec.batch_size for i in idx):
                raise ValueError(
                    f"train_stacked: expected index batches of {spec.batch_size}, got {[int(i.shape[0]) for i in idx]}"
                )
            xb = torch.stack([x[i] for x, i in zip(xs, idx)])  # (M, B, D)
            yb = torch.stack([y[i] for y, i in zip(ys, idx)])  # (M, B, ...)
            if stopped:
                xb[stopped] = 0.0
            per_member = loss(net(xb), yb)  # (M,)
            newly = []
            for k, value in enumerate(per_member.detach().tolist()):
                if k not in stopped:
                    results[k].losses.append(value)
                    if not math.isfinite(value):
                        results[k].diverged, results[k].diverged_at = True, step
                        newly.append(k)
            net.copy_into(members, newly)  # the weights that gave the non-finite loss
            stopped.extend(newly)
            alive = [k for k in range(n) if k not in stopped]
            if not alive:
                break
            opt.zero_grad(set_to_none=True)
            per_member[alive].sum().backward()
            opt.step()
            net.silence(members, stopped)
            for k in alive:
                results[k].steps_done = step
            tick.update(1)
            if checkpoint(step):
                break
    net.copy_into(members, [k for k in range(n) if k not in stopped])
    return results
