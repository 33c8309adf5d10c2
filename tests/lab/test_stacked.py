# .venv/bin/python -m pytest -q tests/lab/test_stacked.py
"""Training the seeds together gives what training each seed alone gives."""

from __future__ import annotations

import copy

import pytest
import torch

from batchnorm.lab.models import MLP
from batchnorm.lab.stacked import StackedMLP, train_stacked
from batchnorm.lab.training import TrainSpec, train

SEEDS = (0, 1, 2)


def _models(norm: str | None, placement: str = "before", act: str = "sigmoid") -> list[MLP]:
    return [
        MLP(
            6,
            [8, 5],
            3,
            act=act,
            norm=norm,
            placement=placement,
            init_std=0.3,
            generator=torch.Generator().manual_seed(s),
        )
        for s in SEEDS
    ]


def _data(seed: int, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n + seed, 6, generator=g)  # the seeds' training sets differ in size
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


@pytest.mark.parametrize(
    ("norm", "placement"), [("bn", "before"), ("bn", "after"), (None, "before"), ("torch", "before")]
)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_stacked_training_equals_training_each_seed_alone(norm: str | None, placement: str, momentum: float) -> None:
    spec = TrainSpec(steps=30, batch_size=8, lr=0.2, momentum=momentum, weight_decay=1e-3 if momentum else 0.0)
    data = [_data(s) for s in SEEDS]
    alone = _models(norm, placement)
    together = copy.deepcopy(alone)
    losses_alone = []
    for m, (x, y), s in zip(alone, data, SEEDS):
        losses_alone.append(train(m, x, y, spec, generator=torch.Generator().manual_seed(s + 2)).losses)
    results = train_stacked(
        together,
        [x for x, _ in data],
        [y for _, y in data],
        spec,
        generators=[torch.Generator().manual_seed(s + 2) for s in SEEDS],
    )
    for a, b, la, r in zip(alone, together, losses_alone, results):
        assert r.steps_done == spec.steps and not r.diverged
        torch.testing.assert_close(torch.tensor(r.losses), torch.tensor(la), rtol=1e-4, atol=1e-5)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    # the seeds really differ (a stacked model that mixed them up could not match all three)
    assert not torch.allclose(together[0].head.weight, together[1].head.weight)


def test_checkpoints_see_each_seeds_current_weights() -> None:
    spec = TrainSpec(steps=12, batch_size=8, lr=0.1)
    data = [_data(s) for s in SEEDS]
    alone = _models("bn")
    together = copy.deepcopy(alone)
    seen_alone: dict[int, list[torch.Tensor]] = {s: [] for s in SEEDS}
    for m, (x, y), s in zip(alone, data, SEEDS):
        train(
            m,
            x,
            y,
            spec,
            generator=torch.Generator().manual_seed(s),
            checkpoints=[0, 6, 12],
            on_checkpoint=lambda step, r, m=m, s=s: seen_alone[s].append(m.head.weight.detach().clone()),
        )
    seen: list[list[torch.Tensor]] = []
    train_stacked(
        together,
        [x for x, _ in data],
        [y for _, y in data],
        spec,
        generators=[torch.Generator().manual_seed(s) for s in SEEDS],
        checkpoints=[0, 6, 12],
        on_checkpoint=lambda step, rs: seen.append([m.head.weight.detach().clone() for m in together]),
    )
    assert len(seen) == 3
    for c in range(3):
        for k, s in enumerate(SEEDS):
            torch.testing.assert_close(seen[c][k], seen_alone[s][c], rtol=1e-4, atol=1e-5)


def test_a_diverging_seed_stops_like_train_and_leaves_the_others_alone() -> None:
    spec = TrainSpec(steps=25, batch_size=8, lr=0.1)
    data = [_data(s) for s in SEEDS]
    # seed 1's data holds a huge value: its loss overflows at the first batch that contains it
    x1 = data[1][0].clone()
    x1[5, 0] = 1e38
    data[1] = (x1, data[1][1])
    alone = _models(None, act="relu")
    together = copy.deepcopy(alone)
    res_alone = [
        train(m, x, y, spec, generator=torch.Generator().manual_seed(s)) for m, (x, y), s in zip(alone, data, SEEDS)
    ]
    res = train_stacked(
        together,
        [x for x, _ in data],
        [y for _, y in data],
        spec,
        generators=[torch.Generator().manual_seed(s) for s in SEEDS],
    )
    assert res_alone[1].diverged and res[1].diverged and res[1].diverged_at == res_alone[1].diverged_at
    assert not res[0].diverged and not res[2].diverged
    for a, b in zip(alone, together):
        for key, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_after_a_divergence_the_other_seeds_running_statistics_keep_updating(momentum: float) -> None:
    # the merged BN layer refuses a batch with a non-finite column as a whole: the diverged
    # seed's slices are silenced (neutral, finite), so only the step of the divergence is lost
    spec = TrainSpec(steps=20, batch_size=8, lr=0.1, momentum=momentum)
    data = [_data(s) for s in SEEDS]
    alone = _models("bn")
    with torch.no_grad():
        alone[1].blocks[0].layer.weight[0, 0] = float("inf")  # seed 1 diverges at step 1
    together = copy.deepcopy(alone)
    ref = [train(m, x, y, spec, generator=torch.Generator().manual_seed(s)) for m, (x, y), s in zip(alone, data, SEEDS)]
    res = train_stacked(
        together,
        [x for x, _ in data],
        [y for _, y in data],
        spec,
        generators=[torch.Generator().manual_seed(s) for s in SEEDS],
    )
    assert ref[1].diverged_at == res[1].diverged_at == 1 and not res[0].diverged and not res[2].diverged
    for a, b in zip(alone, together):  # training-mode weights do not depend on running statistics
        for (key, v), w in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(w, v, rtol=1e-4, atol=1e-5, equal_nan=True, msg=key)
    for k in (0, 2):
        bn = together[k].blocks[0].norm
        assert int(bn.num_batches_tracked) == spec.steps - 1
        assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="dropout"):
        StackedMLP([MLP(4, [3], 2, dropout=0.5)])
    with pytest.raises(ValueError, match="at least one"):
        StackedMLP([])
    with pytest.raises(ValueError, match="one x, y and generator per model"):
        train_stacked(
            _models(None),
            [torch.zeros(10, 6)],
            [torch.zeros(10).long()],
            TrainSpec(1, 2, 0.1),
            generators=[torch.Generator()],
        )
