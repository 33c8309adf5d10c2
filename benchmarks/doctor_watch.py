"""What ``batchnorm.watch`` adds to a training step: the same step with and without a watch.

    PYTHONPATH=src python -m benchmarks.doctor_watch [--rounds 5] [--steps 20] [--nets mlp,resnet18,lab]
                                                     [--threads N]

Networks and step from :mod:`benchmarks.models` (SGD step: zero_grad, forward, cross-entropy,
backward, step; ``resnet18`` at its quick size), each with torch's batch norm and with ours
(``batchnorm.convert``). Two copies of each start from the same parameters; one trains inside
``batchnorm.watch`` for the whole run. They are timed interleaved: a round runs ``--steps`` steps
of each, one plain and one watched step back to back (order alternating), every step timed
alone; the table shows the median step times and the overhead, the median over all pairs of
``watched / plain - 1`` (pairing cancels most of the load changes of a shared machine). Compare
the columns of one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import batchnorm
from benchmarks import models


def measure(net: models.Net, *, rounds: int, steps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per training step of ``net.model`` without ("plain") and with ("watched") a
    watch, and the median of the per-pair ratios watched / plain ("ratio")."""
    plain = copy.deepcopy(net.model)
    watched = copy.deepcopy(net.model)
    step = {
        "plain": models.make_step(plain, net.x, net.y, compiled=False),
        "watched": models.make_step(watched, net.x, net.y, compiled=False),
    }
    times: dict[str, list[float]] = {name: [] for name in step}
    ratios: list[float] = []
    with batchnorm.watch(watched) as w:
        for fn in step.values():
            for _ in range(warmup):
                fn()
        for r in range(rounds):
            for i in range(steps):
                pair = {}
                # one step of each, back to back (order alternating): load changes hit both alike
                for name in ("plain", "watched") if (r + i) % 2 == 0 else ("watched", "plain"):
                    t0 = time.perf_counter()
                    step[name]()
                    pair[name] = time.perf_counter() - t0
                    times[name].append(pair[name])
                ratios.append(pair["watched"] / pair["plain"])
    if w.findings:  # the benchmark steps are healthy: a finding here would be a false alarm
        raise RuntimeError(f"doctor_watch: unexpected findings {[str(f) for f in w.findings]}")
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out["ratio"] = statistics.median(ratios)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="step pairs per round (default 20)")
    parser.add_argument("--nets", default=",".join(models.NETS), help=f"subset of {','.join(models.NETS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first (default: as is)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"training step with and without batchnorm.watch, {torch.get_num_threads()} thread(s), "
        f"median of {args.rounds} rounds x {args.steps} steps, interleaved"
    )
    head = f"{'network':<44} {'layers':<7} {'BN':>3} {'plain':>10} {'watched':>10} {'overhead':>9}"
    print(head)
    print("-" * len(head))
    for name in [n for n in args.nets.split(",") if n]:
        net = models.build(name, quick=True)
        for layers in ("torch", "ours"):
            model = batchnorm.convert(net.model, to="torch" if layers == "torch" else "batchnorm")
            n_bn = sum(1 for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
            t = measure(models.Net(model, net.x, net.y, net.label), rounds=args.rounds, steps=args.steps)
            overhead = t["ratio"] - 1
            print(
                f"{net.label:<44} {layers:<7} {n_bn:>3} {t['plain'] * 1e3:>7.3f} ms {t['watched'] * 1e3:>7.3f} ms "
                f"{overhead * 100:>+8.1f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
