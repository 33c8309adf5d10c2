"""The layer cases every integration-point test runs over, and the helpers that compare runs.

A :class:`Case` builds one layer with a random but fixed state (weight, bias, running
statistics, a step counter of 2 so that ``momentum=None`` uses the factor 1/3), the inputs it
is fed, and, where torch has the same function, a torch reference loaded with the same state.
Checks compare a transformed layer (compiled, exported, traced, ...) with an untransformed copy
run eagerly on the same inputs: outputs, input/weight/bias gradients and every buffer, per step.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import batchnorm

STEPS = 3
TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32: a transform may reorder the reductions


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer configuration.

    Attributes:
        name: the pytest id.
        make: builds the layer (state is randomized by :meth:`build`).
        shape: input shape (N, C, *).
        kind: "bn", "renorm", "ghost", "frozen", "act" or "sync".
        reference: builds torch's layer(s) computing the same function, given our layer (whose
            state it copies); None where torch has no equivalent.
    """

    name: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    kind: str
    reference: Callable[[nn.Module], nn.Module] | None = None

    def build(self, seed: int = 0) -> nn.Module:
        """The layer with a random state that makes every term of its formula matter."""
        m = self.make()
        randomize_state(m, seed)
        return m

    def inputs(self, steps: int = STEPS, seed: int = 1) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed)
        # mean 0.5, std 2: away from the state's running statistics, so r/d clip in renorm
        return [torch.randn(self.shape, generator=g) * 2.0 + 0.5 for _ in range(steps)]


def randomize_state(m: nn.Module, seed: int) -> None:
    """weight ~ 1 + 0.3 N, bias ~ 0.3 N, running mean ~ 0.5 N, var/std in [0.5, 1.5], step 2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight":
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))
            elif leaf == "bias":
                t.copy_(0.3 * torch.randn(t.shape, generator=g))
            elif leaf == "running_mean":
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
            elif leaf in ("running_var", "running_std"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif leaf == "num_batches_tracked":
                t.fill_(2)


def _torch_bn(dim: int, momentum: float | None = 0.1) -> Callable[[nn.Module], nn.Module]:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]

    def make(ours: nn.Module) -> nn.Module:
        ref = cls(ours.num_features, eps=ours.eps, momentum=momentum)
        ref.load_state_dict(ours.state_dict())
        return ref

    return make


def _torch_bn_act(dim: int) -> Callable[[nn.Module], nn.Module]:
    def make(ours: nn.Module) -> nn.Module:
        return nn.Sequential(_torch_bn(dim, ours.momentum)(ours), nn.LeakyReLU(ours.negative_slope))

    return make


class FrozenReference(nn.Module):
    """torch's eval-mode batch norm with fixed statistics, in either mode."""

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        for k, v in ours.state_dict().items():
            self.register_buffer(k, v.clone())
        self.eps = ours.eps

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _renorm(cls: type) -> Callable[[], nn.Module]:
    # schedule already at its final limits (step 2 >= 1): r in [1/1.5, 1.5], d in [-0.5, 0.5]
    return lambda: cls(3, momentum=0.1, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=1, d_max_steps=1)


