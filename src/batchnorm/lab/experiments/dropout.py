"""``dropout``: BN as a regularizer (Ioffe & Szegedy 2015, §3.4 and §4.2.1) — the
generalization of plain, dropout, BN, BN+dropout and BN with a fixed batch composition on a
small training set, judged over seeds.
Setup, the rules fixed before any run and each setting's source: ``dropout.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._replicates import mean_over_replicates, replicate_seed
from ..claims_spec import Claims, Declared
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import seeded
from ..experiment import Experiment, PerSeed, column, load_for
from ..figures import categories, dress, pyplot, save, seed_bars, wrap
from ..models import MLP
from ..progress import Progress
from ..stacked import train_stacked
from ..training import TrainSpec, evaluate, minibatches
from ..verdict import part

_ARMS = {  # name: norm, dropout p, fixed batches
    "plain": (None, 0.0, False),
    "dropout 0.5": (None, 0.5, False),
    "BN": ("bn", 0.0, False),
    "BN + dropout 0.5": ("bn", 0.5, False),
    "BN + dropout 0.1": ("bn", 0.1, False),
    "BN, fixed batches": ("bn", 0.0, True),
}
_COLORS = ["tab:gray", "tab:blue", "tab:red", "tab:purple", "tab:pink", "tab:orange"]  # the arms' bars, in order


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
    steps = s.max_steps if fit_at else s.steps
    norm, p, fixed = _ARMS[arm]
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

    with progress.task(arm, total=steps) as tick:
        train_stacked(
            [models],
            [d.train_x for d in data],
            [d.train_y for d in data],
            TrainSpec(steps=steps, batch_size=s.batch_size, lr=s.lr),
            streams,
            dropout=p,
            mask_generator=seeded(gens[0] + 2),
            checkpoints=fit_at,
            stop=fits if fit_at else None,
            tick=tick,
        )
    return models, (fitted[0] if fitted else None)


_LOSS_CAP = 1e6  # the test loss that stands for a diverged network's inf (keeps per-seed values finite)
_RECORDED = ("train_acc", "test_acc", "train_loss", "test_loss")  # each replicate's record of an arm, in order


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
        data = load_for(cfg, s.calibration_seed).subset_train(s.train_examples, s.calibration_seed)
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
        tol = float(results["config"]["accuracy_tolerance"])
        col = {(arm, key): column(q, arm, key) for arm in _ARMS for key in _RECORDED}
        acc = {arm: f"{arm} " + "/".join(f"{100 * v:.1f}" for v in col[arm, "test_acc"]) + "%" for arm in _ARMS}
        loss = {arm: f"{arm} " + "/".join(f"{v:.3f}" for v in col[arm, "test_loss"]) for arm in _ARMS}
        fits = min(min(col[arm, "train_acc"]) for arm in _ARMS)
        regularizes = (
            f"test loss per seed: {loss['BN']} vs {loss['plain']}; test accuracy {acc['BN']} vs {acc['plain']}; "
            f"lowest training accuracy of any arm and seed {100 * fits:.1f}%"
        )
        removable = (
            f"test accuracy per seed: {acc['BN']} vs {acc['dropout 0.5']}; "
            f"test loss {loss['BN']} vs {loss['dropout 0.5']}"
        )
        fixed = (
            f"test loss per seed: {loss['BN, fixed batches']} vs {loss['BN']}; "
            f"test accuracy {acc['BN, fixed batches']} vs {acc['BN']}"
        )
        make, on_top = Claims(__name__, results, tol_pp=100 * tol), ("BN + dropout 0.1", "BN + dropout 0.5")

        def vs(a: str, b: str, key: str) -> dict[str, Any]:  # arm a against arm b, paired over seeds
            return {"a": col[a, key], "b": col[b, key]}

        as_accurate = part(**vs("BN", "plain", "test_acc"), above=-tol)
        return [
            make("bn_regularizes", **vs("BN", "plain", "test_loss"), also=[as_accurate], evidence=regularizes),
            make("dropout_removable", **vs("BN", "dropout 0.5", "test_acc"), evidence=removable),
            *(
                make(name, **vs(arm, "BN", "test_acc"), evidence=f"test accuracy per seed: {acc[arm]} vs {acc['BN']}")
                for name, arm in zip(("weak_dropout_neutral", "strong_dropout_no_gain"), on_top)
            ),
            make("fixed_batches", **vs("BN, fixed batches", "BN", "test_loss"), evidence=fixed),
        ]

    def figures(self, results: dict[str, Any], outdir: Path) -> list[Path]:
        """Bars: test accuracy and loss per arm, mean over seeds ± std, seeds as dots."""
        plt, cfg = pyplot(), results["config"]
        q = [_seed_means(m) for m in results["metrics"]["per_seed"]]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, key, label in zip(axes, ("test_acc", "test_loss"), ("test accuracy", "test loss (cross-entropy)")):
            seed_bars(ax, [[v[name][key] for v in q] for name in _ARMS], _COLORS, alpha=0.75)
            categories(ax.xaxis, [wrap(name, 10) for name in _ARMS], fontsize=8)
            dress(ax, ylabel=label, grid="y")
        accs = [v[n]["test_acc"] for v in q for n in _ARMS]
        axes[0].set_ylim(max(0.0, min(accs) - 0.03), min(1.0, max(accs) + 0.02))
        runs = f"{len(q)} seeds x {cfg['replicates']} networks"
        axes[0].set_title(f"Test accuracy ({cfg['train_examples']} training examples; {runs})")
        axes[1].set_title(f"Test loss ({cfg['steps']} steps, calibrated so every arm fits)")
        return [save(fig, Path(outdir) / "dropout_vs_bn.png")]


EXPERIMENT = Dropout()
