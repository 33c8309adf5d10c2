"""``dropout``: BN as a regularizer (Ioffe & Szegedy 2015, §3.4 and §4.2.1) — the
generalization of plain, dropout, BN, BN+dropout and BN with a fixed batch composition on a
small training set, judged over seeds.
Setup, the rules fixed before any run and each setting's source: ``dropout.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._replicates import mean_over_replicates, replicate_seed
from ..claims_spec import Claims, Declared, listed
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import mlp_for, seeded, train_seeds
from ..experiment import Experiment, PerSeed, column, load_for
from ..figures import NamedFigures, categories, dress, pyplot, wrap
from ..models import MLP
from ..progress import Progress
from ..training import TrainSpec, evaluate, minibatches

_ARMS = {  # name: norm, dropout p, fixed batches, colour of its bars
    "plain": (None, 0.0, False, "tab:gray"),
    "dropout 0.5": (None, 0.5, False, "tab:blue"),
    "BN": ("bn", 0.0, False, "tab:red"),
    "BN + dropout 0.5": ("bn", 0.5, False, "tab:purple"),
    "BN + dropout 0.1": ("bn", 0.1, False, "tab:pink"),
    "BN, fixed batches": ("bn", 0.0, True, "tab:orange"),
}
_LOSS_CAP = 1e6  # the test loss that stands for a diverged network's inf (keeps per-seed values finite)
_RECORDED = ("train_acc", "test_acc", "train_loss", "test_loss")  # each replicate's record of an arm, in order


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``dropout.settings.toml``."""

    replicates: int
    max_steps: int
    steps: int
    calibration_fit_steps: dict[str, int]


