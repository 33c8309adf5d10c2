"""Train many small networks of one architecture together — several *arms* (one normalization
each: BN over groups, Batch Renorm, Ghost BN, Group Norm, ...) times several seeds — so that
M members cost about as many Python-level operations as one.

    arms = [[MLP(64, [100] * 3, 10, norm=factory_a) for seed in seeds],   # arm a, one per seed
            [MLP(64, [100] * 3, 10, norm=factory_b) for seed in seeds]]
    results = train_together(arms, xs, ys, spec, streams)   # xs, ys, streams: one per member
    # the models now hold their trained weights and buffers; evaluate them one by one

Members are the models of all arms, arm-major (member j of arm a). The result equals
``training.train`` run on each member alone with its own index stream, up to float rounding:

* MLP Linear: ``h[j] = x[j] @ W[j]^T`` as one ``torch.bmm`` over weights (M, out, in);
  (M, B, in) -> (M, B, out).
* Conv1d: the members' kernels concatenated to (M*out, in, k) and applied as ONE grouped
  convolution (``groups=M``) on the members' channels side by side: (B, M*in, L) ->
  (B, M*out, L'); member j's channels are j*out .. (j+1)*out - 1.
* Normalization: each arm's S members share one layer of S*C features (a deep copy of the
  first member's layer with every parameter and buffer concatenated along the feature axis;
  ``nn.GroupNorm`` gets S times the groups), applied to the arm's columns (B, S*C[, L]) in
  seed-major order. Batch-norm-like layers compute statistics per column, i.e. per member
  and feature, over the rows (or the rows' groups) of that member's batch; Group Norm's groups
  are consecutive channels, so they never straddle two members. Layers must not mix columns.
* Loss: the sum over members of each member's mean cross-entropy; no parameter is shared, so
  every member gets its own gradient, and plain SGD acts element-wise (momentum and weight
  decay are refused: they would keep moving a stopped member).
* A member whose loss becomes non-finite stops as ``train`` stops it: its weights at that
  step are copied into its model, it leaves the loss, and after that step its slices are set
  to zero (weights and biases 0, running means 0, running variances / stds 1) so that its
  share of the merged layers stays finite. One difference from training alone remains: in
  the step where a member diverges, its merged layers refuse the non-finite batch as a
  whole, so the other members *of its arm* skip that one running-statistics update.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .models import MLP, ConvNet
from .training import Tick, TrainResult, TrainSpec, record_losses

__all__ = ["StackedNet", "train_together"]


def _merge_norm(norms: Sequence[nn.Module]) -> nn.Module:
    """One layer of S*C features holding the S layers ``norms`` side by side (see module doc)."""
    first = norms[0]
    if isinstance(first, nn.Identity):
        return nn.Identity()
    merged = copy.deepcopy(first)
    s = len(norms)
    for name, _p in first.named_parameters(recurse=False):
        merged._parameters[name] = nn.Parameter(torch.cat([n._parameters[name].detach() for n in norms]).clone())
    for name, b in first.named_buffers(recurse=False):
        if b.dim() >= 1:
            merged._buffers[name] = torch.cat([n._buffers[name] for n in norms]).clone()
    if isinstance(first, nn.GroupNorm):
        merged.num_groups = first.num_groups * s
        merged.num_channels = first.num_channels * s
    elif hasattr(first, "num_features"):
        merged.num_features = int(first.num_features) * s
    else:
        raise TypeError(
            f"StackedNet: expected a batch-norm-like layer (num_features) or nn.GroupNorm, got {type(first).__name__}"
        )
    return merged


def _features(norm: nn.Module) -> int:
    return int(norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features)


class StackedNet(nn.Module):
    """The members of several arms (lab ``MLP``s, or ``ConvNet``s on 1-D signals, all of one
    architecture; one normalization per arm) evaluated together.

    Shape: (M, B, D) -> (M, B, classes), M = total members, D the flat input size.
    """

    def __init__(self, arms: Sequence[Sequence[nn.Module]]) -> None:
        super().__init__()
        members = [m for arm in arms for m in arm]
        if not arms or any(len(arm) == 0 for arm in arms):
            raise ValueError("StackedNet: expected at least one arm and at least one model per arm")
        first = members[0]
        if not all(type(m) is type(first) for m in members) or not isinstance(first, (MLP, ConvNet)):
            raise TypeError(
                f"StackedNet: expected lab MLPs or ConvNets of one kind, got {[type(m).__name__ for m in members]}"
            )
        self.conv = isinstance(first, ConvNet)
        if self.conv:
            if len(first.input_shape) != 2:
                raise ValueError(
                    f"StackedNet: expected a 1-D ConvNet (input (C, L)), got input_shape {first.input_shape}"
                )
            self.input_shape: tuple[int, ...] = tuple(first.input_shape)
        self.sizes = [len(arm) for arm in arms]
        self.m = len(members)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norms = nn.ModuleList()
        self.acts: list[nn.Module] = []
        self.placements: list[str] = []
        self.has_bias: list[bool] = []
        self.conv_args: list[tuple[int, int]] = []
        self.widths: list[int] = []
        for i, block in enumerate(first.blocks):
            if not isinstance(block.drop, nn.Identity):
                raise ValueError("StackedNet: dropout is not supported (its masks cannot match a single-model run)")
            layers = [m.blocks[i].layer for m in members]
            self.weights.append(
                nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]).clone())
            )  # (M, out, in[, k])
            self.has_bias.append(block.layer.bias is not None)
            bias = (
                torch.stack([layer.bias.detach() for layer in layers]).clone()
                if block.layer.bias is not None
                else torch.empty(0)
            )
            self.biases.append(nn.Parameter(bias))  # (M, out) or empty
            if self.conv:
                self.conv_args.append((int(block.layer.stride[0]), int(block.layer.padding[0])))
            arm_norms = nn.ModuleList()
            start = 0
            for size in self.sizes:
                arm_norms.append(_merge_norm([m.blocks[i].norm for m in members[start : start + size]]))
                start += size
            self.norms.append(arm_norms)
            self.acts.append(block.act)
            self.placements.append(block.placement)
            self.widths.append(int(block.layer.weight.shape[0]))
        self.head_w = nn.Parameter(
            torch.stack([m.head.weight.detach() for m in members]).clone()
        )  # (M, classes, width)
        self.head_b = nn.Parameter(torch.stack([m.head.bias.detach() for m in members]).clone())  # (M, classes)

    def _normalize(self, i: int, h: Tensor) -> Tensor:
        """Apply layer i's arm norms to h in the (B, M*C[, L]) layout."""
        c = self.widths[i]
        parts = []
        start = 0
        for size, norm in zip(self.sizes, self.norms[i]):
            parts.append(norm(h[:, start * c : (start + size) * c]))
            start += size
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        m, b = x.shape[0], x.shape[1]
        if self.conv:
            # (M, B, C*L) -> (B, M*C, L): member j's channels side by side
            h = (
                x.reshape(m, b, *self.input_shape)
                .transpose(0, 1)
                .reshape(b, m * self.input_shape[0], self.input_shape[1])
            )
            for i, (w, act) in enumerate(zip(self.weights, self.acts)):
                stride, padding = self.conv_args[i]
                bias = self.biases[i].reshape(-1) if self.has_bias[i] else None
                h = F.conv1d(
                    h, w.reshape(-1, w.shape[2], w.shape[3]), bias, stride=stride, padding=padding, groups=m
                )  # (B, M*out, L')
                h = act(self._normalize(i, h)) if self.placements[i] == "before" else self._normalize(i, act(h))
            pooled = h.mean(dim=2).reshape(b, m, -1).transpose(0, 1)  # (M, B, C_last)
        else:
            h = x  # (M, B, D)
            for i, (w, act) in enumerate(zip(self.weights, self.acts)):
                if self.has_bias[i]:
                    h = torch.baddbmm(self.biases[i].unsqueeze(1), h, w.transpose(1, 2))  # (M, B, out)
                else:
                    h = torch.bmm(h, w.transpose(1, 2))  # (M, B, out)
                c = h.shape[2]
                if self.placements[i] == "before":
                    flat = self._normalize(i, h.transpose(0, 1).reshape(b, m * c))  # (B, M*C)
                    h = act(flat.reshape(b, m, c).transpose(0, 1))
                else:
                    flat = self._normalize(i, act(h).transpose(0, 1).reshape(b, m * c))
                    h = flat.reshape(b, m, c).transpose(0, 1)
            pooled = h
        return torch.baddbmm(self.head_b.unsqueeze(1), pooled, self.head_w.transpose(1, 2))  # (M, B, classes)

    def _arm_of(self, k: int) -> tuple[int, int]:
        """(arm, index within the arm) of member k."""
        start = 0
        for arm, size in enumerate(self.sizes):
            if k < start + size:
                return arm, k - start
            start += size
        raise IndexError(f"StackedNet: member {k} out of range ({self.m} members)")

    def _member_norms(self, k: int) -> list[tuple[nn.Module | None, int]]:
        """Per layer: the merged norm holding member k (None: no norm) and k's index in it."""
        arm, j = self._arm_of(k)
        return [
            (None if isinstance(self.norms[i][arm], nn.Identity) else self.norms[i][arm], j)
            for i in range(len(self.weights))
        ]

    @torch.no_grad()
    def copy_into(self, members: Sequence[nn.Module], which: Sequence[int]) -> None:
        """Write member k's weights and norm state into ``members[k]`` for k in ``which``."""
        for k in which:
            model = members[k]
            for i, (block, (merged, j)) in enumerate(zip(model.blocks, self._member_norms(k))):
                block.layer.weight.copy_(self.weights[i][k])
                if self.has_bias[i]:
                    block.layer.bias.copy_(self.biases[i][k])
                if merged is None:
                    continue
                c = self.widths[i]
                for name, p in block.norm.named_parameters(recurse=False):
                    p.copy_(merged._parameters[name][j * c : (j + 1) * c])
                for name, buf in block.norm.named_buffers(recurse=False):
                    src = merged._buffers[name]
                    buf.copy_(src[j * c : (j + 1) * c] if buf.dim() >= 1 else src)
            model.head.weight.copy_(self.head_w[k])
            model.head.bias.copy_(self.head_b[k])

    @torch.no_grad()
    def silence(self, k: int) -> None:
        """Zero member k's slices (weights, biases, norm parameters, running means; running
        variances and stds 1) so that its forward stays finite."""
        for i in range(len(self.weights)):
            self.weights[i][k].zero_()
            if self.has_bias[i]:
                self.biases[i][k].zero_()
        self.head_w[k].zero_()
        self.head_b[k].zero_()
        for i, (merged, j) in enumerate(self._member_norms(k)):
            if merged is None:
                continue
            c = self.widths[i]
            tensors = list(merged.named_parameters(recurse=False)) + [
                (n, b) for n, b in merged.named_buffers(recurse=False) if b.dim() >= 1
            ]
            for name, full in tensors:
                full[j * c : (j + 1) * c].fill_(1.0 if name in ("running_var", "running_std") else 0.0)