CASES: list[Case] = [
    Case("BatchNorm1d", lambda: batchnorm.BatchNorm1d(3), (6, 3), "bn", _torch_bn(1)),
    Case("BatchNorm1d-3d", lambda: batchnorm.BatchNorm1d(3), (6, 3, 4), "bn", _torch_bn(1)),
    Case("BatchNorm1d-mNone", lambda: batchnorm.BatchNorm1d(3, momentum=None), (6, 3), "bn", _torch_bn(1, None)),
    Case("BatchNorm2d", lambda: batchnorm.BatchNorm2d(3), (4, 3, 3, 3), "bn", _torch_bn(2)),
    Case("BatchNorm2d-mNone", lambda: batchnorm.BatchNorm2d(3, momentum=None), (4, 3, 3, 3), "bn", _torch_bn(2, None)),
    Case("BatchNorm3d", lambda: batchnorm.BatchNorm3d(3), (4, 3, 2, 2, 2), "bn", _torch_bn(3)),
    Case(
        "BatchNorm3d-mNone", lambda: batchnorm.BatchNorm3d(3, momentum=None), (4, 3, 2, 2, 2), "bn", _torch_bn(3, None)
    ),
    Case("BatchRenorm1d", _renorm(batchnorm.BatchRenorm1d), (6, 3), "renorm"),
    Case("BatchRenorm2d", _renorm(batchnorm.BatchRenorm2d), (4, 3, 3, 3), "renorm"),
    Case("BatchRenorm3d", _renorm(batchnorm.BatchRenorm3d), (4, 3, 2, 2, 2), "renorm"),
    # 5 samples in ghost batches of 2: the last ghost batch is smaller
    # 7 = 3 + 4 (a tail of one sample merges): two samples per ghost batch would make dL/dx zero up to rounding
    Case("GhostBatchNorm1d", lambda: batchnorm.GhostBatchNorm1d(3, virtual_batch_size=3), (7, 3), "ghost"),
    Case("GhostBatchNorm2d", lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2), (5, 3, 2, 2), "ghost"),
    Case("GhostBatchNorm3d", lambda: batchnorm.GhostBatchNorm3d(3, virtual_batch_size=2), (5, 3, 2, 2, 2), "ghost"),
    Case("FrozenBatchNorm1d", lambda: batchnorm.FrozenBatchNorm1d(3), (6, 3), "frozen", FrozenReference),
    Case("FrozenBatchNorm2d", lambda: batchnorm.FrozenBatchNorm2d(3), (4, 3, 3, 3), "frozen", FrozenReference),
    Case("FrozenBatchNorm3d", lambda: batchnorm.FrozenBatchNorm3d(3), (4, 3, 2, 2, 2), "frozen", FrozenReference),
    Case("BatchNormAct1d", lambda: batchnorm.BatchNormAct1d(3), (6, 3), "act", _torch_bn_act(1)),
    Case("BatchNormAct2d", lambda: batchnorm.BatchNormAct2d(3), (4, 3, 3, 3), "act", _torch_bn_act(2)),
    Case("BatchNormAct3d", lambda: batchnorm.BatchNormAct3d(3), (4, 3, 2, 2, 2), "act", _torch_bn_act(3)),
    Case("SyncBatchNorm", lambda: batchnorm.SyncBatchNorm(3), (4, 3, 3, 3), "sync", _torch_bn(2)),
    Case("SyncBatchNorm-mNone", lambda: batchnorm.SyncBatchNorm(3, momentum=None), (6, 3), "sync", _torch_bn(1, None)),
]
BY_NAME = {c.name: c for c in CASES}
# one per layer type: the unmarked representatives of the costly checks
REPRESENTATIVES = [
    BY_NAME[n]
    for n in ("BatchNorm2d", "BatchNorm1d-mNone", "BatchRenorm2d", "GhostBatchNorm1d", "FrozenBatchNorm2d",
              "BatchNormAct2d", "SyncBatchNorm")
]  # fmt: skip

# every case, the non-representatives marked slow (for the costliest matrices: torch.compile)
MATRIX = [c if c in REPRESENTATIVES else pytest.param(c, marks=pytest.mark.slow, id=c.name) for c in CASES]

# torch's own layers as cases (the integration matrix runs every check on them too)
TORCH_CASES: list[Case] = [
    Case("torch.BatchNorm1d", lambda: nn.BatchNorm1d(3), (6, 3), "bn"),
    Case("torch.BatchNorm2d", lambda: nn.BatchNorm2d(3), (4, 3, 3, 3), "bn"),
    Case("torch.BatchNorm2d-mNone", lambda: nn.BatchNorm2d(3, momentum=None), (4, 3, 3, 3), "bn"),
    Case("torch.BatchNorm3d", lambda: nn.BatchNorm3d(3), (4, 3, 2, 2, 2), "bn"),
    Case("torch.SyncBatchNorm", lambda: nn.SyncBatchNorm(3), (4, 3, 3, 3), "sync"),
]


@dataclasses.dataclass
class Step:
    """What one call produced: output, gradients (input, parameters) and buffers after it."""

    output: Tensor
    grads: dict[str, Tensor | None]
    buffers: dict[str, Tensor]


def state_of(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items() if isinstance(v, Tensor)}


