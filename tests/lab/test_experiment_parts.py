"""Pieces of the phase-2 experiments checked against independent references.

PYTHONPATH=src python -m pytest -q tests/lab/test_experiment_parts.py
"""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from batchnorm.lab.config import RunConfig
from batchnorm.lab.declare import activation_inputs, batch_stats_accuracy
from batchnorm.lab.experiments import dropout, goodfellow_chain, inference_stats, lr_sweep
from batchnorm.lab.models import MLP, blocks


def test_chain_measurement_matches_closed_form_depth_2() -> None:
    """Plain chain of depth 2: f(w1, w2) = mean((x w1 w2 - 2x)^2)/2 in closed form (NumPy float64)."""
    x = torch.randn(50, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = 1.3
    lrs = [1e-3, 0.1, 0.7]
    got = goodfellow_chain._measure(x, 2, s, False, lrs, 1e-12)
    q = float((x.numpy() ** 2).mean())

    def f(w1: float, w2: float) -> float:
        return 0.5 * q * (w1 * w2 - 2.0) ** 2

    g = q * (s * s - 2.0) * s  # df/dw1 = df/dw2
    assert got["loss"] == pytest.approx(f(s, s), rel=1e-12)
    assert got["grad_norm2"] == pytest.approx(2 * g * g, rel=1e-12)
    for lr, pred, act in zip(lrs, got["predicted"], got["actual"]):
        assert pred == pytest.approx(-lr * 2 * g * g, rel=1e-12)
        assert act == pytest.approx(f(s - lr * g, s - lr * g) - f(s, s), rel=1e-9, abs=1e-15)


def test_bn_chain_output_ignores_lower_weights() -> None:
    x = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = goodfellow_chain._measure(x, 4, 0.7, True, [0.1], 1e-12)
    b = goodfellow_chain._measure(x, 4, 1.9, True, [0.1], 1e-12)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-9)
    assert a["actual"][0] == pytest.approx(b["actual"][0], rel=1e-6)


def test_step_probe_restores_the_model_and_matches_a_manual_step() -> None:
    model = MLP(5, [7, 7], 3, act="relu", norm="bn", init_std="he", generator=torch.Generator().manual_seed(0))
    x = torch.randn(20, 5)
    y = torch.randint(0, 3, (20,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ratios = lr_sweep._step_probe(model, x, y, [0.5])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.sub_(0.5 * g)
        after = torch.nn.functional.cross_entropy(model(x), y)
    assert ratios[0] == pytest.approx(float(after) / float(loss.detach()), rel=1e-5)


def test_activation_probes_match_manual_forward() -> None:
    model = MLP(4, [6, 5], 2, act="sigmoid", norm="bn", placement="after", generator=torch.Generator().manual_seed(0))
    model.eval()
    x = torch.randn(9, 4)
    b1, b2 = list(blocks(model))
    with torch.no_grad():
        z1 = b1.layer(x)
        z2 = b2.layer(b1.norm(torch.sigmoid(z1)))
    got = activation_inputs(model, x)  # eval mode, every hidden layer
    torch.testing.assert_close(got[0], z1)
    torch.testing.assert_close(got[1], z2)
    model.train()
    rms = lr_sweep._activation_scales(model, x)
    with torch.no_grad():
        out1 = b1(x)
        out2 = b2(out1)
    assert rms == pytest.approx([float(out1.pow(2).mean().sqrt()), float(out2.pow(2).mean().sqrt())], rel=1e-5)


def test_fixed_batches_partition_the_set_and_repeat() -> None:
    stream = dropout._fixed_batches(20, 5, torch.Generator().manual_seed(0))
    first = list(islice(stream, 4))
    again = list(islice(stream, 4))
    assert sorted(torch.cat(first).tolist()) == list(range(20))
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_batch_statistics_accuracy_uses_each_batch_and_keeps_buffers() -> None:
    model = MLP(3, [4], 2, act="relu", norm="bn", generator=torch.Generator().manual_seed(0))
    x = torch.randn(12, 3)
    y = torch.randint(0, 2, (12,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = batch_stats_accuracy(model, x, y, 12, [torch.randperm(12, generator=torch.Generator().manual_seed(0))])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    with torch.no_grad():
        h = model.blocks[0].layer(x)
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
        h = model.blocks[0].norm.weight * h + model.blocks[0].norm.bias
        logits = model.head(torch.relu(h))
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_first_layer_noise_matches_sampling_theory_on_gaussian_data() -> None:
    model = MLP(3, [16], 2, act="relu", norm="bn", generator=torch.Generator().manual_seed(0))
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1))
    noise = inference_stats._first_layer_noise(model, x, (4, 16), 2000, torch.Generator().manual_seed(2))
    for measured, theory in zip(noise["mean_scatter"], noise["mean_scatter_theory"]):
        assert measured == pytest.approx(theory, rel=0.08)
    # Gaussian: var(sigma_B^2 / sigma^2) for biased variance = 2 (m - 1) / m^2
    assert noise["var_rel_scatter"][1] == pytest.approx(np.sqrt(2 * 15) / 16, rel=0.1)


@pytest.mark.parametrize(
    ("module", "key", "digits_value", "mnist1d_value"),
    [
        ("ioffe2015_fig1", "steps", 5000, 20000),
        ("small_batch", "steps", 500, 2900),
    ],
)
def test_mnist1d_quick_setups_are_recorded_and_digits_are_untouched(
    module: str, key: str, digits_value: int, mnist1d_value: int
) -> None:
    import importlib

    exp = importlib.import_module(f"batchnorm.lab.experiments.{module}")

    def settings(cfg: RunConfig) -> dict:
        if hasattr(exp, "EXPERIMENT"):
            return exp.EXPERIMENT.settings(cfg).record()
        return exp._settings(cfg)

    digits = settings(RunConfig(mode="quick", data="digits"))
    mnist1d = settings(RunConfig(mode="quick", data="mnist1d"))
    assert digits[key] == digits_value and not digits.get("mnist1d_choice")
    assert mnist1d[key] == mnist1d_value and mnist1d["mnist1d_choice"]
