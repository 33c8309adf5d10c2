"""Tests for batchnorm.tools.stats: Moments and recompute_statistics.

PYTHONPATH=src python -m pytest -q tests/test_stats.py
"""

from __future__ import annotations

import copy
import gc
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from batchnorm import BatchNorm1d, BatchNorm2d, Moments, recompute_statistics
from batchnorm.tools.stats import all_reduce_moments


def np_stats(x: np.ndarray, axis: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64 mean and unbiased variance of the concatenated data."""
    x = np.asarray(x, dtype=np.float64)
    return x.mean(axis=axis), x.var(axis=axis, ddof=1)


# ------------------------------------------------------------------------------------ Moments


@pytest.mark.parametrize("shape,dims", [((50, 3), (0,)), ((6, 4, 5, 7), (0, 2, 3)), ((3, 2, 4, 3, 2), (0, 2, 3, 4))])
def test_moments_match_numpy(shape: tuple[int, ...], dims: tuple[int, ...]) -> None:
    x = torch.randn(shape) * 3 + 2
    mo = Moments.from_tensor(x, dims)
    mean, var = np_stats(x.numpy(), dims)
    n = int(np.prod([shape[d] for d in dims]))
    assert float(mo.count) == n
    np.testing.assert_allclose(mo.mean.numpy(), mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(mo.var(unbiased=True).numpy(), var, rtol=1e-12)
    np.testing.assert_allclose(mo.var(unbiased=False).numpy(), var * (n - 1) / n, rtol=1e-12)


def test_merge_independent_of_split_and_order() -> None:
    x = torch.randn(997, 5, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1e3]) + 7
    whole = Moments.from_tensor(x, 0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        cuts = sorted(torch.randint(1, 997, (20,), generator=gen).tolist())
        chunks = [c for c in torch.tensor_split(x, cuts) if True]
        order = torch.randperm(len(chunks), generator=gen).tolist()
        acc = Moments.empty(5)
        for i in order:
            acc = acc.merge(Moments.from_tensor(chunks[i], 0))
        assert float(acc.count) == 997
        assert_close(acc.mean, whole.mean, rtol=1e-13, atol=1e-12)
        assert_close(acc.m2, whole.m2, rtol=1e-12, atol=0)
    # tree merge (pairs of pairs) equals the left fold
    parts = [Moments.from_tensor(c, 0) for c in torch.tensor_split(x, 8)]
    while len(parts) > 1:
        parts = [parts[i].merge(parts[i + 1]) for i in range(0, len(parts), 2)]
    assert_close(parts[0].m2, whole.m2, rtol=1e-12, atol=0)


def test_empty_is_identity_and_singleton_var_is_nan() -> None:
    x = torch.randn(10, 3)
    mo = Moments.from_tensor(x, 0)
    for merged in (Moments.empty(3).merge(mo), mo.merge(Moments.empty(3)), mo.merge(Moments.from_tensor(x[:0], 0))):
        assert_close(merged.mean, mo.mean, rtol=0, atol=0)
        assert_close(merged.m2, mo.m2, rtol=0, atol=0)
    empty = Moments.empty(3).merge(Moments.empty(3))
    assert float(empty.count) == 0 and torch.all(empty.mean == 0) and torch.all(empty.m2 == 0)
    assert torch.isnan(Moments.from_tensor(x[:1], 0).var(unbiased=True)).all()


def test_large_mean_small_std_float32_does_not_cancel() -> None:
    x = (1e4 + 1e-2 * torch.randn(64, 4, 32, dtype=torch.float64)).float()
    # batches of 8: the sum of squares would be ~1e8 with a float32 ulp of 8 >> var 1e-4
    acc = Moments.empty(4)
    for chunk in x.split(8):
        acc = acc.merge(Moments.from_tensor(chunk, (0, 2)))
    mean, var = np_stats(x.numpy(), (0, 2))
    np.testing.assert_allclose(acc.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(acc.var().numpy(), var, rtol=1e-9)


def test_half_precision_input_accumulates_in_float64() -> None:
    x = torch.randn(4096, 2).to(torch.bfloat16)
    mo = Moments.from_tensor(x, 0)
    mean, var = np_stats(x.float().numpy(), (0,))
    np.testing.assert_allclose(mo.var().numpy(), var, rtol=1e-12)
    np.testing.assert_allclose(mo.mean.numpy(), mean, rtol=1e-10, atol=1e-14)


def test_moments_errors() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        Moments.from_tensor(torch.arange(5), 0)
    with pytest.raises(ValueError, match="same shape"):
        Moments.empty(3).merge(Moments.empty(4))
    # out-of-range dims used to wrap around silently (5 -> 1: reduced over the channels)
    x = torch.randn(2, 3, 4, 4)
    for dims in (5, [0, 4, 2, 3], -5, []):
        with pytest.raises(ValueError, match=r"expected dims in \[-4, 3\].*\(2, 3, 4, 4\)"):
            Moments.from_tensor(x, dims)
    assert Moments.from_tensor(x, [-4, -2, -1]).mean.shape == (3,)


def test_vector_roundtrip_and_no_process_group() -> None:
    mo = Moments.from_tensor(torch.randn(9, 2, 3), 0)
    back = Moments.from_vector(mo.to_vector(), (2, 3))
    assert_close(back.m2, mo.m2, rtol=0, atol=0)
    assert all_reduce_moments([mo])[0] is mo


# ----------------------------------------------------------------------- recompute_statistics


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5), BatchNorm1d(5))


def class_sorted_data(n_per_class: int = 40, classes: int = 4, dim: int = 6) -> torch.Tensor:
    """Inputs whose class means differ a lot, ordered by class (non-i.i.d. batches)."""
    centres = torch.randn(classes, dim) * 4
    return torch.cat([centres[k] + torch.randn(n_per_class, dim) for k in range(classes)])


def bn_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Reference inputs of every BN layer: one eval-mode forward of the whole data set."""
    ref = copy.deepcopy(model).eval()
    seen: dict[str, np.ndarray] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, name=name: seen.__setitem__(name, a[0].double().numpy()))
        for name, m in ref.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    return seen


