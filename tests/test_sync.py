"""SyncBatchNorm with real torch.distributed (gloo on 127.0.0.1) against single-process BN.

Each rank generates the same global batch, keeps its slice, and compares its SyncBatchNorm
with ``torch.nn.BatchNorm*d`` run on the whole concatenated batch (float64): outputs, input
gradients, weight/bias gradients summed over ranks, running statistics, collective counts.
One spawn of 3 processes runs every layout; a second spawn of 2 checks the missing-peer error.

Run: PYTHONPATH=src python -m pytest -q tests/test_sync.py
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import batchnorm
from batchnorm import SyncBatchNorm, convert_sync_batchnorm

WORLD = 3
# name: (per-rank sizes (by member order), members or None = all, sample shape (C, *spatial), dtype, momentum)
LAYOUTS: dict[str, tuple[list[int], list[int] | None, tuple[int, ...], torch.dtype, float | None]] = {
    "equal": ([4, 4, 4], None, (3, 2, 2), torch.float64, 0.3),
    "uneven": ([3, 5, 1], None, (4,), torch.float64, 0.3),
    "zero_samples": ([4, 0, 3], None, (2, 3), torch.float64, None),
    "subgroup": ([2, 5], [0, 2], (3, 2, 2, 2), torch.float64, 0.1),
    "uneven_float32": ([7, 2, 6], None, (3, 2), torch.float32, 0.3),
}
STEPS = 2
CHECKS = ("forward", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var")
# float32 at mean 100, std 0.1: the global mean is kept in float64 and centring subtracts its
# float32 rounding exactly (torch_ops.center), as single-process BN does; measured <= 3.4e-6
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@contextlib.contextmanager
def _count_collectives():
    """Count calls of torch.distributed collectives, in-place and functional, while inside
    (restored on exit)."""
    import torch.distributed._functional_collectives as funcol

    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter", "barrier")
    saved = {(mod, n): getattr(mod, n) for mod in (dist, funcol) for n in names if hasattr(mod, n)}
    calls: list[str] = []

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return counted

    try:
        for (mod, n), fn in saved.items():
            setattr(mod, n, wrap(n, fn))
        yield calls
    finally:
        for (mod, n), fn in saved.items():
            setattr(mod, n, fn)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0 if a.shape == b.shape else float("inf")
    return float((a.detach().double() - b.detach().double()).abs().max())


def _run_layout(rank: int, name: str, out: dict) -> None:
    sizes, members, sample, dtype, momentum = LAYOUTS[name]
    group = dist.new_group(members) if members is not None else None  # every rank must call it
    members = members if members is not None else list(range(WORLD))
    c = sample[0]
    ref_classes = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm2d, 4: torch.nn.BatchNorm3d}
    ref_cls = ref_classes[len(sample)]
    ours = SyncBatchNorm(c, momentum=momentum, process_group=group).to(dtype)
    if rank not in members:
        try:
            ours(torch.randn(2, *sample, dtype=dtype))
            out[f"{name}/non_member_raises"] = False
        except ValueError as e:
            out[f"{name}/non_member_raises"] = "not a member" in str(e)
        return
    me = members.index(rank)
    lo, hi = sum(sizes[:me]), sum(sizes[: me + 1])
    gen = torch.Generator().manual_seed(1234)
    ref = ref_cls(c, momentum=momentum).double()
    with torch.no_grad():
        w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
        b = torch.randn(c, generator=gen, dtype=torch.float64)
        for m in (ours, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    worst = {k: 0.0 for k in CHECKS}
    counts = []
    for step in range(STEPS):
        # large mean, small spread in float32: the merge must not cancel
        offset, spread = (100.0, 0.1) if dtype == torch.float32 else (step, 1.0 + step)
        xg = (torch.randn(sum(sizes), *sample, generator=gen, dtype=torch.float64) * spread + offset).to(dtype)
        gy = torch.randn(sum(sizes), *sample, generator=gen, dtype=torch.float64)
        xl = xg[lo:hi].clone()
        if xl.dim() == 4:  # the 4-D layout runs channels_last
            xl = xl.contiguous(memory_format=torch.channels_last)
        xl.requires_grad_()
        xr = xg.double().clone().requires_grad_()
        with _count_collectives() as calls:
            y = ours(xl)
            n_forward = len(calls)
            y.backward(gy[lo:hi].to(dtype))
            counts.append((n_forward, len(calls) - n_forward))
        yr = ref(xr)
        yr.backward(gy)
        gw = ours.weight.grad.double().clone()
        gb = ours.bias.grad.double().clone()
        dist.all_reduce(gw, group=group)
        dist.all_reduce(gb, group=group)
        diffs = {
            "forward": _maxdiff(y, yr[lo:hi]),
            "grad_input": _maxdiff(xl.grad, xr.grad[lo:hi]),
            "grad_weight": _maxdiff(gw, ref.weight.grad),
            "running_mean": _maxdiff(ours.running_mean, ref.running_mean),
            "running_var": _maxdiff(ours.running_var, ref.running_var),
        }
        for k, v in diffs.items():
            worst[k] = max(worst[k], v)
        ours.zero_grad()
        ref.zero_grad()
    for k, v in worst.items():
        out[f"{name}/{k}"] = v
    out[f"{name}/collectives"] = counts
    out[f"{name}/num_batches_tracked"] = [int(ours.num_batches_tracked), int(ref.num_batches_tracked)]
    # eval: plain BN with the running statistics, no communication (only the first member runs
    # it; if it communicated it would wait for the others and time out)
    if me == 0:
        ours.eval()
        ref.eval()
        x = torch.randn(5, *sample, generator=gen, dtype=torch.float64).to(dtype)
        with _count_collectives() as calls:
            y = ours(x)
        out[f"{name}/eval_forward"] = _maxdiff(y, ref(x.double()))
        out[f"{name}/eval_collectives"] = len(calls)
    dist.barrier(group=group)


def _run_edge_cases(rank: int, out: dict) -> None:
    """A NaN on one rank: no rank updates its statistics. One value over the
    whole group: every rank outputs the bias and skips the update alike (nothing read back)."""
    m = SyncBatchNorm(2, momentum=0.5)
    x = torch.randn(3, 2)
    if rank == 2:
        x[1, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = m(x)
    out["nonfinite/unchanged"] = bool(
        (m.running_mean == 0).all() and (m.running_var == 1).all() and int(m.num_batches_tracked) == 0
    )
    try:  # PyTorch's own layer in the same situation (gloo initialized, CPU input)
        torch.nn.SyncBatchNorm(2)(torch.randn(3, 2))
        out["torch_syncbn_refuses_cpu"] = False
    except ValueError:
        out["torch_syncbn_refuses_cpu"] = True
    out["nonfinite/warned"] = any("not finite" in str(w.message) for w in caught)
    out["nonfinite/output_nan_everywhere"] = bool(y[:, 0].isnan().all())
    # one value over the whole group: no variance, decided on the device (no rank reads it back):
    # the output is the bias, the running statistics are left alone and the batch counts as skipped
    m1 = SyncBatchNorm(2, momentum=0.5)
    with torch.no_grad():
        m1.bias.fill_(0.25)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        y1 = m1(torch.randn(1 if rank == 0 else 0, 2))
    out["one_value/output_is_bias"] = bool((y1 == 0.25).all())
    out["one_value/skipped"] = bool(
        (m1.running_mean == 0).all() and (m1.running_var == 1).all() and int(m1.num_batches_skipped) == 1
    )


def _run_double_backward(rank: int, out: dict) -> None:
    """A gradient penalty through SyncBatchNorm (create_graph=True) equals the same penalty
    through torch BN on the concatenated batch: P = sum_r |dL/dx_r|^2 with L = sum y * gy."""
    sizes = [3, 0, 4]  # a rank without samples takes part too
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    gen = torch.Generator().manual_seed(5)
    ours = SyncBatchNorm(2).double()
    ref = torch.nn.BatchNorm2d(2).double()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.tensor([0.7, -1.3]))
            m.bias.copy_(torch.tensor([0.2, 0.1]))
    xg = torch.randn(sum(sizes), 2, 3, 2, generator=gen, dtype=torch.float64) * 1.5 + 3
    gy = torch.randn(sum(sizes), 2, 3, 2, generator=gen, dtype=torch.float64)
    xl = xg[lo:hi].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:  # e.g. a deprecated torch collective
        warnings.simplefilter("always")
        (gx,) = torch.autograd.grad((ours(xl) * gy[lo:hi]).sum(), xl, create_graph=True)
        gx.square().sum().backward()
    out["double_backward/warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    xr = xg.clone().requires_grad_()
    (gxr,) = torch.autograd.grad((ref(xr) * gy).sum(), xr, create_graph=True)
    gxr.square().sum().backward()
    gw = ours.weight.grad.clone()
    dist.all_reduce(gw)
    # dL/dx does not depend on the bias, so neither layer gives it a gradient
    out["double_backward/no_bias_grad"] = ours.bias.grad is None and ref.bias.grad is None
    out["double_backward/diffs"] = {
        "first_grad": _maxdiff(gx, gxr[lo:hi]),
        "grad_input": _maxdiff(xl.grad, xr.grad[lo:hi]),
        "grad_weight": _maxdiff(gw, ref.weight.grad),
    }
    out["double_backward/scale"] = float(xr.grad.abs().max())


def _run_traced(rank: int, out: dict) -> None:
    """A torch.fx graph of a model with SyncBatchNorm synchronizes like the module: compared
    with the untraced module on the same local batch and with torch BN on the global batch."""
    sizes = [3, 5, 2]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    gen = torch.Generator().manual_seed(99)
    torch.manual_seed(7)  # the same Linear on every rank
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), SyncBatchNorm(3, momentum=0.4)).double()
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3, momentum=0.4)).double()
    ref.load_state_dict(model.state_dict())
    with _count_collectives() as calls:
        graph = torch.fx.symbolic_trace(model)  # shares parameters and buffers with model
    out["traced/trace_collectives"] = len(calls)
    out["traced/nodes"] = [
        type(graph.get_submodule(n.target)).__name__ for n in graph.graph.nodes if n.op == "call_module"
    ]
    worst = 0.0
    for _ in range(2):
        xg = torch.randn(sum(sizes), 4, generator=gen, dtype=torch.float64) * 2 + 1
        xl = xg[lo:hi].clone().requires_grad_()
        yl = graph(xl)
        yl.square().sum().backward()
        xr = xg.clone().requires_grad_()
        yr = ref(xr)
        yr.square().sum().backward()
        gw = model[1].weight.grad.clone()
        dist.all_reduce(gw)
        diffs = {
            "forward": _maxdiff(yl, yr[lo:hi]),
            "grad_input": _maxdiff(xl.grad, xr.grad[lo:hi]),
            "grad_weight": _maxdiff(gw, ref[1].weight.grad),
            "running_var": _maxdiff(model[1].running_var, ref[1].running_var),
        }
        out["traced/diffs"] = diffs
        worst = max(worst, *diffs.values())
        model.zero_grad()
        ref.zero_grad()
    out["traced/max_diff"] = worst
    out["traced/num_batches_tracked"] = int(model[1].num_batches_tracked)


def _worker(rank: int, outdir: str, scenario: str) -> None:
    torch.set_num_threads(1)
    world = WORLD if scenario == "layouts" else 2
    timeout = datetime.timedelta(seconds=30 if scenario == "layouts" else 3)
    if "lo" in {name for _, name in socket.if_nameindex()}:  # this child only: talk over loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # rendezvous through a file (no port to pick and race for)
    store = f"file://{Path(outdir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=timeout)
    out: dict = {}
    if scenario == "layouts":
        for name in LAYOUTS:
            _run_layout(rank, name, out)
        _run_edge_cases(rank, out)
        _run_traced(rank, out)
        _run_double_backward(rank, out)
        Path(outdir, f"{rank}.json").write_text(json.dumps(out))
        gc.collect()  # free autograd graphs that still hold the group before tearing it down
        dist.destroy_process_group()
        return
    # missing peer: rank 1 never calls the layer; rank 0 must fail after the 3 s timeout
    if rank == 0:
        m = SyncBatchNorm(2)
        t0 = time.monotonic()
        try:
            m(torch.randn(4, 2))
            out["error"] = ""
        except RuntimeError as e:
            out["error"] = str(e)
        out["seconds"] = time.monotonic() - t0
        Path(outdir, "0.json").write_text(json.dumps(out))
    else:  # stay alive (so rank 0 sees a timeout, not a closed connection) until rank 0 is done
        deadline = time.monotonic() + 20
        while not Path(outdir, "0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    os._exit(0)  # a process group whose collective timed out cannot be torn down cleanly


def _spawn(scenario: str, nprocs: int, tmp: Path) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp), scenario), nprocs=nprocs, join=True)
    return [json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))]


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory) -> list[dict]:
    return _spawn("layouts", WORLD, tmp_path_factory.mktemp("sync_layouts"))


@pytest.mark.distributed
@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_single_process_bn_on_concatenated_batch(layout_results, layout, check):
    tol = TOL[LAYOUTS[layout][3]]
    values = [r[f"{layout}/{check}"] for r in layout_results if f"{layout}/{check}" in r]
    members = LAYOUTS[layout][1] or list(range(WORLD))
    assert len(values) == len(members)
    assert max(values) <= tol, (layout, check, values)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_collective_per_pass_and_none_in_eval(layout_results, layout):
    members = LAYOUTS[layout][1] or list(range(WORLD))
    for rank in members:
        r = layout_results[rank]
        assert r[f"{layout}/collectives"] == [[1, 1]] * STEPS
        assert r[f"{layout}/num_batches_tracked"] == [STEPS, STEPS]
    first = layout_results[members[0]]
    assert first[f"{layout}/eval_collectives"] == 0
    assert first[f"{layout}/eval_forward"] <= TOL[LAYOUTS[layout][3]]


@pytest.mark.distributed
def test_runs_on_cpu_where_torch_syncbatchnorm_refuses(layout_results):
    # the layouts above ran on CPU tensors; torch.nn.SyncBatchNorm raises there
    assert all(r["torch_syncbn_refuses_cpu"] is True for r in layout_results)
    assert all(r["equal/forward"] <= 1e-10 for r in layout_results)


@pytest.mark.distributed
def test_non_member_of_subgroup_is_refused(layout_results):
    assert layout_results[1]["subgroup/non_member_raises"] is True


@pytest.mark.distributed
def test_nonfinite_rank_and_one_value(layout_results):
    for r in layout_results:
        assert r["nonfinite/unchanged"] is True
        assert r["nonfinite/warned"] is True
        assert r["nonfinite/output_nan_everywhere"] is True  # the global mean is NaN
        assert r["one_value/output_is_bias"] is True
        assert r["one_value/skipped"] is True


@pytest.mark.distributed
def test_gradient_penalty_matches_single_process(layout_results):
    for r in layout_results:
        assert r["double_backward/scale"] > 0.1  # the penalty's gradient is not trivially zero
        assert r["double_backward/no_bias_grad"] is True
        assert r["double_backward/warnings"] == []
        for name, d in r["double_backward/diffs"].items():
            assert d < 1e-10, (name, r["double_backward/diffs"])


@pytest.mark.distributed
def test_fx_traced_graph_synchronizes(layout_results):
    for r in layout_results:
        assert r["traced/trace_collectives"] == 0  # tracing itself does not communicate
        assert r["traced/nodes"] == ["Linear", "SyncBatchNorm"]  # one node: the layer itself
        assert r["traced/max_diff"] < 1e-10, r["traced/diffs"]  # per-rank BN would differ by O(1) here
        assert r["traced/num_batches_tracked"] == 2


def test_fx_trace_without_process_group_decides_at_run_time() -> None:
    """Traced with no process group, the graph calls the layer, which synchronizes or not when
    the graph runs: here (no group) it is plain BN. A layer with its own group traces in any
    mode (the group stays on the module, not in the graph)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), SyncBatchNorm(3))
    graph = torch.fx.symbolic_trace(model)
    targets = [n.target for n in graph.graph.nodes if n.op in ("call_module", "call_function")]
    assert targets == ["0", "1"] and graph.get_submodule("1") is model[1]
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ref.load_state_dict(model.state_dict())
    x = torch.randn(6, 4)
    torch.testing.assert_close(graph(x), ref(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)
    grouped = SyncBatchNorm(3, process_group="a group")  # type: ignore[arg-type]
    for training in (True, False):
        traced = torch.fx.symbolic_trace(torch.nn.Sequential(grouped).train(training))
        assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0"]
        assert traced.get_submodule("0").process_group == "a group"


@pytest.mark.distributed
def test_missing_peer_fails_with_clear_error_not_hang(tmp_path):
    (result,) = _spawn("missing_peer", 2, tmp_path)
    assert "did not join within the process group's timeout" in result["error"]
    assert "SyncBatchNorm(2)" in result["error"]
    assert result["seconds"] < 15


def test_single_process_is_plain_batchnorm():
    assert not dist.is_initialized()
    ours = SyncBatchNorm(3, momentum=0.2)
    ref = torch.nn.BatchNorm2d(3, momentum=0.2)
    for _ in range(2):
        x = torch.randn(4, 3, 2, 2) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.testing.assert_close(ours(xa), ref(xb))
        ours(xa).sum().backward()
        ref(xb).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    with pytest.raises(RuntimeError, match="not initialized"):
        batchnorm.sync_batch_norm(torch.randn(4, 3), None, None)


def test_convert_sync_batchnorm_keeps_state_and_returns_copy():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 1),
        torch.nn.BatchNorm2d(3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        batchnorm.BatchNorm1d(12),
        batchnorm.GhostBatchNorm1d(12, 2),
    ).double()
    model(torch.randn(8, 2, 2, 2, dtype=torch.float64))
    model[1].weight.requires_grad_(False)
    model.eval()
    x = torch.randn(5, 2, 2, 2, dtype=torch.float64)
    want = model(x)
    conv = convert_sync_batchnorm(model)
    assert type(conv[1]) is SyncBatchNorm and type(conv[4]) is SyncBatchNorm
    assert type(conv[5]) is batchnorm.GhostBatchNorm1d  # subclasses are left alone
    assert type(model[1]) is torch.nn.BatchNorm2d  # the original is untouched
    assert conv[1].weight.dtype == torch.float64 and not conv[1].weight.requires_grad and not conv.training
    assert conv.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(conv.state_dict()[k], v)
    torch.testing.assert_close(conv(x), want)
    single = convert_sync_batchnorm(torch.nn.BatchNorm1d(4), process_group="g")  # type: ignore[arg-type]
    assert isinstance(single, SyncBatchNorm) and single.process_group == "g"
    with pytest.raises(TypeError, match="nn.Module"):
        convert_sync_batchnorm("model")  # type: ignore[arg-type]


@pytest.mark.distributed
def test_ddp_example_under_torchrun_matches_single_process():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(root / "examples" / "ddp_syncbn.py"),
        "--steps",
        "6",
        "--global-batch",
        "15",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
    d_sync = float(re.search(r"SyncBatchNorm vs single process: (\S+)", proc.stdout).group(1))
    d_local = float(re.search(r"per-rank BatchNorm vs single process: (\S+)", proc.stdout).group(1))
    assert d_sync <= 1e-4 and d_local > 100 * d_sync  # the comparison can tell sync from no sync


def test_convert_sync_batchnorm_keeps_a_shared_layer_shared() -> None:
    bn = torch.nn.BatchNorm1d(3)
    converted = batchnorm.convert_sync_batchnorm(torch.nn.Sequential(bn, torch.nn.ReLU(), bn))
    assert isinstance(converted[0], batchnorm.SyncBatchNorm)
    assert converted[0] is converted[2]
