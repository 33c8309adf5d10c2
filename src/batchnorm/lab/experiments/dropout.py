"""``dropout``: BN as a regularizer (Ioffe & Szegedy 2015, §3.4 and §4.2.1) — the
generalization of plain, dropout, BN, BN+dropout and BN with a fixed batch composition on a
small training set, judged over seeds.
Setup, the rules fixed before any run and each setting's source: ``dropout.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._replicates import mean_over_replicates, replicate_seed
from ..claims_spec import Claims
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import seeded
from ..experiment import Experiment, column, load_for
from ..models import MLP
from ..progress import Progress
from ..stacked import train_stacked
from ..training import TrainSpec, evaluate, minibatches
from ..verdict import part
from ._calibration import CALIBRATION_SEED

ID = "dropout"
DESCRIPTION = "BN as a regularizer: test loss and accuracy on 400 examples for plain, dropout, BN, BN+dropout, fixed batches (over seeds)"
QUICK_SECONDS = 30.0
_ARMS = (
    ("plain", None, 0.0, False),
    ("dropout 0.5", None, 0.5, False),
    ("BN", "bn", 0.0, False),
    ("BN + dropout 0.5", "bn", 0.5, False),
    ("BN + dropout 0.1", "bn", 0.1, False),
    ("BN, fixed batches", "bn", 0.0, True),
)
_REPLICATES = {"tiny": 2, "quick": 3, "full": 3}
_MAX_STEPS = {"tiny": 40, "quick": 1600, "full": 16000}


@dataclass(frozen=True)
class Settings:
    """Every choice of this experiment (each field's meaning and source: ``dropout.md``)."""

    replicates: int
    max_steps: int
    steps: int = 0
    steps_rule: str = (
        "train every arm on the calibration seed's 400 examples until its training accuracy reaches the fit level "
        "(checked every calibration_every steps); steps = 2 x the slowest arm's steps, at most max_steps"
    )
    calibration_seed: int = CALIBRATION_SEED
    calibration_every: int = 100
    fit_level: float = 0.99
    calibration_fit_steps: dict[str, int] = dataclasses.field(default_factory=dict)
    train_examples: int = 400
    hidden: tuple[int, ...] = (256, 256, 256)
    activation: str = "relu"
    arms: tuple[str, ...] = tuple(name for name, *_ in _ARMS)
    norm: str = "batchnorm.BatchNorm1d before every ReLU (hidden Linear bias dropped); dropout after the ReLU"
    init: str = "He: N(0, 2/fan_in), biases 0"
    optimizer: str = "SGD, no momentum, no weight decay"
    lr: float = 0.1
    batch_size: int = 50
    seed_varies: str = "the data split and the 400-example training subset; each replicate: initial weights, minibatch order, dropout masks"
    pairing: str = "within a seed and replicate, all six arms share the initial weights and the minibatch order (fixed batches: the first epoch's)"
    inference: str = "running averages (PyTorch EMA, momentum 0.1); dropout off"
    fixed_batches: str = "one permutation split into 8 batches of 50, visited in the same order every epoch"
    seeds_trained: str = "the seeds and replicates of each arm are trained together (batchnorm.lab.stacked)"
    accuracy_tolerance: float = 0.01
    bn_vs_plain_test_loss_below: float = 0.0
    fixed_vs_shuffled_test_loss_above: float = 0.0


def _fixed_batches(n: int, batch: int, generator: torch.Generator) -> Iterator[Tensor]:
    """The same partition of range(n) into n // batch batches, forever (from one permutation:
    the first epoch equals ``training.minibatches``' first epoch with the same generator)."""
    order = torch.randperm(n, generator=generator)
    parts = [order[i * batch : (i + 1) * batch] for i in range(n // batch)]
    while True:
        yield from parts


def _train_arm(
    s: Settings,
    data: Sequence[Dataset],
    gens: Sequence[int],
    arm: tuple[str, str | None, float, bool],
    steps: int,
    progress: Progress,
    *,
    checkpoints: Sequence[int] = (),
    stop_at_fit: bool = False,
) -> tuple[list[MLP], int | None]:
    """Train one arm on runs ``(data[k], gens[k])`` together; returns the models and, with
    ``stop_at_fit``, the first checkpoint at which every run fits (None: never)."""
    name, norm, p, fixed = arm
    models = [
        MLP(d.features, list(s.hidden), d.classes, act=s.activation, norm=norm, init_std="he", generator=seeded(g))
        for d, g in zip(data, gens)
    ]
    batches = _fixed_batches if fixed else minibatches
    streams = [batches(d.train_x.shape[0], s.batch_size, seeded(g + 1)) for d, g in zip(data, gens)]
    fitted: list[int] = []

    def fits(step: int) -> bool:
        if step > 0 and all(evaluate(m, d.train_x, d.train_y)[1] >= s.fit_level for m, d in zip(models, data)):
            fitted.append(step)
            return True
        return False

    with progress.task(name, total=steps) as tick:
        train_stacked(
            [models],
            [d.train_x for d in data],
            [d.train_y for d in data],
            TrainSpec(steps=steps, batch_size=s.batch_size, lr=s.lr),
            streams,
            dropout=p,
            mask_generator=seeded(gens[0] + 2),
            checkpoints=checkpoints,
            stop=fits if stop_at_fit else None,
            tick=tick,
        )
    return models, (fitted[0] if fitted else None)


def _calibrate(s: Settings, cfg: RunConfig, progress: Progress) -> Settings:
    """Apply the steps rule on the calibration seed (see ``Settings.steps_rule``)."""
    data = load_for(cfg, s.calibration_seed).subset_train(s.train_examples, s.calibration_seed)
    marks = list(range(0, s.max_steps + 1, s.calibration_every))
    needed = {}
    for arm in _ARMS:
        _, step = _train_arm(
            s, [data], [s.calibration_seed], arm, s.max_steps, progress, checkpoints=marks, stop_at_fit=True
        )
        needed[arm[0]] = step if step is not None else s.max_steps + s.calibration_every
    steps = min(2 * max(needed.values()), s.max_steps)
    return dataclasses.replace(s, steps=steps, calibration_fit_steps=needed)


_LOSS_CAP = 1e6
"""Test loss that stands for a diverged network's inf (keeps per-seed values finite)."""


def _seed_means(m: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per arm: the mean over the seed's replicates of each measurement."""
    out = {}
    for arm, rows in m.items():
        reps = [{key: min(float(rows[key][r]), _LOSS_CAP) for key in rows} for r in range(len(rows["test_acc"]))]
        out[arm] = mean_over_replicates(reps)
    return out


def _claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Ioffe §3.4/§4.2.1 claims, judged on test loss and accuracy over seeds (each seed: the
    mean of its replicates)."""
    t = results["config"]
    q = [_seed_means(m) for m in results["metrics"]["per_seed"]]
    tol = float(t["accuracy_tolerance"])

    def col(arm: str, key: str) -> list[float]:
        return column(q, arm, key)

    def acc(arm: str) -> str:
        return f"{arm} " + "/".join(f"{100 * v:.1f}" for v in col(arm, "test_acc")) + "%"

    def loss(arm: str) -> str:
        return f"{arm} " + "/".join(f"{v:.3f}" for v in col(arm, "test_loss"))

    fits = min(min(col(arm, "train_acc")) for arm, *_ in _ARMS)
    make = Claims(__name__, results, tol_pp=100 * tol)
    return [
        make(
            "bn_regularizes",
            a=col("BN", "test_loss"),
            b=col("plain", "test_loss"),
            also=[part(col("BN", "test_acc"), col("plain", "test_acc"), above=-tol)],
            evidence=f"test loss per seed: {loss('BN')} vs {loss('plain')}; test accuracy {acc('BN')} vs {acc('plain')}; "
            f"lowest training accuracy of any arm and seed {100 * fits:.1f}%",
        ),
        make(
            "dropout_removable",
            a=col("BN", "test_acc"),
            b=col("dropout 0.5", "test_acc"),
            evidence=f"test accuracy per seed: {acc('BN')} vs {acc('dropout 0.5')}; test loss {loss('BN')} vs {loss('dropout 0.5')}",
        ),
        make(
            "weak_dropout_neutral",
            a=col("BN + dropout 0.1", "test_acc"),
            b=col("BN", "test_acc"),
            evidence=f"test accuracy per seed: {acc('BN + dropout 0.1')} vs {acc('BN')}",
        ),
        make(
            "strong_dropout_no_gain",
            a=col("BN + dropout 0.5", "test_acc"),
            b=col("BN", "test_acc"),
            evidence=f"test accuracy per seed: {acc('BN + dropout 0.5')} vs {acc('BN')}",
        ),
        make(
            "fixed_batches",
            a=col("BN, fixed batches", "test_loss"),
            b=col("BN", "test_loss"),
            evidence=f"test loss per seed: {loss('BN, fixed batches')} vs {loss('BN')}; test accuracy {acc('BN, fixed batches')} vs "
            f"{acc('BN')}",
        ),
    ]


def _figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Bars: test accuracy and loss per arm, mean over seeds ± std, seeds as dots."""
    from ..figures import categories, dress, pyplot, save, wrap

    plt = pyplot()
    q = [_seed_means(m) for m in results["metrics"]["per_seed"]]
    names = [name for name, *_ in _ARMS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["tab:gray", "tab:blue", "tab:red", "tab:purple", "tab:pink", "tab:orange"]
    for ax, key, label in ((axes[0], "test_acc", "test accuracy"), (axes[1], "test_loss", "test loss (cross-entropy)")):
        for i, name in enumerate(names):
            values = np.asarray([v[name][key] for v in q], dtype=float)
            ax.bar(i, values.mean(), yerr=values.std(), color=colors[i % len(colors)], alpha=0.75, capsize=4)
            ax.plot(np.full(values.shape, i), values, "k.", markersize=4)
        categories(ax.xaxis, [wrap(name, 10) for name in names], fontsize=8)
        dress(ax, ylabel=label, grid="y")
    low = min(v[n]["test_acc"] for v in q for n in names)
    axes[0].set_ylim(max(0.0, low - 0.03), min(1.0, max(v[n]["test_acc"] for v in q for n in names) + 0.02))
    cfg = results["config"]
    axes[0].set_title(
        f"Test accuracy ({cfg['train_examples']} training examples; {len(q)} seeds x {cfg['replicates']} networks)"
    )
    axes[1].set_title(f"Test loss ({cfg['steps']} steps, calibrated so every arm fits)")
    return [save(fig, Path(outdir) / "dropout_vs_bn.png")]


class Dropout(Experiment):
    """BN as a regularizer, over seeds."""

    ID, DESCRIPTION, QUICK_SECONDS = ID, DESCRIPTION, QUICK_SECONDS

    def settings(self, cfg: RunConfig) -> Settings:
        """The mode's replicates and step cap; ``steps`` is calibrated by ``run``."""
        return Settings(replicates=_REPLICATES[cfg.mode], max_steps=_MAX_STEPS[cfg.mode])

    def prepare(self, cfg: RunConfig, settings: Settings, progress: Progress) -> Settings:
        """Calibrate the steps on the calibration seed."""
        return _calibrate(settings, cfg, progress)

    def load_seed(self, cfg: RunConfig, settings: Settings, seed: int) -> Dataset:
        """The seed's split, its training set cut to ``train_examples``."""
        return load_for(cfg, seed).subset_train(settings.train_examples, seed)

    def describe_data(self, settings: Settings, first: Dataset) -> dict[str, Any]:
        return {
            **super().describe_data(settings, first),
            "train_used": settings.train_examples,
            "split": "each seed draws its own split and training subset",
        }

    def run_seeds(
        self, settings: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress
    ) -> list[dict[str, Any]]:
        s = settings
        runs = [(d, replicate_seed(seed, r)) for d, seed in zip(data, seeds) for r in range(s.replicates)]
        per_seed: list[dict[str, Any]] = [{} for _ in seeds]
        for arm in _ARMS:
            models, _ = _train_arm(s, [d for d, _ in runs], [g for _, g in runs], arm, s.steps, progress)
            scores = [
                (evaluate(m, d.train_x, d.train_y), evaluate(m, d.test_x, d.test_y)) for m, (d, _) in zip(models, runs)
            ]
            for k in range(len(seeds)):
                mine = scores[k * s.replicates : (k + 1) * s.replicates]  # [((train loss, acc), (test loss, acc))]
                per_seed[k][arm[0]] = {
                    "train_acc": [tr[1] for tr, _te in mine],
                    "test_acc": [te[1] for _tr, te in mine],
                    "train_loss": [tr[0] for tr, _te in mine],
                    "test_loss": [te[0] for _tr, te in mine],
                }
        return per_seed

    claims = staticmethod(_claims)
    figures = staticmethod(_figures)


EXPERIMENT = Dropout()
run, claims, figures = EXPERIMENT.run, EXPERIMENT.claims, EXPERIMENT.figures
