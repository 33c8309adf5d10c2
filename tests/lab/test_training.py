"""Lab training loop: seeded minibatches, determinism, divergence detection, evaluation,
and Alg. 2 population statistics against a NumPy float64 reference.

    PYTHONPATH=src python -m pytest -q tests/lab/test_training.py
"""

from __future__ import annotations

import math
import warnings
from itertools import islice

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab.models import MLP, blocks
from batchnorm.lab.popstats import population_statistics
from batchnorm.lab.training import TrainSpec, evaluate, minibatches, train, train_mode


def test_minibatches_have_constant_size_and_visit_every_example_once_per_epoch() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = list(islice(minibatches(10, 4, gen), 5))  # 20 indices = 2 epochs
    assert all(b.shape == (4,) for b in batches)
    flat = torch.cat(batches)
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:].tolist()) == list(range(10))
    with pytest.raises(ValueError, match="exceeds"):
        next(minibatches(3, 4, gen))


def _data(n: int = 120, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y


def test_training_is_deterministic_given_seeds_and_checkpoints_are_called() -> None:
    x, y = _data()
    runs = []
    for _ in range(2):
        model = MLP(5, [8], 2, norm="bn", init_std=0.3, generator=torch.Generator().manual_seed(0))
        seen: list[tuple[int, int]] = []
        result = train(
            model,
            x,
            y,
            TrainSpec(steps=30, batch_size=10, lr=0.5),
            generator=torch.Generator().manual_seed(4),
            checkpoints=[0, 10, 30],
            on_checkpoint=lambda s, r: seen.append((s, len(r.losses))),  # noqa: B023 - called within this iteration
        )
        runs.append(result.losses)
        assert seen == [(0, 0), (10, 10), (30, 30)]
        assert result.steps_done == 30 and not result.diverged
    assert runs[0] == runs[1]
    assert np.mean(runs[0][-5:]) < np.mean(runs[0][:5])  # it learns


def test_divergence_stops_training_without_warnings() -> None:
    x, y = _data()
    x = x * 1e3
    model = MLP(5, [8, 8], 2, act="identity", norm=None, init_std=3.0, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = train(
            model, x, y, TrainSpec(steps=200, batch_size=10, lr=10.0), generator=torch.Generator().manual_seed(0)
        )
    assert result.diverged
    assert result.diverged_at is not None and result.steps_done == result.diverged_at - 1
    assert not math.isfinite(result.losses[-1])
    loss, acc = evaluate(model, x, y)
    assert loss == math.inf and 0.0 <= acc <= 1.0


def test_divergence_with_batchnorm_does_not_leak_the_nonfinite_warning() -> None:
    x, y = _data()
    model = MLP(5, [8], 2, act="identity", norm="bn", init_std=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        next(blocks(model)).layer.weight[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = train(
            model, x, y, TrainSpec(steps=5, batch_size=10, lr=0.1), generator=torch.Generator().manual_seed(0)
        )
    assert result.diverged and result.diverged_at == 1


def test_evaluate_matches_manual_accuracy_and_restores_mode() -> None:
    x, y = _data()
    model = nn.Sequential(nn.Dropout(0.5), MLP(5, [8], 2, norm="bn"))
    model.train()
    loss, acc = evaluate(model, x, y)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
    with train_mode(model, True):
        assert model.training
    assert not model.training


def test_population_statistics_equal_alg2_in_float64() -> None:
    """Alg. 2: E[x] = mean of batch means, Var[x] = m/(m-1) * mean of biased batch variances."""
    x, _ = _data(n=90)
    model = nn.Sequential(nn.Linear(5, 3), batchnorm.BatchNorm1d(3, momentum=0.3))
    m = 15
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pop = population_statistics(model, x, batch_size=m, generator=torch.Generator().manual_seed(7))
    # reference: replay the same batch order in NumPy float64
    order = list(islice(minibatches(90, m, torch.Generator().manual_seed(7)), 6))
    with torch.no_grad():
        h = model[0](x).double().numpy()  # (90, 3)
    means = np.stack([h[idx.numpy()].mean(0) for idx in order])
    variances = np.stack([h[idx.numpy()].var(0) for idx in order])  # biased, per batch
    np.testing.assert_allclose(pop[1].running_mean.numpy(), means.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pop[1].running_var.numpy(), m / (m - 1) * variances.mean(0), rtol=1e-5, atol=1e-6)
    assert pop[1].momentum == 0.3 and not pop.training
    for k, v in model.state_dict().items():  # the original is untouched
        torch.testing.assert_close(v, before[k])
