"""santurkar2018-landscape: the walk along the gradient against an explicit computation, and
the quick-mode claims.

    PYTHONPATH=src python -m pytest -q tests/lab/test_santurkar2018_landscape.py
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiments import santurkar2018_landscape as exp
from batchnorm.lab.models import MLP
from batchnorm.lab.runner import run_one


def _loss_and_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("norm", [None, "bn"])
def test_walk_matches_explicit_steps_and_leaves_the_model_unchanged(norm: str | None) -> None:
    torch.manual_seed(0)
    x = torch.randn(24, 5)
    y = torch.randint(0, 3, (24,))
    model = MLP(5, [7, 7], 3, act="relu", norm=norm, init_std=0.6, generator=torch.Generator().manual_seed(1))
    model.train()
    state = copy.deepcopy(model.state_dict())
    etas = [0.1, 0.4]
    got = exp.landscape(model, x, y, etas)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())

    ref = copy.deepcopy(model)
    loss0, g0 = _loss_and_grad(ref, x, y)
    expected_losses = [loss0]
    expected_changes = []
    for eta in etas:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            offset = 0
            for p in moved.parameters():
                n = p.numel()
                p.sub_(eta * g0[offset : offset + n].view_as(p))
                offset += n
        loss, g = _loss_and_grad(moved, x, y)
        expected_losses.append(loss)
        expected_changes.append(float((g0 - g).norm()))
    assert got["losses"] == pytest.approx(expected_losses, rel=1e-5)
    assert got["grad_change"] == pytest.approx(expected_changes, rel=1e-4)
    assert got["loss_variation"] == pytest.approx(max(expected_losses) - min(expected_losses), rel=1e-4)
    assert got["grad_predictiveness"] == pytest.approx(max(expected_changes), rel=1e-4)
    beta = max(c / (eta * float(g0.norm())) for c, eta in zip(expected_changes, etas))
    assert got["beta_eff"] == pytest.approx(beta, rel=1e-4)


def test_claims_are_paired_ratios_judged_over_seeds(tmp_path: Path) -> None:
    """Each seed contributes its geometric-mean ratio BN / no BN; a seed set where BN is 3x
    rougher everywhere refutes the claims."""
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="tiny", seeds=(0, 1, 2), out=tmp_path))
    assert [len(c["seeds"]) for c in results["claims"]] == [3] * 3
    m = results["metrics"]["per_seed"][0]
    gm_bn, gm_none, n, _low, total = exp._seed_means(m, "beta_eff", 0.05)
    none = [e["beta_eff"] for e in m["none"]["landscape"]]
    bn = [e["beta_eff"] for e in m["bn"]["landscape"]]
    assert n == total == len(none)  # tiny: the plain network is still learning everywhere
    assert gm_bn / gm_none == pytest.approx(float(np.exp(np.mean(np.log(np.divide(bn, none))))), rel=1e-9)
    for m in results["metrics"]["per_seed"]:
        for e_none, e_bn in zip(m["none"]["landscape"], m["bn"]["landscape"]):
            for key in ("loss_variation", "grad_predictiveness", "beta_eff"):
                e_bn[key] = 3.0 * e_none[key] * (1.0 + 0.01 * len(m["bn"]["step"]))
    assert [c["verdict"] for c in exp.EXPERIMENT.claims(results)] == ["does not hold"] * 3


@pytest.mark.slow
def test_quick_mode_claims_hold_on_digits(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="quick", seed=0, data="digits", out=tmp_path))
    seeds = results["metrics"]["seeds"]
    assert len(seeds) in (4, 8, 16, 32) and seeds == list(range(len(seeds)))  # the seed plan's looks from 0
    failed = [c for c in results["claims"] if not c["holds"]]
    assert not failed, failed
