"""``ioffe2015-fig1``: the quick-mode claims hold on digits at the default seed, and the
sigmoid-input probe measures what it says.

    PYTHONPATH=src python -m pytest -q tests/lab/test_ioffe2015_fig1.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from batchnorm.lab.config import RunConfig
from batchnorm.lab.declare import activation_inputs
from batchnorm.lab.experiments import ioffe2015_fig1 as exp
from batchnorm.lab.models import MLP, blocks
from batchnorm.lab.runner import run_one


def test_sigmoid_input_probe_is_gamma_xhat_plus_beta_and_leaves_buffers_alone() -> None:
    model = MLP(6, [5, 4], 3, act="sigmoid", norm="bn")
    last = list(blocks(model))[-1]
    with torch.no_grad():
        last.norm.weight.fill_(2.0)
        last.norm.bias.fill_(0.5)
    x = torch.randn(12, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    z = activation_inputs(model, x, batch=6, layers=[1])[0][:, 1]  # the probe of the sigmoid inputs
    # reference: batch statistics of each half, by hand
    first = list(blocks(model))[0]  # gamma 1, beta 0, no Linear bias
    expected = []
    with torch.no_grad():
        for half in (x[:6], x[6:]):
            h = torch.sigmoid(_bn(half @ first.layer.weight.T))  # (6, 5)
            pre = h @ last.layer.weight.T  # (6, 4)
            expected.append(2.0 * _bn(pre)[:, 1] + 0.5)
    torch.testing.assert_close(z, torch.cat(expected), rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def _bn(h: torch.Tensor) -> torch.Tensor:
    return (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)


@pytest.mark.slow
def test_quick_mode_claims_on_digits_base_seed_0(tmp_path: Path) -> None:
    """The seed plan settles every claim (the demo): all five hold, the spread claim at 16 seeds."""
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="quick", seed=0, out=tmp_path))
    claims = results["claims"]
    assert [c["verdict"] for c in claims] == ["holds"] * 5, claims
    assert [c["n_seeds"] for c in claims] == [4, 4, 16, 8, 8], claims
    assert results["metrics"]["seeds"] == list(range(16))
    assert results["config"]["lr"] == 0.1 and results["config"]["init_std"] == 0.1


def test_claims_judge_each_seed(tmp_path: Path) -> None:
    """A refuting seed set gives `does not hold`: the claims read every seed's metrics."""
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="tiny", seeds=(0, 1, 2), out=tmp_path))
    assert [len(c["seeds"]) for c in results["claims"]] == [3] * 5
    for rec in results["metrics"]["per_seed"]:
        # BN below the baseline by 50 pp at every checkpoint, on every seed
        rec["bn"]["test_acc"] = [a - 0.5 for a in rec["baseline"]["test_acc"]]
    first = exp.EXPERIMENT.claims(results)[0]
    assert first["verdict"] == "does not hold" and first["estimate"] == pytest.approx(-0.5)
