"""``mask=``: batch norm over the real positions of a padded batch.

Against batch norm on the packed real values (torch's layer, and the float64 reference):
outputs, gradients of the input and the parameters, running statistics; padded positions give
0 and get 0 gradient whatever they hold; an all-True mask equals no mask; bad masks and too few
real values are errors; torch.compile (fullgraph), torch.export and vmap.

Run: PYTHONPATH=src python -m pytest -q tests/test_masked.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import reference

C = 4
SHAPES = {1: (5, C, 6), 2: (3, C, 4, 5), 3: (2, C, 3, 2, 4)}
OURS = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}


def _batch(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, *) float64 with garbage (NaN, huge) at padded positions, and a mask (N, *)
    with every sample's real prefix of a different length (flattened over the spatial dims)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    n, spatial = shape[0], shape[2:]
    flat = torch.arange(int(np.prod(spatial))).expand(n, -1)
    lengths = torch.randint(1, flat.shape[1] + 1, (n,), generator=g)
    mask = (flat < lengths[:, None]).reshape(n, *spatial)
    pad = ~mask.unsqueeze(1).expand(shape)
    x = x.masked_fill(pad, float("nan"))
    x[..., 0] = torch.where(pad[..., 0], 1e30, x[..., 0])
    return x, mask


def _packed(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> (R, C): the real positions' values, channels last."""
    return t.movedim(1, -1)[mask]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_layer_matches_torch_on_packed_real_values(d: int, momentum: float | None) -> None:
    ours = OURS[d](C, momentum=momentum).double()
    theirs = nn.BatchNorm1d(C, momentum=momentum).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    for step in range(3):
        x, mask = _batch(SHAPES[d], seed=step)
        xa = x.clone().requires_grad_()
        packed = _packed(x, mask).clone().requires_grad_()
        ya = ours(xa, mask=mask)
        yb = theirs(packed)
        w = torch.randn(ya.shape, dtype=torch.float64)
        (ya * w).sum().backward()
        (yb * _packed(w, mask)).sum().backward()
        torch.testing.assert_close(_packed(ya, mask), yb)
        assert torch.equal(ya.movedim(1, -1)[~mask], torch.zeros_like(ya.movedim(1, -1)[~mask]))
        torch.testing.assert_close(_packed(xa.grad, mask), packed.grad)
        assert torch.equal(xa.grad.movedim(1, -1)[~mask], torch.zeros_like(xa.grad.movedim(1, -1)[~mask]))
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
        ours.zero_grad()
        theirs.zero_grad()
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)
    ours.eval()
    x, mask = _batch(SHAPES[d], seed=9)
    y = ours(x, mask=mask)
    torch.testing.assert_close(_packed(y, mask), theirs.eval()(_packed(x, mask)))
    assert not y.isnan().any()


def test_functional_against_float64_reference() -> None:
    x, mask = _batch((6, C, 5))
    w, b = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    y = batchnorm.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, mask=mask)
    packed = _packed(x, mask).numpy()
    expected = reference.forward(packed, w.numpy(), b.numpy(), 1e-5)
    expected = expected[0] if isinstance(expected, tuple) else expected
    np.testing.assert_allclose(_packed(y, mask).numpy(), expected, rtol=1e-10, atol=1e-10)
    erm, erv = reference.running_update(np.zeros(C), np.ones(C), packed, 0.2)
    np.testing.assert_allclose(rm.numpy(), erm, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rv.numpy(), erv, rtol=1e-10, atol=1e-12)


def test_channel_last_sequence_with_mask() -> None:
    x, mask = _batch((4, C, 7))
    seq = x.movedim(1, -1).contiguous()  # (N, L, C)
    layer = batchnorm.BatchNorm1d(C, channel_dim=-1).double()
    ref = batchnorm.BatchNorm1d(C).double()
    y = layer(seq, mask=mask)
    torch.testing.assert_close(y, ref(x, mask=mask).movedim(1, -1))
    torch.testing.assert_close(layer.running_var, ref.running_var)


def test_all_true_mask_equals_no_mask() -> None:
    x = torch.randn(5, C, 6, dtype=torch.float64)
    a, b = batchnorm.BatchNorm1d(C).double(), batchnorm.BatchNorm1d(C).double()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa, mask=torch.ones(5, 6, dtype=torch.bool)), b(xb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v)


