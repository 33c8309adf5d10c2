"""santurkar2018-ics: the ICS measurement (Def. 2.1) against an independent computation, and
the quick-mode claims.

    PYTHONPATH=src python -m pytest -q tests/lab/test_santurkar2018_ics.py
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiments import santurkar2018_ics as exp
from batchnorm.lab.models import MLP, blocks
from batchnorm.lab.runner import run_one


def _model(norm: str | None) -> MLP:
    return MLP(6, [5, 5, 5], 3, act="relu", norm=norm, init_std=0.5, generator=torch.Generator().manual_seed(0))


def _grad_of_layer(model: MLP, x: torch.Tensor, y: torch.Tensor, i: int) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return list(blocks(model))[i].layer.weight.grad.detach().clone()


@pytest.mark.parametrize("norm", [None, "bn"])
def test_ics_matches_an_explicit_update_of_the_earlier_layers(norm: str | None) -> None:
    torch.manual_seed(1)
    x = torch.randn(16, 6)
    y = torch.randint(0, 3, (16,))
    lr = 0.3
    model = _model(norm)
    model.train()
    got = exp.ics(model, x, y, lr, F.cross_entropy)
    assert [g["layer"] for g in got] == [2, 3]
    for entry in got:
        i = entry["layer"] - 1
        ref = copy.deepcopy(model)
        g_before = _grad_of_layer(ref, x, y, i)
        grads = {name: p.grad.detach().clone() for name, p in ref.named_parameters()}
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.startswith("blocks.") and int(name.split(".")[1]) < i:  # "blocks.K.layer.weight"
                    p.sub_(lr * grads[name])
        # the reference's running statistics moved during its first pass: restore them
        ref.load_state_dict(
            {**ref.state_dict(), **{k: v for k, v in model.state_dict().items() if "running" in k or "tracked" in k}}
        )
        g_after = _grad_of_layer(ref, x, y, i)
        diff = float((g_before - g_after).norm())
        assert entry["l2"] == pytest.approx(diff, rel=1e-4, abs=1e-7)
        assert entry["cos"] == pytest.approx(
            float(F.cosine_similarity(g_before.flatten(), g_after.flatten(), dim=0)), abs=1e-5
        )
        assert entry["rel_l2"] == pytest.approx(diff / float(g_before.norm()), rel=1e-4, abs=1e-7)
        assert entry["l2"] > 0


def test_ics_leaves_the_model_unchanged_and_vanishes_for_a_tiny_step() -> None:
    x = torch.randn(16, 6)
    y = torch.randint(0, 3, (16,))
    model = _model("bn")
    state = copy.deepcopy(model.state_dict())
    tiny = exp.ics(model, x, y, 1e-7, F.cross_entropy)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    assert all(e["cos"] > 1 - 1e-4 and e["rel_l2"] < 1e-3 for e in tiny)


def test_claims_read_each_seeds_median(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="tiny", seeds=(0, 1, 2), out=tmp_path))
    assert [len(c["seeds"]) for c in results["claims"]] == [3] * 3
    m = results["metrics"]["per_seed"][1]["dln"]["bn"]
    expected = float(np.median([v["l2"] for step, layers in zip(m["step"], m["ics"]) if step > 0 for v in layers]))
    assert exp._median(m, "l2") == pytest.approx(expected)
    for m in results["metrics"]["per_seed"]:  # BN's DLN gradients unchanged by the earlier layers' step: no ICS
        for k, layers in enumerate(m["dln"]["bn"]["ics"]):
            for v in layers:
                v["l2"], v["cos"] = 1e-6 * (1 + k), 1.0
        for k, layers in enumerate(m["dln"]["none"]["ics"]):
            for v in layers:
                v["cos"] = 0.9 - 0.01 * k
    verdicts = [c["verdict"] for c in exp.EXPERIMENT.claims(results)]
    assert verdicts[:2] == ["does not hold", "does not hold"]


@pytest.mark.slow
def test_quick_mode_on_digits_seeds_0_to_2(tmp_path: Path) -> None:
    """No claim is refuted; BN's larger l2 change in the DLN holds."""
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="quick", seed=0, data="digits", out=tmp_path))
    verdicts = [c["verdict"] for c in results["claims"]]
    assert "does not hold" not in verdicts and verdicts[0] == "holds", results["claims"]
