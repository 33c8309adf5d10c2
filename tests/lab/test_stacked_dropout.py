# .venv/bin/python -m pytest -q tests/lab/test_stacked_dropout.py
"""The stacked trainer with dropout and any batch stream: without dropout it is training each
seed alone; with dropout its forward is the hand-written masked forward; bad input is refused."""

from __future__ import annotations

import copy
from itertools import islice

import pytest
import torch

from batchnorm.lab._replicates import mean_over_replicates, replicate_seed
from batchnorm.lab._stacked_dropout import StackedDropoutMLP, train_stacked_dropout
from batchnorm.lab.experiments.dropout import _fixed_batches
from batchnorm.lab.models import MLP
from batchnorm.lab.training import TrainSpec, minibatches, train

SEEDS = (0, 1, 2)


def _models(norm: str | None) -> list[MLP]:
    return [
        MLP(6, [8, 5], 3, act="relu", norm=norm, init_std="he", generator=torch.Generator().manual_seed(s))
        for s in SEEDS
    ]


def _data(seed: int, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


@pytest.mark.parametrize("norm", ["bn", None])
@pytest.mark.parametrize("fixed", [False, True])
def test_without_dropout_equals_training_each_seed_alone(norm: str | None, fixed: bool) -> None:
    spec = TrainSpec(steps=25, batch_size=8, lr=0.2)
    data = [_data(s) for s in SEEDS]
    stream = _fixed_batches if fixed else minibatches
    alone = _models(norm)
    together = copy.deepcopy(alone)
    expected = [
        train(
            m, x, y, spec, generator=torch.Generator(), batches=stream(40, 8, torch.Generator().manual_seed(s + 1))
        ).losses
        for m, (x, y), s in zip(alone, data, SEEDS)
    ]
    seen: list[int] = []
    results = train_stacked_dropout(
        together,
        [x for x, _ in data],
        [y for _, y in data],
        spec,
        p=0.0,
        batches=[stream(40, 8, torch.Generator().manual_seed(s + 1)) for s in SEEDS],
        mask_generator=torch.Generator().manual_seed(0),
        checkpoints=[0, 10, 25],
        on_checkpoint=seen.append,
    )
    assert seen == [0, 10, 25]
    for a, b, la, r in zip(alone, together, expected, results):
        assert r.steps_done == spec.steps and not r.diverged
        torch.testing.assert_close(torch.tensor(r.losses), torch.tensor(la), rtol=1e-4, atol=1e-5)
        for key, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], v, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0].head.weight, together[1].head.weight)


@pytest.mark.parametrize("norm", ["bn", None])
def test_a_diverging_seed_follows_the_divergence_rule_of_train(norm: str | None) -> None:
    # the lab's one divergence rule (training.py): a seed stops at its first non-finite loss and
    # keeps the weights that gave it; the other seeds train on as alone, and a merged norm layer
    # goes on updating their running statistics (only the step of the divergence is refused)
    spec = TrainSpec(steps=25, batch_size=8, lr=0.2)
    data = [_data(s) for s in SEEDS]
    alone = _models(norm)
    with torch.no_grad():
        alone[1].blocks[0].layer.weight[0, 0] = float("inf")  # seed 1 diverges at step 1
    together = copy.deepcopy(alone)
    ref = [
        train(
            m, x, y, spec, generator=torch.Generator(), batches=minibatches(40, 8, torch.Generator().manual_seed(s + 1))
        )
        for m, (x, y), s in zip(alone, data, SEEDS)
    ]
    res = train_stacked_dropout(
        together,
        [x for x, _ in data],
        [y for _, y in data],
        spec,
        p=0.0,
        batches=[minibatches(40, 8, torch.Generator().manual_seed(s + 1)) for s in SEEDS],
        mask_generator=torch.Generator().manual_seed(0),
        checkpoints=range(0, 26, 5),
    )
    assert ref[1].diverged_at == res[1].diverged_at == 1 and res[1].steps_done == ref[1].steps_done == 0
    assert not res[0].diverged and not res[2].diverged
    for a, b in zip(alone, together):
        for (key, v), w in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(w, v, rtol=1e-4, atol=1e-5, equal_nan=True, msg=key)
    if norm == "bn":
        for k in (0, 2):
            bn = together[k].blocks[0].norm
            assert int(bn.num_batches_tracked) == spec.steps - 1  # not frozen after the divergence
            assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()