def test_errors() -> None:
    layer = batchnorm.BatchNorm1d(C)
    x = torch.randn(3, C, 5)
    for bad in (torch.ones(3, 5), torch.ones(3, 4, dtype=torch.bool), torch.ones(3, C, 5, dtype=torch.bool), "m"):
        with pytest.raises(ValueError, match="mask"):
            layer(x, mask=bad)  # type: ignore[arg-type]
    one = torch.zeros(3, 5, dtype=torch.bool)
    one[1, 2] = True
    with pytest.raises(ValueError, match="more than 1 real value"):
        layer(x, mask=one)
    with pytest.raises(ValueError, match="more than 1 real value"):
        batchnorm.batch_norm(x, None, None, training=True, mask=one)
    layer.eval()
    assert layer(x, mask=one)[1, :, 2].abs().sum() > 0  # evaluation: one value is fine


def test_accumulate_uses_real_values_only() -> None:
    layer, ref = batchnorm.BatchNorm1d(C).double(), nn.BatchNorm1d(C).double()
    batches = [_batch((n, C, 5), seed=n) for n in (2, 4)]
    with batchnorm.accumulate_statistics(layer):
        for x, mask in batches:
            layer(x, mask=mask)
    ref(torch.cat([_packed(x, m) for x, m in batches]))
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)


def test_vmap_over_functional() -> None:
    xs = torch.stack([_batch((4, C, 5), seed=s)[0] for s in range(3)])
    masks = torch.stack([_batch((4, C, 5), seed=s)[1] for s in range(3)])
    fn = lambda x, m: batchnorm.batch_norm(x, None, None, training=True, mask=m)  # noqa: E731
    got = torch.vmap(fn)(xs, masks)
    for k in range(3):
        torch.testing.assert_close(got[k], fn(xs[k], masks[k]))


def test_export_and_compile_fullgraph() -> None:
    layer = batchnorm.BatchNorm1d(C).double()
    x, mask = _batch((4, C, 5))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = layer

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.bn(x, mask=mask)

    model = Model()
    expected = batchnorm.BatchNorm1d(C).double()(x, mask=mask)
    program = torch.export.export(model, (x, mask))
    torch.testing.assert_close(program.module()(x, mask), expected)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask), expected)


# ---------------------------------------------------------------------------------------------
# SyncBatchNorm: global masked statistics over two gloo processes on loopback

WORLD = 2


def _sync_worker(rank: int, outdir: str) -> None:
    import datetime
    import gc
    import json
    import os
    import socket
    from pathlib import Path

    import torch.distributed as dist

    if "lo" in {n for _, n in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(outdir, 'rendezvous')}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )
    x, mask = _batch((5, C, 6), seed=7)  # the global batch on every rank; rank r keeps its rows
    rows = slice(0, 2) if rank == 0 else slice(2, 5)
    layer = batchnorm.SyncBatchNorm(C, momentum=0.3).double()
    ref = nn.BatchNorm1d(C, momentum=0.3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, C))
        ref.weight.copy_(layer.weight)
    local = x[rows].clone().requires_grad_()
    packed = _packed(x, mask).clone().requires_grad_()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = layer(local, mask=mask[rows])
    (y * w[rows]).sum().backward()
    yr = ref(packed)
    (yr * _packed(w, mask)).sum().backward()
    dist.all_reduce(layer.weight.grad)
    out = {
        "y_diff": float((y.detach() - _unpack(yr.detach(), mask, x.shape)[rows]).abs().max()),
        "dx_diff": float((local.grad - _unpack(packed.grad, mask, x.shape)[rows]).abs().max()),
        "dw_diff": float((layer.weight.grad - ref.weight.grad).abs().max()),
        "rv_diff": float((layer.running_var - ref.running_var).abs().max()),
        "rm_diff": float((layer.running_mean - ref.running_mean).abs().max()),
    }
    Path(outdir, f"{rank}.json").write_text(json.dumps(out))
    del y, yr  # the autograd graphs that hold the group go before it is torn down (docs/distributed.md)
    gc.collect()
    dist.destroy_process_group()


def _unpack(packed: torch.Tensor, mask: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """(R, C) -> (N, C, *) with zeros at padded positions (inverse of :func:`_packed`)."""
    out = torch.zeros((shape[0], *shape[2:], shape[1]), dtype=packed.dtype)
    out[mask] = packed
    return out.movedim(-1, 1)


@pytest.mark.distributed
def test_sync_masked_statistics_over_processes(tmp_path) -> None:
    import json

    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert len(results) == WORLD
    for r in results:
        for k in ("y_diff", "dx_diff", "dw_diff", "rv_diff", "rm_diff"):
            assert r[k] < 1e-10, (k, r)


def test_gradcheck_and_gradgradcheck() -> None:
    """The closed-form backward of the eager path, and its own derivative, in float64."""
    x, mask = _batch((3, 3, 4), seed=2)
    x = torch.where(mask.unsqueeze(1), x, 0.0).requires_grad_()  # gradcheck perturbs every entry
    w = torch.rand(3, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    fn = lambda x, w, b: batchnorm.batch_norm(x, None, None, w, b, training=True, mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
