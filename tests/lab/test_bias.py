# .venv/bin/python -m pytest -q tests/lab/test_bias.py
"""``bias`` over seeds: the paired float64 runs really coincide, removing the bias from a trained
model needs the running mean, a refuting seed set does not hold, and quick mode holds."""

from __future__ import annotations

from pathlib import Path

import torch

from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiments import bias as exp
from batchnorm.lab.models import MLP, blocks
from batchnorm.lab.runner import run_one


def test_tiny_run_pairs_the_arms_exactly_and_claims_read_every_seed(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="tiny", seeds=(0, 1, 2), out=tmp_path))
    per = results["metrics"]["per_seed"]
    assert torch.get_default_dtype() == torch.float32  # the float64 block restored it
    for m in per:
        assert len(m["paired_losses_with_bias"]) == results["config"]["steps"]
        assert m["paired_training_max_loss_delta"] < 1e-12  # float64: the two runs coincide
        assert max(m["bias_grad_max"]) < 1e-5 * min(m["weight_grad_max"])
    assert [c["verdict"] for c in results["claims"]] == ["holds"] * 4, results["claims"]
    for m in per:  # a bias gradient as large as the weights' on every seed
        m["bias_grad_max"] = list(m["weight_grad_max"])
    first = exp.EXPERIMENT.claims(results)[0]
    assert first["verdict"] == "does not hold" and first["seeds"] == [0, 1, 2]


def test_eval_removal_leaves_the_model_alone_and_folding_is_exact() -> None:
    model = MLP(5, [6, 4], 3, norm="bn", bias=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in blocks(model):  # random pre-BN biases and running means
            b.layer.bias.copy_(torch.randn(b.layer.bias.shape))
            b.norm.running_mean.copy_(torch.randn(b.norm.running_mean.shape))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = exp._eval_removal(model, torch.randn(30, 5))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert got["eval_output_change_bias_folded_into_running_mean"] < 1e-5
    assert got["eval_output_change_bias_zeroed"] > 1e-2


def test_quick_mode_claims_hold_at_the_first_look(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="quick", seed=0, out=tmp_path))
    assert results["metrics"]["seeds"] == [0, 1, 2, 3]  # the first look (4 seeds) decides every claim
    assert [c["verdict"] for c in results["claims"]] == ["holds"] * 4, results["claims"]
    assert [c["kind"] for c in results["claims"]] == ["identity"] * 4  # consequences of the math
