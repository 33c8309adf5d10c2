"""small-batch: the grouped BN / Batch Renorm layers against per-group references, the
non-i.i.d. batch sampler, and the quick-mode claims.

    PYTHONPATH=src python -m pytest -q tests/lab/test_small_batch.py
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm import BatchNorm1d, BatchRenorm1d, batch_renorm
from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiments import small_batch as exp
from batchnorm.lab.figures import save_all
from batchnorm.lab.normalizers import GroupedBatchNorm1d, GroupedBatchRenorm1d
from batchnorm.lab.runner import run_one


def test_grouped_batch_norm_normalizes_each_group_and_averages_group_statistics() -> None:
    torch.manual_seed(0)
    x = torch.randn(12, 3) * torch.tensor([1.0, 3.0, 0.5]) + torch.tensor([0.0, 5.0, -2.0])
    layer = GroupedBatchNorm1d(3, 4, momentum=0.5)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    y = layer(x).detach().double().numpy()
    a = x.double().numpy().reshape(3, 4, 3)  # (G, m, C)
    ref = (a - a.mean(axis=1, keepdims=True)) / np.sqrt(a.var(axis=1, keepdims=True) + 1e-5)
    ref = ref.reshape(12, 3) * np.array([1.5, 0.5, 2.0]) + np.array([0.1, -0.2, 0.3])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.5 * a.mean(axis=1).mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.running_var.numpy(), 0.5 + 0.5 * a.var(axis=1, ddof=1).mean(axis=0), rtol=1e-5)
    assert int(layer.num_batches_tracked) == 1


def test_grouped_batch_norm_with_one_group_is_batch_norm_and_rejects_bad_sizes() -> None:
    x = torch.randn(8, 4)
    a = GroupedBatchNorm1d(4, 8)
    b = BatchNorm1d(4)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.running_var, b.running_var)
    with pytest.raises(ValueError, match="group_size"):
        GroupedBatchNorm1d(4, 1)
    with pytest.raises(ValueError, match="multiple of the group size"):
        GroupedBatchNorm1d(4, 3)(torch.randn(8, 4))


def _renorm_past_schedule(group_size: int) -> tuple[GroupedBatchRenorm1d, torch.Tensor, torch.Tensor]:
    """A 3-channel grouped renorm past its schedule (step 1 > warm-up 0 = ramp ends: limits
    r_max 1.5, d_max 0.5) with known running mean/std (returned) and weight."""
    layer = GroupedBatchRenorm1d(
        3, group_size, momentum=0.2, warmup_steps=0, r_max_steps=0, d_max_steps=0, r_max=1.5, d_max=0.5
    )
    mu0 = torch.tensor([0.5, -1.0, 0.0])
    sigma0 = torch.tensor([2.0, 0.5, 1.0])
    with torch.no_grad():
        layer.num_batches_tracked.fill_(1)
        layer.running_mean.copy_(mu0)
        layer.running_std.copy_(sigma0)
        layer.weight.copy_(torch.tensor([1.2, 0.8, 1.0]))
    return layer, mu0, sigma0


def test_grouped_batch_renorm_matches_the_functional_per_group_with_gradients() -> None:
    torch.manual_seed(1)
    c = 3
    layer, mu0, sigma0 = _renorm_past_schedule(4)
    assert layer.limits() == (1.5, 0.5)
    x = (torch.randn(12, c) * 2 + 1).requires_grad_(True)
    w = torch.randn(12, c)
    y = layer(x)
    (y * w).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    outs = []
    means = []
    stds = []
    for g in range(3):
        chunk = x_ref[4 * g : 4 * g + 4]  # (4, C): group g
        # every group compares with the same mu0, sigma0 (copies: the functional updates them)
        outs.append(
            batch_renorm(chunk, mu0.clone(), sigma0.clone(), layer.weight, layer.bias, True, 0.2, 1e-5, 1.5, 0.5)
        )
        means.append(chunk.detach().mean(0))
        stds.append(torch.sqrt(chunk.detach().var(0, unbiased=False) + 1e-5))
    ref = torch.cat(outs)  # (12, C)
    (ref * w).sum().backward()
    torch.testing.assert_close(y.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_mean, mu0 + 0.2 * (torch.stack(means).mean(0) - mu0))
    torch.testing.assert_close(layer.running_std, sigma0 + 0.2 * (torch.stack(stds).mean(0) - sigma0))
    assert int(layer.num_batches_tracked) == 2


def test_grouped_batch_renorm_with_one_group_is_batch_renorm() -> None:
    x = torch.randn(16, 5)
    a = GroupedBatchRenorm1d(5, 16, warmup_steps=0, r_max_steps=10, d_max_steps=10)
    b = BatchRenorm1d(5, warmup_steps=0, r_max_steps=10, d_max_steps=10)
    for _ in range(3):
        torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.running_std, b.running_std)


def test_non_iid_groups_hold_two_classes_with_two_examples_each() -> None:
    y = torch.arange(10).repeat(20)  # (200,), 20 examples per class
    stream = exp.non_iid_batches(y, 10, torch.Generator().manual_seed(0))
    for batch in itertools.islice(stream, 5):
        assert batch.shape == (32,)
        for g in range(8):
            labels = sorted(y[batch[4 * g : 4 * g + 4]].tolist())
            assert labels[0] == labels[1] and labels[2] == labels[3] and labels[1] != labels[2]


@pytest.mark.slow
def test_quick_mode_claims_on_digits_base_seed_0(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="quick", seed=0, data="digits", out=tmp_path))
    claims = results["claims"]
    assert [c["verdict"] for c in claims] == ["holds"] * 5, claims
    assert [c["n_seeds"] for c in claims] == [8, 4, 4, 8, 4], claims


def _synthetic(
    bn: dict[int, list[float]],
    gn: list[float],
    brn: dict[int, list[float]],
    ghost: dict[int, list[float]],
    ni: dict[str, list[float]],
) -> dict:
    """Saved results with the given per-seed test errors (%), three seeds, quick group sizes."""
    s = exp.EXPERIMENT.settings(RunConfig(mode="quick"))
    per_seed = []
    for k in range(3):
        iid = {
            "bn": {str(m): {"test_error": v[k]} for m, v in bn.items()},
            "brn": {str(m): {"test_error": v[k]} for m, v in brn.items()},
            "ghost": {str(m): {"test_error": v[k]} for m, v in ghost.items()},
            "gn": {"32": {"test_error": gn[k]}},
        }
        per_seed.append({"iid": iid, "non_iid": {n: {"test_error": v[k]} for n, v in ni.items()}})
    return {
        "config": s.record(),
        "data": {"test": 360},
        "metrics": {"seeds": [0, 1, 2], "per_seed": per_seed},
    }


def test_claims_are_judged_over_seeds_with_paired_arms() -> None:
    """Errors built to make each claim hold, then to refute it, then to leave it undecided."""
    good = dict(
        bn={32: [2.0, 2.5, 3.0], 8: [2.5, 3.0, 3.5], 2: [40.0, 45.0, 50.0]},
        gn=[2.2, 2.6, 3.1],
        brn={32: [2.1, 2.4, 3.0], 8: [2.5, 3.0, 3.5], 2: [3.0, 3.5, 4.0]},
        ghost={8: [2.6, 2.9, 3.3], 2: [30.0, 35.0, 40.0]},
        ni={"bn": [20.0, 25.0, 30.0], "brn": [3.0, 3.2, 3.4], "ghost": [10.0, 12.0, 14.0], "gn": [3.0, 3.0, 3.0]},
    )
    claims = exp.EXPERIMENT.claims(_synthetic(**good))
    assert [c["verdict"] for c in claims] == ["holds"] * 5, claims
    assert claims[0]["estimate"] == pytest.approx(45.0 - 2.5)  # paired mean of BN(2) - BN(32)
    assert claims[1]["estimate"] == pytest.approx(
        float(np.exp(np.mean(np.log(np.array([40.0, 45.0, 50.0]) / [2.2, 2.6, 3.1]))))
    )
    # BN at 2 no worse than at 32: the curve claim, GN's and Ghost BN's break are refuted
    flat = dict(
        good,
        bn={32: [2.0, 2.5, 3.0], 8: [2.5, 3.0, 3.5], 2: [2.5, 3.0, 3.4]},
        ghost={8: [2.6, 2.9, 3.3], 2: [2.4, 3.0, 3.5]},
    )
    verdicts = [c["verdict"] for c in exp.EXPERIMENT.claims(_synthetic(**flat))]
    assert verdicts[0] == verdicts[1] == verdicts[4] == "does not hold" and verdicts[2] == "holds"
    # BN 5 pp worse than GN at 32 on every seed: refuted; a scattered difference around +1 pp: undecided
    worse = dict(good, bn={32: [7.2, 7.6, 8.1], 8: [2.5, 3.0, 3.5], 2: [40.0, 45.0, 50.0]})
    assert exp.EXPERIMENT.claims(_synthetic(**worse))[2]["verdict"] == "does not hold"
    noisy = dict(good, gn=[3.0, 0.5, 3.0])
    assert exp.EXPERIMENT.claims(_synthetic(**noisy))[2]["verdict"] == "inconclusive"


@pytest.mark.parametrize("cls", [GroupedBatchNorm1d, GroupedBatchRenorm1d])
def test_a_non_finite_batch_never_reaches_the_running_statistics(cls: type) -> None:
    layer = cls(3, 4)
    layer(torch.randn(8, 3))
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn(8, 3)
    bad[5, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        layer(bad)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, equal_nan=True)


def test_grouped_batch_norm_on_signals_pools_each_groups_samples_and_positions() -> None:
    """(N, C, L): per channel over the group's m samples x L positions; running variance n/(n-1), n = m*L."""
    torch.manual_seed(2)
    x = torch.randn(8, 3, 5) * torch.tensor([1.0, 3.0, 0.5]).view(3, 1) + torch.tensor([0.0, 5.0, -2.0]).view(3, 1)
    layer = GroupedBatchNorm1d(3, 2, momentum=0.5)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    y = layer(x).detach().double().numpy()
    a = x.double().numpy().reshape(4, 2, 3, 5)  # (G, m, C, L)
    mean = a.mean(axis=(1, 3), keepdims=True)  # (G, 1, C, 1)
    var = a.var(axis=(1, 3), keepdims=True)
    ref = (a - mean) / np.sqrt(var + 1e-5)
    ref = ref.reshape(8, 3, 5) * np.array([1.5, 0.5, 2.0]).reshape(3, 1) + np.array([0.1, -0.2, 0.3]).reshape(3, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    n = 2 * 5
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.5 * mean.mean(axis=0).ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.running_var.numpy(), 0.5 + 0.5 * var.mean(axis=0).ravel() * n / (n - 1), rtol=1e-5)
    # eval: the running statistics, per channel, at every position
    layer.eval()
    expected = (x - layer.running_mean.view(3, 1)) / torch.sqrt(layer.running_var.view(3, 1) + 1e-5)
    expected = expected * layer.weight.view(3, 1) + layer.bias.view(3, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_grouped_layers_with_one_group_on_signals_are_torch_and_our_batch_norm() -> None:
    x = torch.randn(6, 4, 7)
    grouped = GroupedBatchNorm1d(4, 6)
    reference = torch.nn.BatchNorm1d(4)
    grouped.train()
    torch.testing.assert_close(grouped(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped.running_var, reference.running_var, rtol=1e-5, atol=1e-6)
    # the grouped path itself: a batch of two copies of x in groups of 6 is BN of x per copy
    two = GroupedBatchNorm1d(4, 6)
    ref2 = torch.nn.BatchNorm1d(4)
    y = ref2(x)  # one update of torch's running statistics from x
    torch.testing.assert_close(two(torch.cat([x, x])), torch.cat([y, y]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two.running_mean, ref2.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two.running_var, ref2.running_var, rtol=1e-5, atol=1e-6)


def test_grouped_batch_renorm_on_signals_matches_the_functional_per_group() -> None:
    torch.manual_seed(3)
    c = 3
    layer, mu0, sigma0 = _renorm_past_schedule(2)
    x = (torch.randn(6, c, 4) * 2 + 1).requires_grad_(True)
    w = torch.randn(6, c, 4)
    y = layer(x)
    (y * w).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    outs = []
    stds = []
    for g in range(3):
        chunk = x_ref[2 * g : 2 * g + 2]  # (2, C, L): group g
        outs.append(
            batch_renorm(chunk, mu0.clone(), sigma0.clone(), layer.weight, layer.bias, True, 0.2, 1e-5, 1.5, 0.5)
        )
        stds.append(torch.sqrt(chunk.detach().var((0, 2), unbiased=False) + 1e-5))
    ref = torch.cat(outs)  # (6, C, L)
    (ref * w).sum().backward()
    torch.testing.assert_close(y.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_std, sigma0 + 0.2 * (torch.stack(stds).mean(0) - sigma0))


def test_mnist1d_uses_a_1d_cnn_that_trains_and_digits_keeps_the_mlp() -> None:
    from batchnorm.lab.datasets import load
    from batchnorm.lab.models import MLP, ConvNet
    from batchnorm.lab.training import TrainSpec, train

    digits = exp.EXPERIMENT.settings(RunConfig(mode="quick", data="digits"))
    assert digits.model == "mlp" and digits.hidden == (100, 100, 100) and not digits.mnist1d_choice
    s = exp.EXPERIMENT.settings(RunConfig(mode="quick", data="mnist1d"))
    assert s.model == "cnn1d" and "1-D CNN" in s.mnist1d_choice
    assert f"gave {s.steps} on mnist1d" in s.steps_rule and "seed 1000" in s.steps_rule and s.steps == 2900
    assert f"gave {digits.steps}" in digits.steps_rule and "seed 1000" in digits.steps_rule
    data = load("mnist1d", 0, small=True)
    assert isinstance(exp._model(load("digits", 0), digits, "bn", 32, 0), MLP)
    model = exp._model(data, s, "bn", 2, 0)
    assert isinstance(model, ConvNet)
    assert isinstance(model.blocks[0].layer, torch.nn.Conv1d) and isinstance(model.blocks[0].norm, GroupedBatchNorm1d)
    assert model(data.test_x[:6]).shape == (6, data.classes)  # training mode: 3 groups of 2
    result = train(
        model,
        data.train_x,
        data.train_y,
        TrainSpec(steps=500, batch_size=32, lr=0.1),
        generator=torch.Generator().manual_seed(0),
    )
    first = sum(result.losses[:20]) / 20
    last = sum(result.losses[-20:]) / 20
    assert first > 2.0 and last < 0.8 * first  # chance: ln 10 = 2.30


def test_every_arm_of_a_seed_starts_from_the_same_weights() -> None:
    from batchnorm.lab.datasets import load

    data = load("digits", 0)
    s = exp.EXPERIMENT.settings(RunConfig(mode="tiny"))
    models = [exp._model(data, s, norm, m, 3) for norm, m, _iid in exp._arms(s)]
    for other in models[1:]:
        for a, b in zip(models[0].blocks, other.blocks):
            torch.testing.assert_close(a.layer.weight, b.layer.weight, rtol=0, atol=0)
    assert not torch.equal(exp._model(data, s, "bn", 32, 4).blocks[0].layer.weight, models[0].blocks[0].layer.weight)


def test_report_states_a_data_specific_setup_only_when_there_is_one() -> None:
    from batchnorm.lab.report import experiment_html

    noted = experiment_html({"id": "x", "config": {"mnist1d_choice": "a 1-D CNN <here>"}}, [], "")
    assert "Setup changed for this data:</b> a 1-D CNN &lt;here&gt;" in noted
    assert "Setup changed" not in experiment_html({"id": "x", "config": {"steps": 1}}, [], "")


@pytest.mark.parametrize("data", ["digits", "mnist1d"])
@pytest.mark.parametrize("mode", ["tiny", "quick", "full"])
def test_claims_and_figures_read_only_the_arms_that_are_trained(data: str, mode: str, tmp_path: Path) -> None:
    """The 1-D CNN trains fewer arms (BRN at the ends only, no non-i.i.d. Ghost BN or GN): the
    claims and figures must work from exactly the metrics ``run_seeds`` records."""
    s = exp._settings_for(data, mode)
    per_seed = []
    for k in range(3):
        m: dict = {"iid": {n: {} for n in exp._NORMS}, "non_iid": {}}
        for norm, size, iid in exp._arms(s):
            rec = {"test_error": 5.0 + k + (30.0 if size == 2 and norm in ("bn", "ghost") else 0.0)}
            if iid:
                m["iid"][norm][str(size)] = rec
            else:
                m["non_iid"][norm] = rec
        per_seed.append(m)
    results = {
        "config": s.record(),
        "data": {"test": 360},
        "metrics": {"seeds": [0, 1, 2], "per_seed": per_seed},
    }
    claims = exp.EXPERIMENT.claims(results)
    assert len(claims) == 5 and all(c["verdict"] in ("holds", "does not hold", "inconclusive") for c in claims)
    assert all(p.is_file() for p in save_all(exp.EXPERIMENT.figures(results), tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("data", ["digits", "mnist1d"])
def test_the_step_counts_are_what_the_calibration_rule_gives(data: str) -> None:
    """The recorded step counts (``small_batch.steps.json``) come from
    ``scripts/calibrate_lab_steps.py`` (about a minute per data set)."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "calibrate_lab_steps.py"
    spec = importlib.util.spec_from_file_location("calibrate_lab_steps", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.calibrate(data)["steps"] == exp._calibrated_steps()[data]