def test_recompute_matches_numpy_population_stats_and_is_split_invariant() -> None:
    model = mlp()
    x = class_sorted_data()
    inputs = bn_inputs(model, x)
    results = []
    for bs in (7, 32, 160):
        m = copy.deepcopy(model)
        report = recompute_statistics(m, list(x.split(bs)))
        results.append(m)
        assert [r.name for r in report] == ["1", "4"]
        assert all(r.updated and r.samples == 160 for r in report)
        for name in ("1", "4"):
            mean, var = np_stats(inputs[name], (0,))
            bn = m.get_submodule(name)
            np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-6)
    for other in results[1:]:
        for a, b in zip(results[0].buffers(), other.buffers()):
            assert_close(a, b, rtol=1e-6, atol=1e-7)
    # shuffled order: same statistics
    m = copy.deepcopy(model)
    recompute_statistics(m, list(x[torch.randperm(160)].split(16)))
    assert_close(m[1].running_var, results[0][1].running_var, rtol=1e-6, atol=0)


def test_update_bn_misses_between_batch_variance_but_we_do_not() -> None:
    from torch.optim.swa_utils import update_bn

    model = nn.Sequential(nn.BatchNorm1d(6))
    x = class_sorted_data()
    mean, var = np_stats(x.numpy(), (0,))
    theirs = copy.deepcopy(model)
    update_bn([(b,) for b in x.split(40)], theirs)  # one class per batch
    err_theirs = np.abs(theirs[0].running_var.double().numpy() / var - 1).max()
    ours = copy.deepcopy(model)
    recompute_statistics(ours, x.split(40))
    err_ours = np.abs(ours[0].running_var.double().numpy() / var - 1).max()
    assert err_theirs > 0.5  # update_bn drops Var_B[mean_B]: most of the variance here
    assert err_ours < 1e-6


def test_large_mean_small_std_in_a_model() -> None:
    model = nn.Sequential(BatchNorm2d(3))
    x = (1e4 + 1e-2 * torch.randn(32, 3, 5, 5, dtype=torch.float64)).float()
    recompute_statistics(model, x.split(4))
    mean, var = np_stats(x.numpy(), (0, 2, 3))
    np.testing.assert_allclose(model[0].running_var.double().numpy(), var, rtol=1e-6)
    np.testing.assert_allclose(model[0].running_mean.double().numpy(), mean, rtol=1e-7)  # float32 buffer


class SubBN(nn.BatchNorm2d):
    """A user subclass: still a batch norm."""


