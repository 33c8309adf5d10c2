"""Folding: CPU inference time of a ResNet-style conv net before and after ``batchnorm.fold``.

    PYTHONPATH=src python -m benchmarks.bench_fold [--repeats 15] [--threads 1] [--batch 16] [--layout both]

``--layout nhwc`` runs everything in channels_last, the faster CPU layout for convolutions.

The net (stem, 3 stages of 2 basic blocks each with conv-BN-ReLU-conv-BN + skip, 1x1
downsampling conv-BN, 20 BN layers, bias-free convs as in ResNet) runs in eval mode on
``--batch`` x 3 x 64 x 64 inputs, with torch's BatchNorm2d and with ours. The unfolded and
folded models are timed interleaved in the same run (warm-up first); medians are reported with
the ratio and the max relative error max |y_fold - y| / max |y| of the outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from batchnorm import BatchNorm2d, fold


def bn_for(kind: str, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if kind == "torch" else BatchNorm2d(c)


class Block(nn.Module):
    """Basic residual block; a 1x1 conv + BN on the skip path when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, kind: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn_for(kind, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = bn_for(kind, cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), bn_for(kind, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        return torch.relu(skip + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet(kind: str) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False), bn_for(kind, 16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        layers += [Block(cin, cout, stride, kind), Block(cout, cout, 1, kind)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def measure(kind: str, batch: int, repeats: int, channels_last: bool) -> None:
    model = resnet(kind)
    result = fold(model)
    folded = result.model
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    if channels_last:
        fmt = torch.channels_last
        model = model.to(memory_format=fmt)
        folded = folded.to(memory_format=fmt)
        x = x.to(memory_format=fmt)
    times: dict[str, list[float]] = {"unfolded": [], "folded": []}
    with torch.inference_mode():
        want = model(x)
        got = folded(x)
        err = float((got - want).abs().max() / want.abs().max())
        for _ in range(2):  # warm-up
            model(x)
            folded(x)
        for _ in range(repeats):
            for name, m in (("unfolded", model), ("folded", folded)):
                t0 = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t0)
    a = statistics.median(times["unfolded"])
    b = statistics.median(times["folded"])
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    print(
        f"{kind + ' BN':<9} {'NHWC' if channels_last else 'NCHW'} {n_bn:>3} BN, {len(result.folded):>2} folded, {len(result.skipped)} kept | "
        f"unfolded {a * 1e3:7.2f} ms  folded {b * 1e3:7.2f} ms  speed-up {a / b:5.2f}x | max rel err {err:.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--layout", choices=("nchw", "nhwc", "both"), default="both", help="memory format (nhwc = channels_last)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"ResNet-style net, input {args.batch}x3x64x64, {torch.get_num_threads()} thread(s), median of {args.repeats}"
    )
    layouts = {"nchw": [False], "nhwc": [True], "both": [False, True]}[args.layout]
    for channels_last in layouts:
        for kind in ("torch", "ours"):
            measure(kind, args.batch, args.repeats, channels_last)


if __name__ == "__main__":
    main()
