"""Smoke test of ``benchmarks/models.py``: each network takes a training step at toy size, with
torch's batch norm and with ours, and both give the same loss and parameter update; and the
ratio with its interval that the benchmarks print (``benchmarks/ratios.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from benchmarks import models
from benchmarks.ratios import ratio

import batchnorm

TOY = {
    "mlp": lambda: models.mlp(batch=8, width=16, depth=2),
    "resnet18": lambda: models.resnet18(batch=4, width=4, size=8),
    "lab": lambda: models.lab_net(batch=8, features=12, hidden=10),
}


@pytest.mark.parametrize("name", sorted(TOY))
def test_one_step_matches_torch(name: str) -> None:
    net = TOY[name]()
    theirs = batchnorm.convert(net.model, to="torch")
    ours = batchnorm.convert(net.model)
    assert any(isinstance(m, batchnorm.BatchNorm1d | batchnorm.BatchNorm2d) for m in ours.modules())
    loss_t = models.make_step(theirs, net.x, net.y, compiled=False)()
    loss_o = models.make_step(ours, net.x, net.y, compiled=False)()
    assert loss_o == pytest.approx(loss_t, rel=1e-5)
    for (k, p_t), p_o in zip(theirs.state_dict().items(), ours.state_dict().values()):
        if p_t.is_floating_point():
            torch.testing.assert_close(p_o, p_t, rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(p_o, p_t), k


def test_measure_reports_every_candidate() -> None:
    result = models.measure(TOY["lab"](), rounds=2, steps=3, compile_too=False, warmup=1)
    assert set(result) == {"torch eager", "ours eager"}
    assert all(len(rounds) == 2 and all(len(r) == 3 and min(r) > 0 for r in rounds) for rounds in result.values())


def test_ratio_is_the_geometric_mean_of_round_ratios_with_a_t_interval() -> None:
    ours, theirs = [2.0, 3.0, 4.0], [1.0, 3.0, 2.0]  # round ratios 2, 1, 2
    logs = np.log([2.0, 1.0, 2.0])
    half = scipy.stats.t.ppf(0.975, 2) * logs.std(ddof=1) / np.sqrt(3)
    r, lo, hi = ratio(ours, theirs)
    assert r == pytest.approx(np.exp(logs.mean()))
    assert (lo, hi) == pytest.approx((np.exp(logs.mean() - half), np.exp(logs.mean() + half)))
    assert ratio([1.0], [2.0]) == (0.5, 0.0, math.inf)
    with pytest.raises(ValueError, match="one time per round"):
        ratio([1.0, 2.0], [1.0])


def test_unknown_network() -> None:
    with pytest.raises(ValueError, match="expected a network"):
        models.build("vgg", quick=True)
