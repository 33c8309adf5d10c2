"""precise-bn: PreciseBN copies, the EMA-error measure, and the quick-mode claims.

PYTHONPATH=src python -m pytest -q tests/lab/test_precise_bn.py
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiments import precise_bn as exp
from batchnorm.lab.models import MLP
from batchnorm.lab.runner import run_one


def _model() -> MLP:
    return MLP(5, [6], 3, act="identity", norm="bn", generator=torch.Generator().manual_seed(0), init_std=0.7)


def test_precise_copy_has_the_population_statistics_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    x = torch.randn(300, 5) * 2 + 1
    model = _model()
    before = copy.deepcopy(model.state_dict())
    pre = exp.precise_copy(model, x, batch_size=64)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    # one hidden layer, linear before BN: BN's input is x W^T, whose population moments are exact
    h = (x.double() @ model.blocks[0].layer.weight.detach().double().T).numpy()  # (300, 6)
    bn = pre.blocks[0].norm
    np.testing.assert_allclose(bn.running_mean.numpy(), h.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), h.var(axis=0, ddof=1), rtol=1e-5, atol=1e-5)
    part = exp.precise_copy(model, x, batch_size=64, max_samples=100)
    np.testing.assert_allclose(
        part.blocks[0].norm.running_var.numpy(), h[:100].var(axis=0, ddof=1), rtol=1e-5, atol=1e-5
    )


def test_stats_error_is_the_mean_relative_variance_error() -> None:
    a = _model()
    b = copy.deepcopy(a)
    assert exp.stats_error(a, b) == 0.0
    with torch.no_grad():
        a.blocks[0].norm.running_var.copy_(torch.tensor([2.0, 1.0, 1.0, 0.5, 1.0, 1.0]))
    assert exp.stats_error(a, b) == pytest.approx((1.0 + 0.5) / 6)


@pytest.mark.slow
def test_quick_mode_claims_on_digits_base_seed_0(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="quick", seed=0, data="digits", out=tmp_path))
    seeds = results["metrics"]["seeds"]
    assert len(seeds) in (4, 8, 16, 32) and seeds == list(range(len(seeds)))  # the seed plan's looks from 0
    assert "does not hold" not in [c["verdict"] for c in results["claims"]], results["claims"]


def test_tiny_run_trains_the_seeds_together_and_judges_them(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="tiny", seeds=(0, 1, 2), out=tmp_path))
    per_seed = results["metrics"]["per_seed"]
    assert len(per_seed) == 3 and all(len(r["epoch"]) == results["config"]["epochs"] + 1 for r in per_seed)
    assert [len(c["seeds"]) for c in results["claims"]] == [3] * 4
    for r in per_seed:  # EMA 5 pp below precise at every early checkpoint: the first claim holds
        r["acc_ema"] = [a - 0.05 for a in r["acc_precise"]]
    first = exp.EXPERIMENT.claims(results)[0]
    assert first["verdict"] == "holds" and first["estimate"] == pytest.approx(5.0)
