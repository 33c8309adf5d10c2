"""The lab's one training loop (``lab.stacked``): arms x seeds trained together equal each model
trained alone by a plain SGD loop on the module, the divergence rule, dropout, checkpoints and
stop, bad input.

    PYTHONPATH=src python -m pytest -q tests/lab/test_stacked.py
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from batchnorm import BatchNorm1d, GhostBatchNorm1d
from batchnorm.lab.declare import non_iid_batches
from batchnorm.lab.experiments.dropout import _fixed_batches
from batchnorm.lab.models import MLP, ConvNet
from batchnorm.lab.normalizers import GroupedBatchNorm1d, GroupedBatchRenorm1d
from batchnorm.lab.stacked import StackedNet, train_stacked
from batchnorm.lab.training import TrainResult, TrainSpec, minibatches, train

Factory = Callable[[int], nn.Module]

NORMS: dict[str, Factory | str | None] = {
    "bn": lambda c: BatchNorm1d(c, momentum=0.05),
    "grouped": lambda c: GroupedBatchNorm1d(c, 4, momentum=0.05),
    "renorm": lambda c: GroupedBatchRenorm1d(c, 4, momentum=0.05, warmup_steps=3, r_max_steps=9, d_max_steps=6),
    "ghost": lambda c: GhostBatchNorm1d(c, 4, momentum=0.05),
    "group_norm": lambda c: nn.GroupNorm(2, c),
    "torch": nn.BatchNorm1d,
    "none": None,
}


def _alone(
    model: nn.Module, x: Tensor, y: Tensor, spec: TrainSpec, stream: Iterator[Tensor], marks: tuple[int, ...] = ()
) -> tuple[TrainResult, list[Tensor]]:
    """The reference: plain SGD on the module, stopping at the first non-finite loss with the
    weights that gave it; returns the result and the head weight at every step in ``marks``."""
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    result, seen = TrainResult(), [model.head.weight.detach().clone()] if 0 in marks else []
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, spec.steps + 1):
            idx = next(stream)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            result.losses.append(float(loss))
            if not math.isfinite(result.losses[-1]):
                result.diverged, result.diverged_at = True, step
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            result.steps_done = step
            if step in marks:
                seen.append(model.head.weight.detach().clone())
    return result, seen


def _data(seed: int, n: int = 96, d: int = 12) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n + seed) % 4  # the members' training sets differ in size
    return torch.randn(n + seed, d, generator=g) + y.unsqueeze(1).float() * 0.3, y


def _model(kind: str, norm: str, seed: int, **kw: object) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return MLP(12, [8, 6], 4, act=kw.pop("act", "relu"), norm=NORMS[norm], init_std=0.3, generator=gen, **kw)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    return ConvNet((1, 12), [4, 6], 4, act="relu", norm=NORMS[norm], **kw)  # type: ignore[arg-type]


def _stream(kind: str, y: Tensor, seed: int) -> Iterator[Tensor]:
    g = torch.Generator().manual_seed(seed + 50)
    if kind == "non_iid":
        return non_iid_batches(y, 4, g, batch=16, group=4)
    return (_fixed_batches if kind == "fixed" else minibatches)(y.shape[0], 16, g)


def _assert_same(got: nn.Module, ref: nn.Module, what: object, params_only: bool = False) -> None:
    pairs = (
        zip(got.named_parameters(), ref.parameters())
        if params_only
        else zip(got.state_dict().items(), ref.state_dict().values())
    )
    for (key, a), b in pairs:
        torch.testing.assert_close(
            a, b, rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda m, key=key: f"{what} {key}: {m}"
        )


@pytest.mark.parametrize(
    ("kind", "arms_spec"),
    [
        ("mlp", [("bn", "iid"), ("grouped", "fixed"), ("renorm", "non_iid"), ("ghost", "iid"), ("group_norm", "iid")]),
        ("mlp", [("torch", "iid"), ("none", "fixed")]),
        ("conv", [("bn", "iid"), ("grouped", "iid"), ("renorm", "non_iid"), ("ghost", "iid"), ("group_norm", "iid")]),
    ],
)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_arms_and_seeds_trained_together_equal_each_trained_alone(
    kind: str, arms_spec: list[tuple[str, str]], momentum: float
) -> None:
    seeds = [0, 1]
    spec = TrainSpec(steps=12, batch_size=16, lr=0.1, momentum=momentum, weight_decay=1e-3 if momentum else 0.0)
    extra = {"placement": "after", "bias": True} if arms_spec[0][0] == "torch" else {}
    arms = [[_model(kind, norm, s, **extra) for s in seeds] for norm, _ in arms_spec]
    data = [_data(s) for _ in arms_spec for s in seeds]
    streams = [_stream(stream, _data(s)[1], s) for _, stream in arms_spec for s in seeds]
    marks = (0, 5, 12)
    seen: list[list[Tensor]] = []
    results = train_stacked(
        arms,
        [d[0] for d in data],
        [d[1] for d in data],
        spec,
        streams,
        checkpoints=marks,
        on_checkpoint=lambda step, rs: seen.append([m.head.weight.detach().clone() for arm in arms for m in arm]),
    )
    members = [(norm, stream, s) for norm, stream in arms_spec for s in seeds]
    for k, ((norm, stream, s), got) in enumerate(zip(members, [m for arm in arms for m in arm])):
        alone = _model(kind, norm, s, **extra)
        x, y = _data(s)
        ref, heads = _alone(alone, x, y, spec, _stream(stream, y, s), marks)
        assert results[k].steps_done == spec.steps and not results[k].diverged
        assert results[k].losses == pytest.approx(ref.losses, rel=1e-4, abs=1e-5), (norm, s)
        _assert_same(got, alone, (norm, s))
        for c in range(len(marks)):
            torch.testing.assert_close(seen[c][k], heads[c], rtol=1e-4, atol=1e-5)
        if k == 0 and stream == "iid":  # ``train`` is the same loop with one member
            one = _model(kind, norm, s, **extra)
            order = torch.Generator().manual_seed(s + 50)  # the "iid" stream of _stream
            assert train(one, x, y, spec, generator=order).losses == pytest.approx(ref.losses, rel=1e-4, abs=1e-5)
            _assert_same(one, alone, "train")
    assert not torch.allclose(arms[0][0].head.weight, arms[0][1].head.weight)  # the seeds really differ


@pytest.mark.parametrize("cause", ["weight", "data"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_diverging_member_follows_the_divergence_rule(cause: str, momentum: float) -> None:
    # the lab's one rule (training.py): member 1 stops at its first non-finite loss and keeps
    # the weights that gave it; the others train on as alone, except that the merged norm layer
    # of its arm skips the one running-statistics update of that step
    spec = TrainSpec(steps=20, batch_size=16, lr=0.1, momentum=momentum)
    models = [_model("mlp", "bn", s) for s in (0, 1, 2)] + [_model("mlp", "group_norm", 3)]
    data = [_data(s) for s in (0, 1, 2, 3)]
    if cause == "weight":
        with torch.no_grad():
            models[1].blocks[0].layer.weight[0, 0] = float("inf")  # diverges at step 1
    else:
        data[1][0][40, 0] = float("inf")  # diverges at the first batch holding example 40
    alone = copy.deepcopy(models)
    res = train_stacked(
        [models[:3], models[3:]],
        [d[0] for d in data],
        [d[1] for d in data],
        spec,
        [_stream("iid", d[1], s) for s, d in enumerate(data)],
    )
    ref = [_alone(m, d[0], d[1], spec, _stream("iid", d[1], s))[0] for s, (m, d) in enumerate(zip(alone, data))]
    assert res[1].diverged and res[1].diverged_at == ref[1].diverged_at and res[1].steps_done == ref[1].steps_done
    assert (res[1].diverged_at == 1) == (cause == "weight") and not math.isfinite(res[1].losses[-1])
    assert not any(r.diverged for k, r in enumerate(res) if k != 1)
    _assert_same(models[1], alone[1], "diverged", params_only=True)
    for k in (0, 2):  # training-mode weights do not depend on running statistics
        _assert_same(models[k], alone[k], k, params_only=True)
        bn = models[k].blocks[0].norm
        assert int(bn.num_batches_tracked) == spec.steps - 1  # not frozen after the divergence
        assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    _assert_same(models[3], alone[3], "other arm")  # another arm trains exactly as alone


def test_dropout_forward_is_the_masked_forward_and_eval_is_each_model() -> None:
    models = [_model("mlp", "none", s) for s in (0, 1, 2)]
    x = torch.randn(3, 5, 12)  # (S, B, D)
    out = StackedNet([models], 0.4, torch.Generator().manual_seed(7))(x)
    masks, hs = torch.Generator().manual_seed(7), x
    for i in range(2):  # one mask for the whole (S, B, C): every seed its own
        hs = torch.relu(torch.stack([m.blocks[i].layer(h) for m, h in zip(models, hs)]))
        hs = hs * (torch.rand(hs.shape, generator=masks) >= 0.4) / 0.6
    torch.testing.assert_close(out, torch.stack([m.head(h) for m, h in zip(models, hs)]))
    arms = [[_model("conv", norm, s) for s in (0, 1)] for norm in ("grouped", "group_norm")]
    for net, members in ((StackedNet([models], 0.4, torch.Generator()), models), (StackedNet(arms), arms[0] + arms[1])):
        net.eval()  # no dropout, running statistics
        xe = torch.randn(len(members), 5, 12)
        torch.testing.assert_close(
            net(xe), torch.stack([m.eval()(h) for m, h in zip(members, xe)]), rtol=1e-5, atol=1e-5
        )


def test_stop_ends_training_at_a_checkpoint() -> None:
    models = [_model("mlp", "bn", s) for s in (0, 1, 2)]
    data = [_data(s) for s in (0, 1, 2)]
    seen: list[int] = []
    results = train_stacked(
        [models],
        [x for x, _ in data],
        [y for _, y in data],
        TrainSpec(steps=50, batch_size=16, lr=0.1),
        [_stream("iid", y, s) for s, (_, y) in enumerate(data)],
        dropout=0.5,
        mask_generator=torch.Generator().manual_seed(0),
        checkpoints=range(0, 51, 10),
        on_checkpoint=lambda step, rs: seen.append(step),
        stop=lambda step: step >= 20,
    )
    assert seen == [0, 10, 20] and [r.steps_done for r in results] == [20, 20, 20]


def test_bad_input_is_refused() -> None:
    a, c = _model("mlp", "bn", 0), _model("conv", "bn", 0)
    x, y = _data(0)
    spec = TrainSpec(steps=1, batch_size=16, lr=0.1)
    with pytest.raises(TypeError, match="one kind"):
        StackedNet([[a], [c]])
    with pytest.raises(ValueError, match="at least one"):
        StackedNet([[]])
    with pytest.raises(ValueError, match="0 <= dropout < 1"):
        StackedNet([[a]], 1.0, torch.Generator())
    with pytest.raises(ValueError, match="one x, y and stream"):
        train_stacked([[a]], [x, x], [y], spec, [minibatches(96, 16, torch.Generator())])
    with pytest.raises(ValueError, match="mask_generator"):
        train_stacked([[a]], [x], [y], spec, [minibatches(96, 16, torch.Generator())], dropout=0.5)
    with pytest.raises(ValueError, match="index batches of 16"):
        train_stacked([[a]], [x], [y], spec, [minibatches(96, 8, torch.Generator())])
