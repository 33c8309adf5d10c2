"""Arms x seeds trained together (``lab._stacked_nets``) equal each model trained alone.

.venv/bin/python -m pytest -q tests/lab/test_stacked_nets.py
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from batchnorm import BatchNorm1d, GhostBatchNorm1d
from batchnorm.lab._stacked_nets import StackedNet, train_together
from batchnorm.lab.declare import non_iid_batches
from batchnorm.lab.models import MLP, ConvNet
from batchnorm.lab.normalizers import GroupedBatchNorm1d, GroupedBatchRenorm1d
from batchnorm.lab.training import TrainSpec, minibatches, train

Factory = Callable[[int], nn.Module]

NORMS: dict[str, Factory] = {
    "bn": lambda c: BatchNorm1d(c, momentum=0.05),
    "grouped": lambda c: GroupedBatchNorm1d(c, 4, momentum=0.05),
    "renorm": lambda c: GroupedBatchRenorm1d(c, 4, momentum=0.05, warmup_steps=3, r_max_steps=9, d_max_steps=6),
    "ghost": lambda c: GhostBatchNorm1d(c, 4, momentum=0.05),
    "group_norm": lambda c: nn.GroupNorm(2, c),
}


def _data(seed: int, n: int = 96, d: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, d, generator=g) + y.unsqueeze(1).float() * 0.3
    return x, y


def _model(kind: str, factory: Factory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLP(12, [8, 6], 4, act="relu", norm=factory)
    return ConvNet((1, 12), [4, 6], 4, act="relu", norm=factory)


def _stream(kind: str, y: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed + 50)
    if kind == "non_iid":
        return non_iid_batches(y, 4, g, batch=16, group=4)
    return minibatches(y.shape[0], 16, g)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_arms_and_seeds_trained_together_equal_each_trained_alone(kind: str) -> None:
    seeds = [0, 1]
    arms_spec = [(name, "non_iid" if name == "renorm" else "iid") for name in NORMS]
    spec = TrainSpec(steps=12, batch_size=16, lr=0.1)
    arms = [[_model(kind, NORMS[name], s) for s in seeds] for name, _ in arms_spec]
    data = [_data(s) for _ in arms_spec for s in seeds]
    streams = [_stream(stream, _data(s)[1], s) for _, stream in arms_spec for s in seeds]
    results = train_together(arms, [d[0] for d in data], [d[1] for d in data], spec, streams)
    k = 0
    for (name, stream), arm in zip(arms_spec, arms):
        for s, got in zip(seeds, arm):
            alone = _model(kind, NORMS[name], s)
            x, y = _data(s)
            ref = train(alone, x, y, spec, generator=torch.Generator(), batches=_stream(stream, y, s))
            assert results[k].losses == pytest.approx(ref.losses, rel=1e-4, abs=1e-5), (name, s)
            for (key, a), b in zip(got.state_dict().items(), alone.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} seed {s} {key}")
            k += 1


def test_a_diverging_member_stops_alone_and_the_others_are_untouched() -> None:
    spec = TrainSpec(steps=6, batch_size=16, lr=0.1)
    arms = [[_model("mlp", NORMS["bn"], s) for s in (0, 1)], [_model("mlp", NORMS["group_norm"], 2)]]
    data = [_data(0), _data(1), _data(2)]
    bad_x = data[1][0].clone()
    bad_x[5, 0] = float("inf")  # member 1 meets it in its first epoch
    xs = [data[0][0], bad_x, data[2][0]]
    ys = [d[1] for d in data]
    streams = [minibatches(96, 16, torch.Generator().manual_seed(s)) for s in (0, 1, 2)]
    results = train_together(arms, xs, ys, spec, streams)
    assert results[1].diverged and not results[0].diverged and not results[2].diverged
    alone = _model("mlp", NORMS["bn"], 1)
    ref = train(alone, bad_x, ys[1], spec, generator=torch.Generator().manual_seed(1))
    assert ref.diverged and results[1].diverged_at == ref.diverged_at and results[1].steps_done == ref.steps_done
    for a, b in zip(arms[0][1].state_dict().values(), alone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
    # the group-norm member (another arm) trains exactly as alone
    solo = _model("mlp", NORMS["group_norm"], 2)
    train(solo, data[2][0], ys[2], spec, generator=torch.Generator().manual_seed(2))
    for a, b in zip(arms[1][0].state_dict().values(), solo.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(torch.isfinite(v).all() for v in arms[0][0].state_dict().values())


def test_bad_inputs_are_refused() -> None:
    a = _model("mlp", NORMS["bn"], 0)
    c = _model("conv", NORMS["bn"], 0)
    with pytest.raises(TypeError, match="one kind"):
        StackedNet([[a], [c]])
    with pytest.raises(ValueError, match="at least one"):
        StackedNet([[]])
    x, y = _data(0)
    with pytest.raises(ValueError, match="plain SGD"):
        train_together(
            [[a]],
            [x],
            [y],
            TrainSpec(steps=1, batch_size=16, lr=0.1, momentum=0.9),
            [minibatches(96, 16, torch.Generator())],
        )
    with pytest.raises(ValueError, match="one x, y and stream"):
        train_together(
            [[a]], [x, x], [y], TrainSpec(steps=1, batch_size=16, lr=0.1), [minibatches(96, 16, torch.Generator())]
        )
    with pytest.raises(ValueError, match="dropout"):
        StackedNet([[MLP(12, [8], 4, dropout=0.5)]])


def test_stacked_forward_in_eval_mode_matches_each_model() -> None:
    arms = [[_model("conv", NORMS[name], s) for s in (0, 1)] for name in ("grouped", "group_norm")]
    net = StackedNet(arms).eval()
    x = torch.randn(4, 5, 12)
    out = net(x)
    members = [m for arm in arms for m in arm]
    for k, m in enumerate(members):
        torch.testing.assert_close(out[k], m.eval()(x[k]), rtol=1e-5, atol=1e-5)
