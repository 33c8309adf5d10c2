"""Batch-norm speed on CUDA: our Triton kernels and aten's native ops vs torch's BN (cuDNN)
vs ``torch.compile``d torch BN, and a ResNet-50-style training step.

Run: python -m benchmarks.bn_cuda [--peak-gbs 4800] [--dtypes float32,bfloat16] [--quick]
                                  [--json OUT.json] [--skip-compile] [--skip-resnet]

Without a CUDA device it prints one line and returns.

Per shape (those of ``benchmarks.bn_speed`` plus ResNet-50's), dtype and layout (nchw, nhwc),
and per operation:

- ``fwd``: training forward (no graph); ``bwd``: the backward alone; ``fwd+bwd``;
- ``eval``: inference forward;
- ``relu``: BN + ReLU forward and backward; ``add_relu``: relu(BN(x) + residual) forward and
  backward (the candidates other than ``triton`` run BN, then the separate ops).

Candidates: ``torch`` (``F.batch_norm`` with autograd: cuDNN), ``compiled`` (the same function
through ``torch.compile``), ``native`` (``aten.native_batch_norm`` and
``native_batch_norm_backward`` called directly), ``triton`` (``batchnorm._kernels.triton_bn``).
Times are medians of CUDA-event timings over interleaved rounds; GB/s counts the compulsory
traffic (fwd: read x + write y; bwd: read g, x + write dx; ...) against ``--peak-gbs``.
Compare ratios within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES: list[tuple[int, ...]] = [
    (64, 64, 56, 56),
    (256, 256, 14, 14),
    (128, 512, 7, 7),
    (1024, 4096),
    # ResNet-50 at batch 64, 224x224: the BN inputs of the stem and of each stage
    (64, 64, 112, 112),
    (64, 256, 56, 56),
    (64, 128, 28, 28),
    (64, 512, 28, 28),
    (64, 1024, 14, 14),
    (64, 2048, 7, 7),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = ("fwd", "bwd", "fwd+bwd", "eval", "relu", "add_relu")
TRAFFIC = {"fwd": 2, "bwd": 3, "fwd+bwd": 5, "eval": 2, "relu": 5, "add_relu": 7}
"""Compulsory tensor passes of each operation (reads + writes of numel elements)."""


@dataclasses.dataclass
class Config:
    """Benchmark settings."""

    peak_gbs: float = 4800.0
    """The device's peak memory bandwidth in GB/s (H200: 4800; H100 SXM: 3350)."""
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    """Input dtypes."""
    repeats: int = 20
    """Timed interleaved rounds per operation."""
    warmup: int = 3
    """Untimed rounds (compilation, autotuning, cuDNN plans)."""
    quick: bool = False
    """First two shapes only, fewer rounds."""
    compile: bool = True
    """Include the torch.compile candidate."""
    resnet: bool = True
    """Run the ResNet-50-style training step."""
    json_path: str | None = None
    """Write all results as JSON here."""


def _time(fn: Callable[[], object], cfg: Config) -> float:
    """Median milliseconds of ``fn`` (CUDA events)."""
    for _ in range(cfg.warmup):
        fn()
    times = []
    for _ in range(cfg.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _torch_fns(x, res, g, w, b, rm, rv, fn_bn):
    """Closures for the torch-style candidates; ``fn_bn`` is F.batch_norm or its compiled form."""
    xr = x.detach().clone().requires_grad_()
    params = [xr, w, b]

    def fwd():
        with torch.no_grad():
            return fn_bn(x, rm, rv, w, b, True)

    y_keep = fn_bn(xr, rm, rv, w, b, True)

    def bwd():
        return torch.autograd.grad(y_keep, params, g, retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(fn_bn(xr, rm, rv, w, b, True), params, g)

    def evaluate():
        with torch.no_grad():
            return fn_bn(x, rm, rv, w, b, False)

    def relu():
        return torch.autograd.grad(torch.relu(fn_bn(xr, rm, rv, w, b, True)), params, g)

    rr = res.detach().clone().requires_grad_()

    def add_relu():
        return torch.autograd.grad(torch.relu(fn_bn(xr, rm, rv, w, b, True) + rr), [*params, rr], g)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd, "eval": evaluate, "relu": relu, "add_relu": add_relu}


def _bn(x, rm, rv, w, b, training):
    return F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)