def test_dropout_forward_is_the_masked_forward() -> None:
    models = _models(None)
    stacked = StackedDropoutMLP(models, 0.4, torch.Generator().manual_seed(7))
    x = torch.randn(3, 5, 6)  # (S, B, D)
    out = stacked(x)
    masks = torch.Generator().manual_seed(7)
    expected = []
    hs = x
    for i in range(2):
        hs = torch.relu(torch.stack([m.blocks[i].layer(h) for m, h in zip(models, hs)]))  # (S, B, C)
        keep = torch.rand(hs.shape, generator=masks) >= 0.4
        hs = hs * keep / 0.6
    expected = torch.stack([m.head(h) for m, h in zip(models, hs)])
    torch.testing.assert_close(out, expected)
    stacked.eval()  # no dropout in eval mode
    torch.testing.assert_close(stacked(x), torch.stack([m(h) for m, h in zip(models, x)]))


def test_stop_ends_training_at_a_checkpoint() -> None:
    models = _models("bn")
    data = [_data(s) for s in SEEDS]
    results = train_stacked_dropout(
        models,
        [x for x, _ in data],
        [y for _, y in data],
        TrainSpec(steps=50, batch_size=8, lr=0.1),
        p=0.5,
        batches=[minibatches(40, 8, torch.Generator().manual_seed(s)) for s in SEEDS],
        mask_generator=torch.Generator().manual_seed(0),
        checkpoints=range(0, 51, 10),
        stop=lambda step: step >= 20,
    )
    assert [r.steps_done for r in results] == [20, 20, 20]


def test_bad_input_is_refused() -> None:
    models = _models(None)
    data = [_data(s) for s in SEEDS]
    xs, ys = [x for x, _ in data], [y for _, y in data]
    streams = [minibatches(40, 8, torch.Generator().manual_seed(s)) for s in SEEDS]
    gen = torch.Generator()
    with pytest.raises(ValueError, match="plain SGD"):
        train_stacked_dropout(
            models,
            xs,
            ys,
            TrainSpec(steps=2, batch_size=8, lr=0.1, momentum=0.9),
            p=0.0,
            batches=streams,
            mask_generator=gen,
        )
    with pytest.raises(ValueError, match="one x, y and batch stream"):
        train_stacked_dropout(
            models, xs[:2], ys, TrainSpec(steps=2, batch_size=8, lr=0.1), p=0.0, batches=streams, mask_generator=gen
        )
    with pytest.raises(ValueError, match="batches of 8"):
        train_stacked_dropout(
            models,
            xs,
            ys,
            TrainSpec(steps=2, batch_size=8, lr=0.1),
            p=0.0,
            batches=[minibatches(40, 4, gen) for _ in SEEDS],
            mask_generator=gen,
        )
    with pytest.raises(ValueError, match="0 <= p < 1"):
        StackedDropoutMLP(models, 1.0, gen)


def test_fixed_batches_partition_the_set_and_repeat() -> None:
    stream = _fixed_batches(20, 5, torch.Generator().manual_seed(0))
    first = list(islice(stream, 4))
    again = list(islice(stream, 4))
    assert sorted(torch.cat(first).tolist()) == list(range(20))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # the first epoch is the shuffled stream's first epoch (pairs the fixed arm with BN's)
    shuffled = list(islice(minibatches(20, 5, torch.Generator().manual_seed(0)), 4))
    for a, b in zip(first, shuffled):
        assert torch.equal(a, b)


def test_replicate_seeds_and_means() -> None:
    assert replicate_seed(3, 0) == 3
    seeds = {replicate_seed(s, r) for s in range(10) for r in range(4)}
    assert len(seeds) == 40
    assert mean_over_replicates([{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 6.0}]) == {"a": 2.0, "b": 4.0}
    with pytest.raises(ValueError, match="replicate index"):
        replicate_seed(0, -1)
    with pytest.raises(ValueError, match="seed"):
        replicate_seed(200_000, 1)
    with pytest.raises(ValueError, match="same keys"):
        mean_over_replicates([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="at least one"):
        mean_over_replicates([])
