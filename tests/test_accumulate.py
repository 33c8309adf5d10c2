"""``accumulate_statistics``: one exact running-statistics update for all micro-batches of a step.

Checked against one update with the concatenated batch (torch's own layer, and the float64
reference), for unequal micro-batch sizes, momentum and momentum=None, every layer type that
tracks statistics (ours and torch's); the outputs and gradients inside the block are the
micro-batches' own; an exception restores everything.

Run: PYTHONPATH=src python -m pytest -q tests/test_accumulate.py
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import batchnorm
from batchnorm import reference

C = 5
SIZES = (3, 7, 2)

LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "bn1d": (lambda: batchnorm.BatchNorm1d(C, momentum=0.3), (C,)),
    "bn1d_cumulative": (lambda: batchnorm.BatchNorm1d(C, momentum=None), (C, 4)),
    "bn2d": (lambda: batchnorm.BatchNorm2d(C), (C, 3, 2)),
    "bn3d": (lambda: batchnorm.BatchNorm3d(C), (C, 2, 2, 2)),
    "torch_bn2d": (lambda: nn.BatchNorm2d(C, momentum=0.3), (C, 3, 2)),
    "torch_bn1d_cumulative": (lambda: nn.BatchNorm1d(C, momentum=None), (C,)),
    "act": (lambda: batchnorm.BatchNormAct1d(C, momentum=0.3), (C,)),
    "ghost": (lambda: batchnorm.GhostBatchNorm1d(C, virtual_batch_size=2, momentum=0.3), (C, 3)),
    "sync_no_group": (lambda: batchnorm.SyncBatchNorm(C, momentum=0.3), (C, 2)),
    "renorm": (lambda: batchnorm.BatchRenorm1d(C, momentum=0.3), (C,)),
}


def _micro_batches(sample: tuple[int, ...], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, *sample, generator=g, dtype=dtype) * (1 + k) + 3 * k for k, n in enumerate(SIZES)]


def _prepared(name: str) -> nn.Module:
    make, sample = LAYERS[name]
    layer = make().double().train()
    with torch.no_grad():  # running statistics away from their initial values
        layer(torch.randn(6, *sample, dtype=torch.float64) * 2 + 1)
    return layer


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_one_update_equals_concatenated_batch(name: str) -> None:
    """After the block: the buffers one forward of the concatenation gives; inside: the outputs
    and gradients of each micro-batch alone (from the block's start state)."""
    _, sample = LAYERS[name]
    layer = _prepared(name)
    concat, alone = copy.deepcopy(layer), copy.deepcopy(layer)
    xs = _micro_batches(sample)
    with batchnorm.accumulate_statistics(layer) as model:
        assert model is layer
        for x in xs:
            xa = x.clone().requires_grad_()
            xb = x.clone().requires_grad_()
            ya = layer(xa)
            yb = copy.deepcopy(alone)(xb)  # a fresh copy of the start state for each micro-batch
            (ya * ya).sum().backward()
            (yb * yb).sum().backward()
            torch.testing.assert_close(ya, yb, rtol=0, atol=0)
            torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
            for k, b in layer.named_buffers():  # nothing moves inside the block
                assert torch.equal(b, dict(alone.named_buffers())[k]), k
    with torch.no_grad():
        concat(torch.cat(xs))
    for k, b in concat.named_buffers():
        torch.testing.assert_close(dict(layer.named_buffers())[k], b, rtol=1e-12, atol=1e-12, msg=k)
    assert int(layer.num_batches_tracked) == int(alone.num_batches_tracked) + 1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_against_float64_reference(momentum: float | None) -> None:
    layer = batchnorm.BatchNorm1d(C, momentum=momentum).train()
    xs = _micro_batches((C, 3), torch.float32)
    with batchnorm.accumulate_statistics(layer):
        for x in xs:
            layer(x)
    x = torch.cat(xs).double().numpy()
    rm, rv = reference.running_update(np.zeros(C), np.ones(C), x, 1.0 if momentum is None else momentum)
    np.testing.assert_allclose(layer.running_mean.numpy(), rm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.running_var.numpy(), rv, rtol=1e-6, atol=1e-6)
    assert int(layer.num_batches_tracked) == 1


def test_whole_model_and_checkpointed_torch_layer() -> None:
    """Every layer of a model, torch's under activation checkpointing too: one update each."""
    torch.manual_seed(0)

    class TwoBranches(nn.Module):  # both layers see the block's input: comparable to the concatenation
        def __init__(self) -> None:
            super().__init__()
            self.theirs, self.ours = nn.BatchNorm1d(C), batchnorm.BatchNorm1d(C, momentum=None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.theirs(x)) * torch.tanh(self.ours(2 * x))

    model = TwoBranches().double()
    concat = copy.deepcopy(model)
    xs = [torch.randn(n, C, dtype=torch.float64) for n in SIZES]
    with batchnorm.accumulate_statistics(model):
        for x in xs:
            checkpoint(model, x.requires_grad_(), use_reentrant=False).sum().backward()
    with torch.no_grad():
        concat(torch.cat(xs))
    for k, b in concat.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[k], b, rtol=1e-12, atol=1e-12, msg=k)