def _native_fns(x, res, g, w, b, rm, rv):
    aten = torch.ops.aten
    mask3 = [True, True, True]

    def fwd():
        return aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)

    y, sm, si = fwd()

    def bwd():
        return aten.native_batch_norm_backward(g, x, w, rm, rv, sm, si, True, 1e-5, mask3)

    def fwd_bwd():
        _, m, i = fwd()
        return aten.native_batch_norm_backward(g, x, w, rm, rv, m, i, True, 1e-5, mask3)

    def evaluate():
        return aten.native_batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5)

    def relu():
        yy, m, i = fwd()
        z = torch.relu(yy)
        dy = aten.threshold_backward(g, z, 0)
        return aten.native_batch_norm_backward(dy, x, w, rm, rv, m, i, True, 1e-5, mask3)

    def add_relu():
        yy, m, i = fwd()
        z = torch.relu(yy + res)
        dy = aten.threshold_backward(g, z, 0)
        return aten.native_batch_norm_backward(dy, x, w, rm, rv, m, i, True, 1e-5, mask3), dy

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd, "eval": evaluate, "relu": relu, "add_relu": add_relu}


def _triton_fns(tb, x, res, g, w, b, rm, rv):
    _, mean, var = tb.train_forward(x, w, b, 1e-5)
    invstd = torch.rsqrt(var + 1e-5)

    def fwd_bwd():
        _, m, v = tb.train_forward(x, w, b, 1e-5)
        return tb.backward(g, x, m, torch.rsqrt(v + 1e-5), w)

    def relu():
        _, m, v, mask = tb.train_forward_act(x, w, b, 1e-5, "relu")
        return tb.backward_relu(g, x, m, torch.rsqrt(v + 1e-5), w, mask)

    def add_relu():
        _, m, v, mask = tb.train_forward_act(x, w, b, 1e-5, "relu", residual=res)
        return tb.backward_relu(g, x, m, torch.rsqrt(v + 1e-5), w, mask, residual_grad=True)

    return {
        "fwd": lambda: tb.train_forward(x, w, b, 1e-5),
        "bwd": lambda: tb.backward(g, x, mean, invstd, w),
        "fwd+bwd": fwd_bwd,
        "eval": lambda: tb.eval_forward(x, rm, rv, w, b, 1e-5),
        "relu": relu,
        "add_relu": add_relu,
    }


def bench_shapes(cfg: Config) -> list[dict]:
    from batchnorm._kernels import triton_bn as tb

    compiled_bn = torch.compile(_bn) if cfg.compile else None
    rows = []
    shapes = SHAPES[:2] if cfg.quick else SHAPES
    print(
        f"{'shape':>20} {'dtype':>9} {'layout':>6} {'op':>9} "
        + " ".join(f"{c:>10}" for c in ("torch", "compiled", "native", "triton"))
        + f" {'torch/triton':>12} {'triton GB/s':>11} {'% peak':>7}"
    )
    for shape in shapes:
        for dname in cfg.dtypes:
            dtype = DTYPES[dname]
            for layout in ("nchw", "nhwc") if len(shape) == 4 else ("nc",):
                fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
                x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                res = torch.randn_like(x)
                g = torch.randn_like(x)
                c = shape[1]
                w = torch.rand(c, device="cuda", dtype=dtype).add_(0.5).requires_grad_()
                b = torch.randn(c, device="cuda", dtype=dtype).requires_grad_()
                rm = torch.zeros(c, device="cuda", dtype=dtype)
                rv = torch.ones(c, device="cuda", dtype=dtype)
                cands = {
                    "torch": _torch_fns(x, res, g, w, b, rm, rv, _bn),
                    "native": _native_fns(x, res, g, w.detach(), b.detach(), rm, rv),
                    "triton": _triton_fns(tb, x, res, g, w.detach(), b.detach(), rm, rv),
                }
                if compiled_bn is not None:
                    cands["compiled"] = _torch_fns(x, res, g, w, b, rm, rv, compiled_bn)
                nbytes = x.numel() * x.element_size()
                for op in OPS:
                    ms = {}
                    for name, fns in cands.items():
                        try:
                            ms[name] = _time(fns[op], cfg)
                        except Exception as exc:  # a candidate failing must not hide the others
                            ms[name] = float("nan")
                            print(f"  {name} {op} failed: {type(exc).__name__}: {exc}")
                    gbs = TRAFFIC[op] * nbytes / (ms["triton"] * 1e-3) / 1e9
                    row = {
                        "shape": list(shape),
                        "dtype": dname,
                        "layout": layout,
                        "op": op,
                        "ms": ms,
                        "triton_gbs": gbs,
                        "triton_peak_fraction": gbs / cfg.peak_gbs,
                        "torch_over_triton": ms["torch"] / ms["triton"],
                    }
                    rows.append(row)
                    print(
                        f"{'x'.join(map(str, shape)):>20} {dname:>9} {layout:>6} {op:>9} "
                        + " ".join(
                            f"{ms.get(k, float('nan')):10.4f}" for k in ("torch", "compiled", "native", "triton")
                        )
                        + f" {row['torch_over_triton']:12.2f} {gbs:11.0f} {100 * gbs / cfg.peak_gbs:6.1f}%",
                        flush=True,
                    )
    return rows