def run_steps(
    module: Callable[[Tensor], Tensor],
    owner: nn.Module,
    xs: list[Tensor],
    *,
    grad: bool,
    lr: float = 0.1,
) -> list[Step]:
    """Call ``module`` on each input; with ``grad``, backpropagate a random weighted sum and
    take an SGD step on ``owner``'s parameters (as a training loop would), else under no_grad.
    ``owner`` holds the parameters and buffers (the module itself, or what it wraps)."""
    out: list[Step] = []
    g = torch.Generator().manual_seed(7)
    for x in xs:
        x = x.clone().requires_grad_(grad)
        params = dict(owner.named_parameters())
        for p in params.values():
            p.grad = None
        if grad:
            y = module(x)
            (y * torch.randn(y.shape, generator=g)).sum().backward()
        else:
            with torch.no_grad():
                y = module(x)
        grads: dict[str, Tensor | None] = {}
        if grad:
            grads["input"] = None if x.grad is None else x.grad.clone()
            grads.update({k: None if p.grad is None else p.grad.clone() for k, p in params.items()})
            with torch.no_grad():
                for p in params.values():
                    if p.grad is not None:
                        p -= lr * p.grad
        out.append(Step(y.detach().clone(), grads, {k: v.detach().clone() for k, v in owner.named_buffers()}))
    return out


def assert_steps_close(got: list[Step], want: list[Step], what: str, tol: dict[str, float] | None = None) -> None:
    """Every output, gradient and buffer of ``got`` equals ``want``'s (integers exactly)."""
    tol = TOL if tol is None else tol
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        where = f"{what}, step {i + 1}"
        torch.testing.assert_close(
            a.output, b.output, **tol, msg=lambda m, where=where: f"{where}: output differs\n{m}"
        )
        assert a.grads.keys() == b.grads.keys(), f"{where}: gradients of {sorted(a.grads)} vs {sorted(b.grads)}"
        for k in a.grads:
            ga, gb = a.grads[k], b.grads[k]
            assert (ga is None) == (gb is None), f"{where}: grad of {k} is {ga is not None} vs {gb is not None}"
            if ga is not None:
                torch.testing.assert_close(
                    ga, gb, **tol, msg=lambda m, k=k, where=where: f"{where}: grad of {k} differs\n{m}"
                )
        # our layers' extra, non-persistent counter has no counterpart in torch's layers
        extra = {k for k in a.buffers.keys() ^ b.buffers.keys() if k.endswith("num_batches_skipped")}
        keys = a.buffers.keys() - extra
        assert keys == b.buffers.keys() - extra, f"{where}: buffers {sorted(a.buffers)} vs {sorted(b.buffers)}"
        for k in keys:
            torch.testing.assert_close(
                a.buffers[k], b.buffers[k], **tol, msg=lambda m, k=k, where=where: f"{where}: buffer {k} differs\n{m}"
            )


def comparable_buffers(steps: list[Step], keep: Any) -> list[Step]:
    """The steps with buffers renamed/filtered by ``keep(name) -> new name or None``."""
    out = []
    for s in steps:
        bufs = {keep(k): v for k, v in s.buffers.items() if keep(k) is not None}
        grads = {(keep(k) or k): v for k, v in s.grads.items()}
        out.append(Step(s.output, grads, bufs))
    return out


def leaf_names(steps: list[Step]) -> list[Step]:
    """Drop module prefixes ("0.weight" -> "weight") so torch's Sequential references compare."""
    return comparable_buffers(steps, lambda k: k.rsplit(".", 1)[-1])


def train_then_eval(
    call: Callable[[Tensor], Tensor], owner: nn.Module, mode_setter: nn.Module, case: Case, *, grad: bool
) -> list[Step]:
    """STEPS training steps, then one eval step (the protocol of the compile/script checks)."""
    xs = case.inputs(STEPS + 1)
    mode_setter.train()
    steps = run_steps(call, owner, xs[:STEPS], grad=grad)
    mode_setter.eval()
    steps += run_steps(call, owner, xs[STEPS:], grad=grad)
    return steps


def reference_steps(case: Case, fresh: nn.Module, *, grad: bool) -> list[Step] | None:
    """The same protocol on torch's reference layer (None where torch has none)."""
    if case.reference is None:
        return None
    ref = case.reference(copy.deepcopy(fresh))
    return leaf_names(train_then_eval(ref, ref, ref, case, grad=grad))
