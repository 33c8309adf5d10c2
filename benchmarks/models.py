"""Whole training steps: torch's batch norm against ours (``batchnorm.convert``), eager and compiled.

    PYTHONPATH=src python -m benchmarks.models [--quick] [--rounds 5] [--steps 10] [--nets mlp,resnet18,lab]
                                                [--no-compile] [--threads N]

A training step is ``opt.zero_grad(); loss = cross_entropy(model(x), y); loss.backward();
opt.step()`` with plain SGD (lr 0.01) on a fixed random batch, the model in training mode (batch
statistics, running statistics updated). Networks:

- ``mlp``: 4 hidden layers of 256 (Linear - BatchNorm1d - ReLU), 256 inputs, 10 classes,
  batch 256;
- ``resnet18``: a ResNet-18-style net for small images (3x3 stem without max-pool, 4 stages of
  2 basic blocks with widths w, 2w, 4w, 8w, 1x1 conv-BN shortcuts, 20 BatchNorm2d), w = 64 with
  batch 32 at 32x32 (``--quick``: w = 16, batch 16 at 32x32);
- ``lab``: the lab's small-batch network (:class:`batchnorm.lab.models.MLP`: 64 inputs, 3 hidden
  layers of 100 with batch norm before each ReLU, bias-free hidden Linears, 10 classes), batch 32.

Each network is built once with ``torch.nn.BatchNorm*d``; ``batchnorm.convert`` makes the copy
with our layers (same parameters). Four candidates per network: torch / ours, each eager and
under ``torch.compile`` (default mode; compile time and a few warm-up steps excluded). They are
timed interleaved: a round runs ``--steps`` steps of each candidate in turn (order rotated per
round), every step timed alone; the table shows the median step time over all rounds and the
ratio ours/torch (< 1: ours is faster) with its 95% interval over the rounds (``ratios``: the
rounds' median step times, paired by round). Machines shared with other work are noisy: compare
the ratios of one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import batchnorm
from batchnorm.lab.models import MLP

from .ratios import ratio

__all__ = ["NETS", "Net", "build", "mlp", "resnet18", "lab_net", "make_step", "measure", "main"]


@dataclass
class Net:
    """A network and its fixed batch: ``model(x)`` are logits for the targets ``y``."""

    model: nn.Module
    x: Tensor
    y: Tensor
    label: str


def mlp(batch: int = 256, width: int = 256, depth: int = 4, classes: int = 10) -> Net:
    """``depth`` x (Linear(width) - BatchNorm1d - ReLU), then Linear(classes); input (batch, width)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return Net(nn.Sequential(*layers), x, y, f"MLP {depth}x{width}, batch {batch}")


