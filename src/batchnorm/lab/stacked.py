"""Train the seeds of a small MLP together: one batched network whose every layer holds S
independent copies, so S seeds cost about as many Python-level operations as one.

    models = [MLP(D, [100] * 3, 10, act="sigmoid", norm="bn", init_std=0.1,
                  generator=torch.Generator().manual_seed(s)) for s in seeds]
    results = train_stacked(models, [d.train_x for d in data], [d.train_y for d in data], spec,
                            generators=[torch.Generator().manual_seed(s + 2) for s in seeds],
                            checkpoints=range(0, 5001, 100), on_checkpoint=record)

The result is the same as ``training.train`` run on each model alone with its own generator
(same initial weights, same minibatches, same SGD updates; up to float rounding):

* Linear: ``h[s] = x[s] @ W[s]^T + b[s]`` as one ``torch.baddbmm`` over weights (S, out, in);
  shape (S, B, in) -> (S, B, out).
* BatchNorm over the batch, separately for every seed and feature: (S, B, C) is laid out as
  (B, S*C) (seed-major columns) and passed to one norm layer of S*C features of the models'
  own class, eps and momentum; per-column statistics are exactly per-seed statistics.
* Loss: the sum over seeds of each seed's mean cross-entropy; the seeds share no parameter,
  so each seed's gradient is its own loss's gradient, and SGD (momentum, weight decay
  included) acts element-wise.
* A seed whose loss becomes non-finite stops as ``train`` stops it (the lab's one divergence
  rule, see ``training``): its model keeps the weights that gave that loss, it leaves the loss,
  and its slices are set to a neutral finite state after every later step (``silence``) so
  that the merged norm layers keep updating the other seeds' running statistics. In the step
  where a seed diverges its non-finite batch is refused by the merged layer as a whole, so the
  other seeds skip that one running-statistics update.

Checkpoints copy the stacked weights back into the S models before ``on_checkpoint(step,
results)`` runs, so evaluation uses the ordinary models. Dropout is not supported (its masks
could not match a single-seed run); a model with dropout raises ValueError.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .models import MLP, Block
from .training import Tick, TrainResult, TrainSpec, minibatches, record_losses

__all__ = ["StackedMLP", "train_stacked"]


def _blocks(model: MLP) -> list[Block]:
    """The hidden blocks of ``model``."""
    return [cast(Block, b) for b in model.blocks]


def _linear(block: Block) -> nn.Linear:
    """The block's Linear layer (TypeError for any other layer)."""
    if not isinstance(block.layer, nn.Linear):
        raise TypeError(f"StackedMLP: expected Linear layers, got {type(block.layer).__name__}")
    return block.layer


