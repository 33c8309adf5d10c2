"""Parity report: max relative difference between our layers and torch.nn.BatchNorm*d.

    python -m benchmarks.parity

Over shapes (N,C), (N,C,L), (N,C,H,W) NCHW and channels_last, (N,C,D,H,W), options (default,
momentum=None, affine=False, track_running_stats=False), 5 training steps then eval: outputs,
input/weight/bias gradients and running statistics, per dtype.
"""

from __future__ import annotations

import torch
from torch import nn

import batchnorm

CASES = [
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (64, 16), None),
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (32, 16, 20), None),
    (batchnorm.BatchNorm2d, nn.BatchNorm2d, (16, 16, 12, 12), None),
    (batchnorm.BatchNorm2d, nn.BatchNorm2d, (16, 16, 12, 12), torch.channels_last),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d, (4, 16, 6, 6, 6), None),
]
OPTIONS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def worst(dtype: torch.dtype) -> dict[str, float]:
    """Max relative difference per quantity over all cases and options."""
    out = {"output": 0.0, "grad": 0.0, "running": 0.0, "eval": 0.0}
    for ours, theirs, shape, fmt in CASES:
        for opts in OPTIONS:
            torch.manual_seed(0)
            a = ours(shape[1], **opts).to(dtype if dtype == torch.float64 else torch.float32)
            b = theirs(shape[1], **opts).to(a.running_mean.dtype if a.running_mean is not None else dtype)
            b.load_state_dict(a.state_dict())
            for step in range(5):
                x = (torch.randn(shape) * (step + 1) + step).to(dtype)
                if fmt is not None:
                    x = x.contiguous(memory_format=fmt)
                xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
                ya, yb = a(xa), b(xb)
                g = torch.randn_like(ya)
                ga = torch.autograd.grad(ya, [xa, *a.parameters()], g)
                gb = torch.autograd.grad(yb, [xb, *b.parameters()], g)
                out["output"] = max(out["output"], _rel(ya, yb))
                out["grad"] = max(out["grad"], *(_rel(u, v) for u, v in zip(ga, gb)))
                for k, v in a.state_dict().items():
                    if v.is_floating_point():
                        out["running"] = max(out["running"], _rel(v, b.state_dict()[k]))
            a.eval()
            b.eval()
            x = torch.randn(shape).to(dtype)
            out["eval"] = max(out["eval"], _rel(a(x), b(x)))
    return out


def main() -> None:
    print(
        f"{'dtype':10s} {'output':>10s} {'grads':>10s} {'running':>10s} {'eval':>10s}   (max relative difference vs torch)"
    )
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        w = worst(dtype)
        print(
            f"{str(dtype).split('.')[-1]:10s} {w['output']:10.1e} {w['grad']:10.1e} {w['running']:10.1e} {w['eval']:10.1e}"
        )


if __name__ == "__main__":
    main()