class DictNet(nn.Module):
    """A conv net with a residual block, torch/ours/subclass/SyncBatchNorm, and a dict input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = SubBN(4)
        self.bn2 = BatchNorm2d(4)
        self.sync = nn.SyncBatchNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv(self.stem(batch["image"]))))
        h = h + self.bn2(self.conv(h))  # the conv is used twice
        h = self.sync(h) * batch["scale"][:, None, None, None]
        return self.head(h.mean(dim=(2, 3)))


def test_dict_model_with_subclass_sync_and_shared_conv() -> None:
    model = DictNet()
    images = torch.randn(24, 3, 6, 6) + 1
    scale = torch.rand(24) + 0.5
    ref = copy.deepcopy(model).eval()
    seen: dict[str, list[np.ndarray]] = {}
    for name in ("bn1", "bn2", "sync"):
        ref.get_submodule(name).register_forward_pre_hook(
            lambda mod, a, name=name: seen.setdefault(name, []).append(a[0].double().numpy())
        )
    with torch.no_grad():
        ref({"image": images, "scale": scale})
    data = [{"image": images[i : i + 5], "scale": scale[i : i + 5]} for i in range(0, 24, 5)]
    report = recompute_statistics(model, data, forward=lambda m, b: m(b))
    assert {r.name: r.kind for r in report} == {"bn1": "SubBN", "bn2": "BatchNorm2d", "sync": "SyncBatchNorm"}
    for name in ("bn1", "bn2", "sync"):
        mean, var = np_stats(np.concatenate(seen[name]), (0, 2, 3))
        bn = model.get_submodule(name)
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5)
    assert all(r.samples == 24 * 36 for r in report)


def test_default_forward_for_dict_and_tuple_batches() -> None:
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
            return self.bn(x + shift)

    x = torch.randn(30, 3)
    m = KW()
    recompute_statistics(m, [{"x": c, "shift": torch.ones(1)} for c in x.split(7)])
    np.testing.assert_allclose(m.bn.running_mean.double().numpy(), np_stats(x.numpy() + 1, (0,))[0], rtol=1e-6)
    m2 = nn.Sequential(nn.BatchNorm1d(3))
    recompute_statistics(m2, [(c, torch.zeros(len(c))) for c in x.split(7)])  # (input, target)
    np.testing.assert_allclose(m2[0].running_var.double().numpy(), np_stats(x.numpy(), (0,))[1], rtol=1e-6)
    with pytest.raises(TypeError, match="forward="):
        recompute_statistics(m2, [3.0])


def test_max_samples_uses_exactly_the_first_samples() -> None:
    x = torch.randn(100, 4) * 2
    m = nn.Sequential(nn.BatchNorm1d(4))
    report = recompute_statistics(m, [(c, c) for c in x.split(16)], max_samples=37)
    assert report[0].samples == 37
    mean, var = np_stats(x[:37].numpy(), (0,))
    np.testing.assert_allclose(m[0].running_var.double().numpy(), var, rtol=1e-6)
    np.testing.assert_allclose(m[0].running_mean.double().numpy(), mean, rtol=1e-6, atol=1e-7)


def test_state_restored_and_stats_untouched_on_error() -> None:
    model = mlp()
    model.train()
    model[3].eval()  # a mixed-mode model: flags are restored per module
    before = copy.deepcopy(model.state_dict())
    calls = {"n": 0}

    def boom(m: nn.Module, b: torch.Tensor) -> None:
        calls["n"] += 1
        m(b)
        if calls["n"] == 2:
            raise RuntimeError("loader failed")

    with pytest.raises(RuntimeError, match="loader failed"):
        recompute_statistics(model, torch.randn(40, 6).split(10), forward=boom)
    for k, v in model.state_dict().items():
        assert_close(v, before[k], rtol=0, atol=0)
    assert [m.training for m in model] == [True, True, True, False, True]
    assert all(m.track_running_stats for m in (model[1], model[4]))
    assert not any(m._forward_pre_hooks for m in model.modules())
    # after a successful run too: flags and momentum unchanged, no hooks
    recompute_statistics(model, torch.randn(40, 6).split(10), mode="train")
    assert [m.training for m in model] == [True, True, True, False, True]
    assert model[1].momentum == 0.1 and model[1].track_running_stats
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert int(model[1].num_batches_tracked) == int(before["1.num_batches_tracked"])


def test_non_finite_data_raises_and_changes_nothing() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2))
    x = torch.randn(20, 2)
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        recompute_statistics(model, x.split(5))
    assert torch.all(model[0].running_mean == 0) and torch.all(model[0].running_var == 1)


def test_frozen_and_untracked_layers_are_reported_not_changed() -> None:
    from batchnorm import FrozenBatchNorm1d

    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), FrozenBatchNorm1d(3), nn.BatchNorm1d(3))
    report = recompute_statistics(model, [torch.randn(8, 3) * 3])
    assert [(r.name, r.updated, r.note) for r in report] == [
        ("0", False, "no running statistics of mean/variance"),
        ("1", False, "frozen"),
        ("2", True, ""),
    ]
    assert torch.all(model[1].running_var == 1)


def test_batch_renorm_is_reported_not_skipped_silently() -> None:
    from batchnorm import BatchRenorm1d

    model = nn.Sequential(nn.BatchNorm1d(3), BatchRenorm1d(3))
    report = recompute_statistics(model, [torch.randn(8, 3) * 3])
    assert [(r.name, r.updated) for r in report] == [("0", True), ("1", False)]
    assert "running std" in report[1].note
    assert torch.all(model[1].running_std == 1) and torch.all(model[1].running_mean == 0)


def test_unused_layer_is_reported_and_warned() -> None:
    model = nn.ModuleDict({"used": nn.BatchNorm1d(2), "unused": nn.BatchNorm1d(2)})
    with pytest.warns(RuntimeWarning, match="unused"):
        report = recompute_statistics(model, [torch.randn(5, 2)], forward=lambda m, b: m["used"](b))
    by = {r.name: r for r in report}
    assert by["used"].updated and not by["unused"].updated and by["unused"].samples == 0
    assert torch.all(model["unused"].running_var == 1)


def test_eval_mode_passes_converge_to_the_inference_network() -> None:
    """With fresh (0, 1) statistics, pass 1 gives layer 2 the statistics of a network whose
    layer 1 is still unnormalized; pass 2 gives the exact inference-network statistics."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].bias.fill_(5.0)
    x = torch.randn(64, 6)
    # reference: set layer 1 from NumPy, then layer 2 from the inference network
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        h1 = ref[0](x).double().numpy()
        m1, v1 = np_stats(h1, (0,))
        ref[1].running_mean.copy_(torch.from_numpy(m1))
        ref[1].running_var.copy_(torch.from_numpy(v1))
        h2 = ref[2](ref[1](ref[0](x))).double().numpy()
    m2, v2 = np_stats(h2, (0,))
    one = copy.deepcopy(model)
    recompute_statistics(one, x.split(16))
    assert np.abs(one[3].running_var.double().numpy() / v2 - 1).max() > 0.1  # stale layer 1 upstream
    two = copy.deepcopy(model)
    report = recompute_statistics(two, x.split(16), passes=2)
    np.testing.assert_allclose(two[3].running_var.double().numpy(), v2, rtol=1e-5)
    np.testing.assert_allclose(two[3].running_mean.double().numpy(), m2, rtol=1e-5, atol=1e-6)
    assert report[1].var_change > 0  # measured against the statistics before the call
    with pytest.raises(ValueError, match="re-iterable"):
        recompute_statistics(model, iter(x.split(16)), passes=2)