class StackedMLP(nn.Module):
    """S copies of one ``MLP`` architecture with their own weights, evaluated together.

    Shape: (S, B, in_features) -> (S, B, classes).
    """

    def __init__(self, models: Sequence[MLP]) -> None:
        super().__init__()
        if not models:
            raise ValueError("StackedMLP: expected at least one model, got none")
        if not all(isinstance(m, MLP) for m in models):
            raise TypeError(f"StackedMLP: expected lab MLPs, got {[type(m).__name__ for m in models]}")
        first = models[0]
        self.seeds = len(models)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norms = nn.ModuleList()
        self.acts = nn.ModuleList()
        self.placements: list[str] = []
        self.has_bias: list[bool] = []
        self._norm_features: list[int] = []
        for i, block in enumerate(_blocks(first)):
            if not isinstance(block.drop, nn.Identity):
                raise ValueError("StackedMLP: dropout is not supported (its masks cannot match a single-seed run)")
            layers = [_linear(_blocks(m)[i]) for m in models]
            self.weights.append(
                nn.Parameter(torch.stack([lin.weight.detach() for lin in layers]).clone())
            )  # (S, out, in)
            biases = [lin.bias for lin in layers]
            self.has_bias.append(biases[0] is not None)
            self.biases.append(
                nn.Parameter(torch.stack([b.detach() for b in biases if b is not None]).clone())
                if biases[0] is not None
                else nn.Parameter(torch.empty(0))
            )
            self.norms.append(self._stack_norm([_blocks(m)[i].norm for m in models]))
            self.acts.append(block.act)
            self.placements.append(block.placement)
        self.head_w = nn.Parameter(torch.stack([m.head.weight.detach() for m in models]).clone())  # (S, classes, width)
        self.head_b = nn.Parameter(torch.stack([m.head.bias.detach() for m in models]).clone())  # (S, classes)

    def _stack_norm(self, norms: Sequence[nn.Module]) -> nn.Module:
        first: Any = norms[0]
        if isinstance(first, nn.Identity):
            self._norm_features.append(0)
            return nn.Identity()
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            if not hasattr(first, attr):
                raise TypeError(f"StackedMLP: expected a BatchNorm-like norm with {attr}, got {type(first).__name__}")
        c = int(first.num_features)
        self._norm_features.append(c)
        stacked = type(first)(
            self.seeds * c,
            eps=first.eps,
            momentum=first.momentum,
            affine=first.affine,
            track_running_stats=first.track_running_stats,
        )
        states = [n.state_dict() for n in norms]
        merged = {k: (torch.cat([st[k] for st in states]) if v.dim() >= 1 else v.clone()) for k, v in states[0].items()}
        stacked.load_state_dict(merged)
        return stacked

    def forward(self, x: Tensor) -> Tensor:
        s, b = x.shape[0], x.shape[1]
        h = x
        for i, (w, act, norm) in enumerate(zip(self.weights, self.acts, self.norms)):
            if self.has_bias[i]:
                h = torch.baddbmm(self.biases[i].unsqueeze(1), h, w.transpose(1, 2))  # (S, B, out)
            else:
                h = torch.bmm(h, w.transpose(1, 2))  # (S, B, out)
            if self.placements[i] == "before":
                h = act(self._norm(norm, h, s, b))
            else:
                h = self._norm(norm, act(h), s, b)
            h = self._after_block(h)
        return torch.baddbmm(self.head_b.unsqueeze(1), h, self.head_w.transpose(1, 2))  # (S, B, classes)

    def _after_block(self, h: Tensor) -> Tensor:
        """What follows every hidden block (nothing here; dropout in a subclass). Shape (S, B, C)."""
        return h

    @staticmethod
    def _norm(norm: nn.Module, h: Tensor, s: int, b: int) -> Tensor:
        if isinstance(norm, nn.Identity):
            return h
        c = h.shape[2]
        flat = h.transpose(0, 1).reshape(b, s * c)  # (B, S*C), seed-major columns
        return norm(flat).reshape(b, s, c).transpose(0, 1)  # (S, B, C)

    @torch.no_grad()
    def copy_into(self, models: Sequence[MLP], which: Iterable[int] | None = None) -> None:
        """Write seed ``k``'s weights and norm buffers into ``models[k]`` (all seeds by default)."""
        for k in range(self.seeds) if which is None else which:
            model = models[k]
            for i, block in enumerate(_blocks(model)):
                lin = _linear(block)
                lin.weight.copy_(self.weights[i][k])
                if lin.bias is not None:
                    lin.bias.copy_(self.biases[i][k])
                c = self._norm_features[i]
                if c:
                    state = block.norm.state_dict()
                    stacked = self.norms[i].state_dict()
                    block.norm.load_state_dict(
                        {
                            key: (stacked[key][k * c : (k + 1) * c].clone() if v.dim() >= 1 else stacked[key].clone())
                            for key, v in state.items()
                        }
                    )
            model.head.weight.copy_(self.head_w[k])
            model.head.bias.copy_(self.head_b[k])

    @torch.no_grad()
    @torch.no_grad()
    def silence(self, which: Iterable[int]) -> None:
        """Set stopped seeds' slices to a neutral, finite state (weights and biases 0, norm
        weight 1 and bias 0, running mean 0 and variance 1), so that a diverged seed's
        non-finite activations cannot reach the merged norm layers, whose batch statistics
        would then be refused for every seed. Their models keep their own weights."""
        for k in which:
            for i in range(len(self.weights)):
                self.weights[i][k].zero_()
                if self.has_bias[i]:
                    self.biases[i][k].zero_()
                c = self._norm_features[i]
                if c:
                    norm = self.norms[i]
                    cols = slice(k * c, (k + 1) * c)
                    for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                        t = getattr(norm, name, None)
                        if isinstance(t, Tensor) and t.dim() >= 1:
                            t[cols] = value
            self.head_w[k].zero_()
            self.head_b[k].zero_()