def train_together(
    arms: Sequence[Sequence[nn.Module]],
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    spec: TrainSpec,
    streams: Sequence[Iterator[Tensor]],
    *,
    tick: Tick | None = None,
) -> list[TrainResult]:
    """Train every member (arm-major: ``[m for arm in arms for m in arm]``) on its own data
    ``(xs[k], ys[k])`` with minibatch indices from ``streams[k]``, all at once (see the module
    docstring); the models are updated in place.

    Args:
        arms: lists of models; all of one architecture (lab ``MLP`` or 1-D ``ConvNet``), one
            normalization kind per arm (their layers are merged).
        xs, ys: each member's training set, shapes (N_k, D) and (N_k,).
        spec: plain SGD (``momentum`` and ``weight_decay`` must be 0), ``steps``, ``lr``;
            ``batch_size`` must be the size of every yielded index batch.
        streams: one endless iterator of (batch_size,) index tensors per member (e.g.
            ``training.minibatches`` with that member's generator).
        tick: progress sink, one update per step.

    Returns:
        One ``TrainResult`` per member (a diverged member stops at its first non-finite loss).
    """
    members = [m for arm in arms for m in arm]
    n = len(members)
    if not (len(xs) == len(ys) == len(streams) == n):
        raise ValueError(
            f"train_together: expected one x, y and stream per member ({n}), got {len(xs)}, {len(ys)}, {len(streams)}"
        )
    if spec.momentum != 0.0 or spec.weight_decay != 0.0:
        raise ValueError(
            f"train_together: expected plain SGD (momentum 0, weight_decay 0), got {spec.momentum}, {spec.weight_decay}"
        )
    net = StackedNet(arms)
    opt = torch.optim.SGD(net.parameters(), lr=spec.lr)
    results = [TrainResult() for _ in range(n)]
    tick = tick if tick is not None else Tick()
    stopped: set[int] = set()
    net.train()
    for m in members:
        m.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batch statistics are not finite", category=RuntimeWarning)
        for step in range(1, spec.steps + 1):
            idx = [next(stream) for stream in streams]
            if any(int(i.shape[0]) != spec.batch_size for i in idx):
                raise ValueError(
                    f"train_together: expected index batches of {spec.batch_size}, got {[int(i.shape[0]) for i in idx]}"
                )
            xb = torch.stack([x[i] for x, i in zip(xs, idx)])  # (M, B, D)
            yb = torch.stack([y[i] for y, i in zip(ys, idx)])  # (M, B)
            logits = net(xb)  # (M, B, classes)
            per_member = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").mean(dim=1)  # (M,)
            newly = record_losses(results, per_member.detach().tolist(), stopped, step)
            if newly:
                net.copy_into(members, newly)  # the weights that gave the non-finite loss, as ``train`` leaves them
                stopped.update(newly)
            alive = [k for k in range(n) if k not in stopped]
            if not alive:
                break
            opt.zero_grad(set_to_none=True)
            per_member[alive].sum().backward()
            opt.step()
            for k in newly:
                net.silence(k)  # after the step: its slices may have become non-finite
            for k in alive:
                results[k].steps_done = step
            tick.update(1)
    net.copy_into(members, [k for k in range(n) if k not in stopped])
    return results
