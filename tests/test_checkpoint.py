"""Activation checkpointing (``torch.utils.checkpoint``) and running statistics.

A checkpointed block re-runs its forward inside the backward pass. Torch's BN layers update
their running statistics again there (two updates per step, ``num_batches_tracked == 2``); ours
must not: outputs, gradients, running statistics and counters equal the un-checkpointed run,
for every layer type, reentrant and not.

Run: PYTHONPATH=src python -m pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import batchnorm

C = 6
FAST_RENORM = {"r_max": 1.5, "d_max": 0.5, "warmup_steps": 0, "r_max_steps": 0, "d_max_steps": 0, "momentum": 0.3}

LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "bn1d": (lambda: batchnorm.BatchNorm1d(C), (8, C)),
    "bn1d_seq": (lambda: batchnorm.BatchNorm1d(C, momentum=None), (4, C, 5)),
    "bn2d": (lambda: batchnorm.BatchNorm2d(C), (4, C, 3, 3)),
    "bn3d": (lambda: batchnorm.BatchNorm3d(C), (2, C, 2, 3, 2)),
    "renorm": (lambda: batchnorm.BatchRenorm1d(C, **FAST_RENORM), (8, C)),  # type: ignore[arg-type]
    "renorm2d": (lambda: batchnorm.BatchRenorm2d(C, **FAST_RENORM), (4, C, 3, 3)),  # type: ignore[arg-type]
    "ghost": (lambda: batchnorm.GhostBatchNorm1d(C, virtual_batch_size=4), (8, C)),
    "act": (lambda: batchnorm.BatchNormAct1d(C, activation="leaky_relu", negative_slope=0.1), (8, C)),
    "frozen": (lambda: batchnorm.FrozenBatchNorm1d(C), (8, C)),
    "sync_no_group": (lambda: batchnorm.SyncBatchNorm(C), (8, C)),
}


def _steps(layer: nn.Module, inputs: list[torch.Tensor], mode: str) -> list[tuple[torch.Tensor, ...]]:
    """Train ``layer`` on each input (block: tanh(layer(x)), loss: weighted sum); the outputs and
    gradients of each step."""
    out = []
    for x in inputs:
        x = x.clone().requires_grad_()
        block = lambda t: torch.tanh(layer(t))  # noqa: E731 - the checkpointed block
        y = block(x) if mode == "plain" else checkpoint(block, x, use_reentrant=mode == "reentrant")
        w = torch.linspace(-1.0, 2.0, y.numel()).reshape(y.shape)
        for p in layer.parameters():
            p.grad = None
        (y * w).sum().backward()
        grads = tuple(p.grad.clone() for p in layer.parameters() if p.grad is not None)
        out.append((y.detach(), x.grad, *grads))
    return out


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.named_buffers()}


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_checkpointed_equals_plain(name: str, mode: str) -> None:
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    plain = make()
    with torch.no_grad():
        for p in plain.parameters():
            p.uniform_(0.5, 1.5)
    plain.train()
    ckpt = copy.deepcopy(plain)
    inputs = [torch.randn(shape) * (1 + k) + k for k in range(4)]
    expected, got = _steps(plain, inputs, "plain"), _steps(ckpt, inputs, mode)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert len(a) == len(b)
        for i, (u, v) in enumerate(zip(a, b)):
            torch.testing.assert_close(v, u, rtol=0, atol=0, msg=f"step {step}, output/gradient {i}")
    sa, sb = _state(plain), _state(ckpt)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"buffer {k}: {sb[k]} checkpointed, {sa[k]} plain"
    if "num_batches_tracked" in sa and name != "frozen":
        assert int(sa["num_batches_tracked"]) == len(inputs)


def test_torch_layer_updates_twice_under_checkpoint() -> None:
    """The problem this fixes, as torch has it (if torch fixes it, this test says so)."""
    layer = nn.BatchNorm1d(C)
    x = torch.randn(8, C, requires_grad=True)
    checkpoint(lambda t: torch.tanh(layer(t)), x, use_reentrant=False).sum().backward()
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_renorm_reused_in_two_blocks(mode: str) -> None:
    """One renorm layer called in two checkpointed blocks of a step (recomputed in reverse
    order): each recomputation reuses its own forward's r and d."""
    torch.manual_seed(1)
    plain = batchnorm.BatchRenorm1d(C, **FAST_RENORM)  # type: ignore[arg-type]
    ckpt = copy.deepcopy(plain)

    def run(layer: nn.Module, use: str) -> tuple[torch.Tensor, ...]:
        x = torch.randn(8, C, generator=torch.Generator().manual_seed(3)).requires_grad_()
        block = lambda t: torch.tanh(layer(t * 1.5 + 0.5))  # noqa: E731
        if use == "plain":
            y = block(block(x))
        else:
            reentrant = use == "reentrant"
            y = checkpoint(block, checkpoint(block, x, use_reentrant=reentrant), use_reentrant=reentrant)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        return y.detach(), x.grad, layer.weight.grad, layer.running_mean.clone(), layer.running_std.clone()

    for _ in range(3):
        for u, v in zip(run(plain, "plain"), run(ckpt, mode)):
            # the weight's two gradient contributions are summed in another order: 1 ulp
            torch.testing.assert_close(v, u, rtol=1e-6, atol=1e-6)
        plain.zero_grad()
        ckpt.zero_grad()
    assert int(ckpt.num_batches_tracked) == 6