def train_stacked(
    models: Sequence[MLP],
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    spec: TrainSpec,
    *,
    generators: Sequence[torch.Generator],
    checkpoints: Iterable[int] = (),
    on_checkpoint: Callable[[int, list[TrainResult]], None] | None = None,
    tick: Tick | None = None,
) -> list[TrainResult]:
    """Train ``models[k]`` on ``(xs[k], ys[k])`` with minibatches from ``generators[k]``, all
    seeds at once (see the module docstring); the models are updated in place.

    Args:
        models: S lab MLPs of one architecture (no dropout).
        xs, ys: each seed's training set, shapes (N_k, D) and (N_k,); N_k >= batch size.
        spec: as for ``training.train`` (the same for every seed).
        generators: one per seed, drives that seed's minibatch order exactly as in ``train``.
        checkpoints, on_checkpoint: ``on_checkpoint(step, results)`` after the listed steps
            (0 = before training), with the models holding their current weights and in
            training mode; ``results[k]`` is seed k's live ``TrainResult``.
        tick: progress sink, one update per step.

    Returns:
        One ``TrainResult`` per seed (a diverged seed stops at its first non-finite loss).
    """
    n = len(models)
    if not (len(xs) == len(ys) == len(generators) == n):
        raise ValueError(
            f"train_stacked: expected one x, y and generator per model ({n}), got {len(xs)}, {len(ys)}, {len(generators)}"
        )
    stacked = StackedMLP(models)
    streams = [minibatches(x.shape[0], spec.batch_size, g) for x, g in zip(xs, generators)]
    opt = torch.optim.SGD(stacked.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    results = [TrainResult() for _ in range(n)]
    marks = {int(c) for c in checkpoints}
    tick = tick if tick is not None else Tick()
    stopped: list[int] = []
    stacked.train()
    for m in models:
        m.train()
    if 0 in marks and on_checkpoint is not None:
        on_checkpoint(0, results)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batch statistics are not finite", category=RuntimeWarning)
        for step in range(1, spec.steps + 1):
            idx = [next(stream) for stream in streams]
            xb = torch.stack([x[i] for x, i in zip(xs, idx)])  # (S, B, D)
            yb = torch.stack([y[i] for y, i in zip(ys, idx)])  # (S, B)
            logits = stacked(xb)  # (S, B, classes)
            per_seed = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").mean(dim=1)  # (S,)
            newly = record_losses(results, per_seed.detach().tolist(), stopped, step)
            if newly:
                stacked.copy_into(models, newly)  # keep their last finite weights
                stopped.extend(newly)
            alive = [k for k in range(n) if k not in stopped]
            if not alive:
                break
            opt.zero_grad(set_to_none=True)
            per_seed[alive].sum().backward()
            opt.step()
            if stopped:
                stacked.silence(stopped)  # after every step: momentum or weight decay would move them
            for k in alive:
                results[k].steps_done = step
            tick.update(1)
            if step in marks and on_checkpoint is not None:
                stacked.copy_into(models, alive)
                on_checkpoint(step, results)
    stacked.copy_into(models, [k for k in range(n) if k not in stopped])
    return results