# ---------------------------------------------------------------------------------------------
# ResNet-50-style training step (built by hand)


class Bottleneck(torch.nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4) convolutions, each followed by a norm; identity or
    projected shortcut; ReLU after the sum."""

    def __init__(self, cin: int, width: int, stride: int, norm: Callable[[int], torch.nn.Module]) -> None:
        super().__init__()
        cout = width * 4
        self.c1, self.n1 = torch.nn.Conv2d(cin, width, 1, bias=False), norm(width)
        self.c2, self.n2 = torch.nn.Conv2d(width, width, 3, stride, 1, bias=False), norm(width)
        self.c3, self.n3 = torch.nn.Conv2d(width, cout, 1, bias=False), norm(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.n1(self.c1(x)))
        y = torch.relu(self.n2(self.c2(y)))
        y = self.n3(self.c3(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


def resnet50(norm: Callable[[int], torch.nn.Module], classes: int = 1000) -> torch.nn.Module:
    """ResNet-50 layout (3, 4, 6, 3 bottlenecks), every BN made by ``norm``."""
    layers: list[torch.nn.Module] = [
        torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        norm(64),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1, norm))
            cin = width * 4
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(cin, classes)]
    return torch.nn.Sequential(*layers)


def bench_resnet(cfg: Config, batch: int = 64) -> dict:
    import batchnorm

    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device="cuda")
    out = {}
    for name, norm, backend in (
        ("torch BN", torch.nn.BatchNorm2d, None),
        ("ours (default back-end)", batchnorm.BatchNorm2d, "auto"),
        ("ours (triton)", batchnorm.BatchNorm2d, "triton"),
    ):
        torch.manual_seed(0)
        net = resnet50(norm).cuda().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), target)
            loss.backward()
            opt.step()

        try:
            if backend is None:
                out[name] = _time(step, cfg)
            else:
                with batchnorm.use_backend(backend):
                    out[name] = _time(step, cfg)
        except Exception as exc:
            out[name] = float("nan")
            print(f"  resnet step with {name} failed: {type(exc).__name__}: {exc}")
        print(f"ResNet-50 step (batch {batch}, bf16 autocast, channels_last), {name}: {out[name]:.2f} ms", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peak-gbs", type=float, default=Config.peak_gbs)
    p.add_argument("--dtypes", default=",".join(Config.dtypes))
    p.add_argument("--repeats", type=int, default=Config.repeats)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bn_cuda: no CUDA device, nothing measured")
        return
    dtypes = tuple(d for d in a.dtypes.split(",") if d)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"bn_cuda: expected --dtypes among {tuple(DTYPES)}, got {unknown}")
    cfg = Config(
        peak_gbs=a.peak_gbs,
        dtypes=dtypes,
        repeats=5 if a.quick else a.repeats,
        quick=a.quick,
        compile=not a.skip_compile,
        resnet=not a.skip_resnet,
        json_path=a.json,
    )
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, peak {cfg.peak_gbs:.0f} GB/s")
    results = {"device": torch.cuda.get_device_name(), "peak_gbs": cfg.peak_gbs, "shapes": bench_shapes(cfg)}
    if cfg.resnet:
        results["resnet50_ms"] = bench_resnet(cfg)
    if cfg.json_path:
        with open(cfg.json_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {cfg.json_path}")


if __name__ == "__main__":
    main()