def test_eval_mode_layers_and_no_forward_change_nothing() -> None:
    layer = _prepared("bn1d")
    before = {k: b.clone() for k, b in layer.named_buffers()}
    with batchnorm.accumulate_statistics(layer):
        pass
    layer.eval()
    with batchnorm.accumulate_statistics(layer):
        layer(torch.randn(4, C, dtype=torch.float64))
    for k, b in layer.named_buffers():
        assert torch.equal(b, before[k]), k


def test_exception_restores_and_discards() -> None:
    layer = _prepared("bn1d")
    before = {k: b.clone() for k, b in layer.named_buffers()}
    with pytest.raises(RuntimeError, match="boom"), batchnorm.accumulate_statistics(layer):
        layer(torch.randn(4, C, dtype=torch.float64))
        raise RuntimeError("boom")
    for k, b in layer.named_buffers():
        assert torch.equal(b, before[k]), k
    assert not layer._forward_hooks and not layer._forward_pre_hooks
    layer(torch.randn(4, C, dtype=torch.float64))  # and the layer updates normally again
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


def test_errors() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"), batchnorm.accumulate_statistics("model"):  # type: ignore[arg-type]
        pass
    layer = batchnorm.BatchNorm1d(C)
    with batchnorm.accumulate_statistics(layer):
        with pytest.raises(ValueError, match="already inside"), batchnorm.accumulate_statistics(layer):
            pass
    assert batchnorm.tools.accumulate_statistics is batchnorm.accumulate_statistics


# ---------------------------------------------------------------------------------------------
# SyncBatchNorm under DDP's no_sync, two gloo processes on loopback

WORLD = 2
RANK_SIZES = ((3, 1), (2, 4), (0, 5))  # per micro-batch, the sizes on rank 0 and rank 1


def _sync_worker(rank: int, outdir: str) -> None:
    import datetime
    import gc
    import json
    import os
    import socket
    from pathlib import Path

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if "lo" in {n for _, n in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = f"file://{Path(outdir, 'rendezvous')}"
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30)
    )
    torch.manual_seed(0)  # the same global batches on every rank; each keeps its slice
    globals_ = [torch.randn(sum(s), C, 2, dtype=torch.float64) * (1 + k) + k for k, s in enumerate(RANK_SIZES)]
    layer = batchnorm.SyncBatchNorm(C, momentum=0.2).double()
    model = DistributedDataParallel(nn.Sequential(nn.Tanh(), layer))
    with batchnorm.accumulate_statistics(model):
        for k, (g, sizes) in enumerate(zip(globals_, RANK_SIZES)):
            local = g[sum(sizes[:rank]) : sum(sizes[: rank + 1])].clone().requires_grad_()
            ctx = model.no_sync() if k < len(RANK_SIZES) - 1 else contextlib.nullcontext()
            with ctx:
                model(local).sum().backward()
    ref = nn.BatchNorm1d(C, momentum=0.2).double()
    with torch.no_grad():
        ref(torch.tanh(torch.cat(globals_)))
    out = {
        "mean": float((layer.running_mean - ref.running_mean).abs().max()),
        "var": float((layer.running_var - ref.running_var).abs().max()),
        "tracked": int(layer.num_batches_tracked),
    }
    Path(outdir, f"{rank}.json").write_text(json.dumps(out))
    del model
    gc.collect()  # nothing may still hold the group when it is torn down (docs/distributed.md)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sync_under_ddp_no_sync_merges_across_processes(tmp_path) -> None:
    import json

    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert len(results) == WORLD
    for r in results:
        assert r["tracked"] == 1
        assert r["mean"] < 1e-12 and r["var"] < 1e-12, r