def _fixed_batches(n: int, batch: int, generator: torch.Generator) -> Iterator[Tensor]:
    """The same partition of range(n) into n // batch batches, forever (from one permutation:
    the first epoch equals ``training.minibatches``' first epoch with the same generator)."""
    order = torch.randperm(n, generator=generator)
    parts = [order[i * batch : (i + 1) * batch] for i in range(n // batch)]
    while True:
        yield from parts


def _train_arm(
    s: Settings, data: Sequence[Dataset], gens: Sequence[int], arm: str, progress: Progress, fit_at: Sequence[int] = ()
) -> tuple[list[MLP], int | None]:
    """Train one arm on runs ``(data[k], gens[k])`` together for ``s.steps``, or with checkpoints
    ``fit_at`` up to ``s.max_steps``, stopping at the first of them at which every run fits;
    returns the models and that checkpoint (None: never, or no ``fit_at``)."""
    norm, p, fixed, _ = _ARMS[arm]
    models = [
        mlp_for(d, s.hidden, act=s.activation, norm=norm, init_std="he", generator=seeded(g))
        for d, g in zip(data, gens)
    ]
    fitted: list[int] = []

    def fits(step: int) -> bool:
        if step > 0 and all(evaluate(m, d.train_x, d.train_y)[1] >= s.fit_level for m, d in zip(models, data)):
            fitted.append(step)
        return bool(fitted)

    spec = TrainSpec(steps=s.max_steps if fit_at else s.steps, batch_size=s.batch_size, lr=s.lr)
    batches = _fixed_batches if fixed else minibatches
    stop = fits if fit_at else None
    options = {"dropout": p, "mask_generator": seeded(gens[0] + 2), "checkpoints": fit_at, "stop": stop}
    train_seeds(models, data, gens, spec, arm, progress, order_offset=1, batches=batches, **options)
    return models, (fitted[0] if fitted else None)


def _seed_means(m: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per arm: the mean over the seed's replicates of each measurement."""
    capped = {
        arm: [{key: min(float(rows[key][r]), _LOSS_CAP) for key in rows} for r in range(len(rows["test_acc"]))]
        for arm, rows in m.items()
    }
    return {arm: mean_over_replicates(reps) for arm, reps in capped.items()}


class Dropout(Experiment):
    """BN as a regularizer, over seeds."""

    DESCRIPTION = "BN as a regularizer: test loss and accuracy on 400 examples for plain, dropout, BN, BN+dropout, fixed batches (over seeds)"

    def prepare(self, cfg: RunConfig, s: Settings, progress: Progress) -> Settings:
        """Apply the steps rule (the ``steps_rule`` setting) on the calibration seed."""
        data = self.load_seed(cfg, s, s.calibration_seed)
        marks = list(range(0, s.max_steps + 1, s.calibration_every))
        needed = {}
        for arm in _ARMS:
            _, step = _train_arm(s, [data], [s.calibration_seed], arm, progress, fit_at=marks)
            needed[arm] = step if step is not None else s.max_steps + s.calibration_every
        steps = min(2 * max(needed.values()), s.max_steps)
        return dataclasses.replace(s, steps=steps, calibration_fit_steps=needed)

    def load_seed(self, cfg: RunConfig, settings: Settings, seed: int) -> Dataset:
        """The seed's split, its training set cut to ``train_examples``."""
        return load_for(cfg, seed).subset_train(settings.train_examples, seed)

    def describe_data(self, settings: Settings, first: Dataset) -> dict[str, Any]:
        split = "each seed draws its own split and training subset"
        return {**super().describe_data(settings, first), "train_used": settings.train_examples, "split": split}

    def run_seeds(self, s: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress) -> PerSeed:
        """Each arm's replicates of every seed trained together; per seed and arm, each replicate's record."""
        runs = [(d, replicate_seed(seed, r)) for d, seed in zip(data, seeds) for r in range(s.replicates)]
        per_seed: PerSeed = [{} for _ in seeds]
        for arm in _ARMS:
            models, _ = _train_arm(s, [d for d, _ in runs], [g for _, g in runs], arm, progress)
            # (train loss, train accuracy, test loss, test accuracy) of every run
            scores = [
                (*evaluate(m, d.train_x, d.train_y), *evaluate(m, d.test_x, d.test_y))
                for m, (d, _) in zip(models, runs)
            ]
            for k, rec in enumerate(per_seed):
                mine = scores[k * s.replicates : (k + 1) * s.replicates]
                rec[arm] = {key: [row[i] for row in mine] for key, i in zip(_RECORDED, (1, 3, 0, 2))}
        return per_seed

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Ioffe §3.4/§4.2.1 claims, judged on test loss and accuracy over seeds (each seed: the
        mean of its replicates)."""
        q = [_seed_means(m) for m in results["metrics"]["per_seed"]]
        col = {f"{key} {arm}": column(q, arm, key) for arm in _ARMS for key in _RECORDED}
        acc, loss = (
            {arm: listed((scale * v for v in col[f"{key} {arm}"]), fmt, "/") for arm in _ARMS}
            for key, scale, fmt in (("test_acc", 100, "{:.1f}"), ("test_loss", 1, "{:.3f}"))
        )
        fits = 100 * min(min(col[f"train_acc {arm}"]) for arm in _ARMS)
        tol_pp = 100 * float(results["config"]["accuracy_tolerance"])
        return Claims(__name__, results, **col, acc=acc, loss=loss, fits=fits, tol_pp=tol_pp).all()

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Bars: test accuracy and loss per arm, mean over seeds ± std, seeds as dots."""
        plt, cfg = pyplot(), results["config"]
        q = [_seed_means(m) for m in results["metrics"]["per_seed"]]
        accs = [v[n]["test_acc"] for v in q for n in _ARMS]
        runs = f"{cfg['train_examples']} training examples; {len(q)} seeds x {cfg['replicates']} networks"
        steps = f"{cfg['steps']} steps, calibrated so every arm fits"
        panels = (
            ("test_acc", "test accuracy", f"Test accuracy ({runs})"),
            ("test_loss", "test loss (cross-entropy)", f"Test loss ({steps})"),
        )
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, (key, label, title) in zip(axes, panels):
            for i, (name, (*_, color)) in enumerate(_ARMS.items()):  # a bar per arm: mean ± std, each seed a dot
                values = np.asarray([v[name][key] for v in q], dtype=float)  # (seeds,)
                ax.bar(i, values.mean(), yerr=values.std(), color=color, capsize=4, alpha=0.75)
                ax.plot(np.full(values.shape, i), values, "k.", markersize=4)
            categories(ax.xaxis, [wrap(name, 10) for name in _ARMS], fontsize=8)
            dress(ax, title, ylabel=label, grid="y")
        axes[0].set_ylim(max(0.0, min(accs) - 0.03), min(1.0, max(accs) + 0.02))
        yield "dropout_vs_bn.png", fig


EXPERIMENT = Dropout()
