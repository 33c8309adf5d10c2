"""SyncBatchNorm under a real gloo process group (2 processes): the integration points.

Each rank holds its slice of one global batch; the eager SyncBatchNorm on each rank is the
reference for compile (default and fullgraph), explain (no graph break), export, jit.trace and
the no-host-read step; torch's BatchNorm on the concatenated batch checks the eager layer
itself. One spawn runs every check; each records its first error line, so one failure does not
hide the others.

Run: .venv/bin/python -m pytest -q -m distributed tests/integration/test_sync_gloo.py
"""

from __future__ import annotations

import copy
import datetime
import gc
import json
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import batchnorm

pytestmark = pytest.mark.distributed

WORLD = 2
SHAPE = (3, 3, 2, 2)  # per rank
CHECKS = [
    "eager_vs_torch_bn",
    "compile_default",
    "compile_fullgraph",
    "explain",
    "export_train",
    "jit_trace",
    "no_host_read",
]


def _global_batches(steps: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn((WORLD * SHAPE[0],) + SHAPE[1:], generator=g) * 2 + 0.5 for _ in range(steps)]


def _layer() -> torch.nn.Module:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from integration._cases import randomize_state

    m = batchnorm.SyncBatchNorm(3, momentum=None)
    randomize_state(m, 0)
    return m


def _steps(call, owner: torch.nn.Module, xs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    out = []
    for x in xs:
        x = x.clone().requires_grad_()
        for p in owner.parameters():
            p.grad = None
        y = call(x)
        (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
        rec = {"output": y.detach().clone(), "grad_input": x.grad.clone()}
        rec.update({f"grad_{k}": p.grad.clone() for k, p in owner.named_parameters()})
        rec.update({k: v.detach().clone() for k, v in owner.named_buffers()})
        out.append(rec)
    return out


def _diff(a: list[dict], b: list[dict]) -> float:
    return max(float((x[k].double() - y[k].double()).abs().max()) for x, y in zip(a, b) for k in x)


def _run_checks(rank: int) -> dict[str, str]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from integration.test_no_host_sync import forbid_host_reads

    xs_global = _global_batches()
    xs = [x[rank * SHAPE[0] : (rank + 1) * SHAPE[0]] for x in xs_global]
    fresh = _layer()
    eager = copy.deepcopy(fresh)
    want = _steps(eager, eager, xs)
    out: dict[str, str] = {}

    def record(name: str, fn) -> None:
        try:
            fn()
            out[name] = ""
        except BaseException as e:  # noqa: BLE001 - reported per check
            out[name] = f"{type(e).__name__}: " + next((ln for ln in str(e).splitlines() if ln.strip()), "")

    def vs_torch() -> None:
        ref = torch.nn.BatchNorm2d(3, momentum=None)
        ref.load_state_dict(fresh.state_dict())
        for i, xg in enumerate(xs_global):
            y = ref(xg)
            mine = y[rank * SHAPE[0] : (rank + 1) * SHAPE[0]]
            torch.testing.assert_close(want[i]["output"], mine.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(want[-1]["running_var"], ref.running_var, rtol=1e-5, atol=1e-5)

    def compiled(fullgraph: bool) -> None:
        torch._dynamo.reset()
        owner = copy.deepcopy(fresh)
        got = _steps(torch.compile(owner, fullgraph=fullgraph), owner, xs)
        d = _diff(got, want)
        assert d < 1e-5, f"compiled vs eager max |diff| {d:.3g}"

    def explain() -> None:
        torch._dynamo.reset()
        e = torch._dynamo.explain(copy.deepcopy(fresh))(xs[0])
        reasons = [str(r.reason).splitlines()[0] for r in e.break_reasons]
        assert e.graph_break_count == 0, f"{e.graph_break_count} graph breaks: {reasons}"

    def export() -> None:
        ep = torch.export.export(copy.deepcopy(fresh), (xs[0],))
        gm = ep.module()
        d = _diff(_steps(gm, gm, xs), want)
        assert d < 1e-5, f"exported vs eager max |diff| {d:.3g}"

    def trace() -> None:
        owner = copy.deepcopy(fresh)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(owner, xs[0], check_trace=False)
        ref = copy.deepcopy(fresh)
        with torch.no_grad():
            ref(xs[0])
        d = _diff(_steps(traced, traced, xs[1:]), _steps(ref, ref, xs[1:]))
        assert d < 1e-5, f"traced vs eager max |diff| {d:.3g}"

    def no_host_read() -> None:
        m = copy.deepcopy(fresh)
        m(xs[0]).sum().backward()
        with forbid_host_reads():
            m(xs[1]).sum().backward()

    record("eager_vs_torch_bn", vs_torch)
    record("compile_default", lambda: compiled(False))
    record("compile_fullgraph", lambda: compiled(True))
    record("explain", explain)
    record("export_train", export)
    record("jit_trace", trace)
    record("no_host_read", no_host_read)
    return out


def _worker(rank: int, outdir: str) -> None:
    torch.set_num_threads(1)
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = f"file://{Path(outdir, 'rendezvous')}"
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    out = _run_checks(rank)
    Path(outdir, f"{rank}.json").write_text(json.dumps(out))
    gc.collect()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("sync_gloo")
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return [json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))]


@pytest.mark.parametrize("check", CHECKS)
def test_sync_batchnorm_under_gloo(results: list[dict[str, str]], check: str) -> None:
    assert len(results) == WORLD
    errors = {rank: r[check] for rank, r in enumerate(results) if r[check]}
    assert not errors, f"{check}: {errors}"