class _Basic(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


def resnet18(batch: int = 32, width: int = 64, size: int = 32, classes: int = 10) -> Net:
    """ResNet-18 for small images: stem conv3x3(width)-BN-ReLU, stages of 2 basic blocks with
    widths (w, 2w, 4w, 8w) and strides (1, 2, 2, 2), global average pool, Linear; input
    (batch, 3, size, size)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
        cout = width * mult
        layers += [_Basic(cin, cout, stride), _Basic(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return Net(nn.Sequential(*layers), x, y, f"ResNet-18 (w={width}), batch {batch}x3x{size}x{size}")


def lab_net(batch: int = 32, features: int = 64, hidden: int = 100, classes: int = 10) -> Net:
    """The lab's small-batch network: MLP(features, [hidden] * 3, classes), BatchNorm1d before each ReLU."""
    model = MLP(features, [hidden] * 3, classes, act="relu", norm=lambda c: nn.BatchNorm1d(c))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, features, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return Net(model, x, y, f"lab small-batch MLP 3x{hidden}, batch {batch}")


NETS: dict[str, Callable[[bool], Net]] = {
    "mlp": lambda quick: mlp(),
    "resnet18": lambda quick: resnet18(batch=16, width=16) if quick else resnet18(),
    "lab": lambda quick: lab_net(),
}
"""Benchmark networks by name; each builder takes ``quick``."""


def build(name: str, quick: bool) -> Net:
    """The network ``name`` (one of :data:`NETS`) at its quick or full size."""
    if name not in NETS:
        raise ValueError(f"benchmarks.models: expected a network in {sorted(NETS)}, got {name!r}")
    torch.manual_seed(0)
    return NETS[name](quick)


def make_step(model: nn.Module, x: Tensor, y: Tensor, *, compiled: bool) -> Callable[[], float]:
    """One SGD training step of ``model`` on (x, y) per call; returns the loss.

    ``compiled``: the forward (and, through AOTAutograd, the backward) runs under
    ``torch.compile(model)``; the optimizer step stays eager.
    """
    model.train()
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def measure(
    net: Net, *, rounds: int, steps: int, compile_too: bool = True, warmup: int = 3
) -> dict[str, list[list[float]]]:
    """{candidate: per round, the seconds of each of its ``steps`` steps} for candidates "torch
    eager", "ours eager" and, with ``compile_too``, "torch compiled", "ours compiled"; timed
    interleaved (see module docstring)."""
    torch_model = net.model
    ours_model = batchnorm.convert(torch_model)
    models = {"torch": torch_model, "ours": ours_model}
    modes = ("eager", "compiled") if compile_too else ("eager",)
    steps_of: dict[str, Callable[[], float]] = {}
    for mode in modes:
        for kind, model in models.items():
            # every candidate trains its own copy: the four start from the same parameters
            steps_of[f"{kind} {mode}"] = make_step(
                batchnorm.convert(model, to="batchnorm" if kind == "ours" else "torch"),
                net.x,
                net.y,
                compiled=mode == "compiled",
            )
    for fn in steps_of.values():  # compiles here; warm-up excluded from the timings
        for _ in range(warmup):
            fn()
    times: dict[str, list[list[float]]] = {name: [] for name in steps_of}
    names = list(steps_of)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = steps_of[name]
            times[name].append([])
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                times[name][-1].append(time.perf_counter() - t0)
    return times


def _median_ms(rounds: list[list[float]]) -> float:
    """The median step time over all rounds, in milliseconds."""
    return statistics.median(t for one in rounds for t in one) * 1e3


def _table(rows: list[tuple[str, dict[str, list[list[float]]]]], modes: tuple[str, ...]) -> str:
    head = f"{'network':<44}" + "".join(
        f" | {m + ' torch':>14} {m + ' ours':>13} {'ours/torch [95% interval]':>26}" for m in modes
    )
    lines = [head, "-" * len(head)]
    for label, t in rows:
        cells = ""
        for m in modes:
            ours, theirs = t[f"ours {m}"], t[f"torch {m}"]
            r, lo, hi = ratio([statistics.median(one) for one in ours], [statistics.median(one) for one in theirs])
            cells += f" | {_median_ms(theirs):11.2f} ms {_median_ms(ours):10.2f} ms {r:9.3f}x [{lo:.3f}, {hi:.3f}]"
        lines.append(f"{label:<44}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller ResNet, fewer rounds (about 2 minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per candidate per round (default 10, quick 5)"
    )
    parser.add_argument("--nets", default=",".join(NETS), help=f"comma-separated subset of {','.join(NETS)}")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first (default: as is)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 5)
    steps = args.steps if args.steps is not None else (5 if args.quick else 10)
    names = [n for n in args.nets.split(",") if n]
    modes = ("eager",) if args.no_compile else ("eager", "compiled")
    print(
        f"training step (fwd + bwd + SGD), {torch.get_num_threads()} thread(s), back-end {batchnorm.get_backend()!r}, "
        f"median of {rounds} rounds x {steps} steps, interleaved; ratio: geometric mean of the rounds' ratios"
    )
    rows = []
    for name in names:
        net = build(name, args.quick)
        t0 = time.perf_counter()
        result = measure(net, rounds=rounds, steps=steps, compile_too=not args.no_compile)
        rows.append((net.label, result))
        print(f"  {name}: measured in {time.perf_counter() - t0:.0f} s (compilation included)", flush=True)
    print(_table(rows, modes))


if __name__ == "__main__":
    main()