def test_train_mode_uses_batch_statistics_upstream() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3), nn.BatchNorm1d(3))
    x = torch.randn(64, 6)
    chunks = x.split(16)
    # reference: layer 2's input when layer 1 normalizes each batch with its own statistics
    with torch.no_grad():
        h2 = []
        for c in chunks:
            h = model[0](c).double()
            h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + model[1].eps)
            h = h * model[1].weight.double() + model[1].bias.double()
            h2.append(model[2].double()(h).numpy())
        model[2].float()
    m2, v2 = np_stats(np.concatenate(h2), (0,))
    recompute_statistics(model, chunks, mode="train")
    np.testing.assert_allclose(model[3].running_var.double().numpy(), v2, rtol=1e-5)
    np.testing.assert_allclose(model[3].running_mean.double().numpy(), m2, rtol=1e-5, atol=1e-6)


def test_argument_errors() -> None:
    m = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(TypeError, match="nn.Module"):
        recompute_statistics("model", [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        recompute_statistics(m, [], mode="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_samples"):
        recompute_statistics(m, [], max_samples=0)
    with pytest.raises(ValueError, match="passes"):
        recompute_statistics(m, [], passes=0)
    # a bare tensor would be iterated row by row: 1-D rows the layer rejects (or, for 3-D data,
    # batches of one sample each); refused with what was expected
    for bad in (5, torch.randn(8, 2)):
        with pytest.raises(TypeError, match="expected data to be an iterable of batches"):
            recompute_statistics(m, bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- distributed


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = mlp()  # same weights on every rank
        x = class_sorted_data()  # same data set everywhere; each rank takes a different share
        share = x[:50] if rank == 0 else x[50:]  # unequal counts: 50 and 110
        report = recompute_statistics(model, share.split(16))
        torch.save(
            {"state": model.state_dict(), "samples": [r.samples for r in report]}, os.path.join(out_dir, f"{rank}.pt")
        )
    finally:
        gc.collect()  # nothing may still hold the group when it is torn down (docs/distributed.md)
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_two_ranks_end_identical_and_exact(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "0.pt")
    r1 = torch.load(tmp_path / "1.pt")
    assert r0["samples"] == r1["samples"] == [160, 160]
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    torch.manual_seed(0)
    model = mlp()
    x = class_sorted_data()
    inputs = bn_inputs(model, x)
    for name in ("1", "4"):
        mean, var = np_stats(inputs[name], (0,))
        np.testing.assert_allclose(r0["state"][f"{name}.running_mean"].double().numpy(), mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(r0["state"][f"{name}.running_var"].double().numpy(), var, rtol=1e-6)


# ------------------------------------------------------------------- the numba fast path


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(9, 5) * 3 + 1,  # (N, C)
        lambda: torch.randn(4, 5, 7) + 2,  # (N, C, L)
        lambda: (torch.randn(3, 5, 6, 4) * 2).to(memory_format=torch.channels_last),
        lambda: torch.randn(3, 5, 6, 4, dtype=torch.float64)[:, :, ::2],  # strided: torch path
        lambda: torch.randn(2, 5, 3, 3, 2),
    ],
)
def test_fast_path_equals_two_pass_torch(make, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchnorm.tools import _moments_cpu

    x = make()
    dims = [0, *range(2, x.dim())]
    fast = Moments.from_tensor(x, dims)
    monkeypatch.setattr(_moments_cpu, "available", lambda: False)  # as without numba
    slow = Moments.from_tensor(x, dims)
    mean, var = np_stats(x.numpy(), tuple(dims))
    for mo in (fast, slow):
        np.testing.assert_allclose(mo.mean.numpy(), mean, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(mo.var().numpy(), var, rtol=1e-11)


def test_fast_path_outlier_shift_falls_back_and_nan_propagates() -> None:
    x = torch.randn(50, 3, dtype=torch.float64)
    x[0, 1] = 1e9  # the shift of channel 1 is an extreme outlier
    mo = Moments.from_tensor(x, 0)
    mean, var = np_stats(x.numpy(), (0,))
    np.testing.assert_allclose(mo.var().numpy(), var, rtol=1e-12)
    np.testing.assert_allclose(mo.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    y = torch.randn(6, 3, 4)
    y[2, 1, 3] = float("nan")
    y[4, 2, 0] = float("inf")
    bad = Moments.from_tensor(y, (0, 2))
    assert torch.isfinite(bad.mean[0]) and torch.isnan(bad.mean[1]) and not torch.isfinite(bad.m2[2])


class _KeywordNet(nn.Module):
    """Calls its batch norms by keyword (``bn(input=x)``) or positionally, as told."""

    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.keyword = keyword
        self.fc = nn.Linear(4, 3)
        self.ours = BatchNorm1d(3)
        self.theirs = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.keyword:
            return self.theirs(input=torch.relu(self.ours(input=h)))
        return self.theirs(torch.relu(self.ours(h)))


def test_keyword_calls_give_the_same_exact_statistics_as_positional() -> None:
    """bn(input=x) is seen by the statistics hooks: same population statistics, bit for bit,
    as bn(x), and both equal NumPy's on the layers' inputs."""
    positional = _KeywordNet(keyword=False)
    original = copy.deepcopy(positional).eval()  # one eval pass: upstream uses the old statistics
    keyword = copy.deepcopy(positional)
    keyword.keyword = True
    x = torch.randn(60, 4) * 3 + 2
    data = list(x.split(16))
    rep_pos = recompute_statistics(positional, data)
    rep_kw = recompute_statistics(keyword, data)
    assert [(r.name, r.samples, r.updated) for r in rep_kw] == [("ours", 60, True), ("theirs", 60, True)]
    assert [(r.name, r.samples) for r in rep_pos] == [(r.name, r.samples) for r in rep_kw]
    for a, b in zip(positional.buffers(), keyword.buffers()):
        assert_close(b, a, rtol=0, atol=0)
    with torch.no_grad():
        h = original.fc(x)
        h2 = torch.relu(original.ours(h))
    for bn, inp in ((keyword.ours, h), (keyword.theirs, h2)):
        mean, var = np_stats(inp.double().numpy(), (0,))
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-6)


def test_layer_input_positional_keyword_and_errors() -> None:
    from batchnorm.tools.stats import _layer_input

    bn = BatchNorm1d(2)
    x = torch.randn(3, 2)
    assert _layer_input(bn, (x,), {}) is x
    assert _layer_input(bn, (), {"input": x}) is x

    class Star(nn.Module):
        def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
            return x

    assert _layer_input(Star(), (), {"whatever": x, "flag": True}) is x
    with pytest.raises(TypeError, match=r"Star: expected the input as the first positional argument.*\['a', 'b'\]"):
        _layer_input(Star(), (), {"a": x, "b": x})
