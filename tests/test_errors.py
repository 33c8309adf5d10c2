"""Bad input raises ValueError/TypeError naming the layer, what was expected and what arrived."""

from __future__ import annotations

import pytest
import torch

import batchnorm
from batchnorm import batch_norm


def test_wrong_ndim_names_layer_expected_and_actual() -> None:
    with pytest.raises(
        ValueError, match=r"BatchNorm2d\(3\): expected 4D \(N, C, H, W\) input, got 3D input of shape \(2, 3, 4\)"
    ):
        batchnorm.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): expected 2D \(N, C\) or 3D \(N, C, L\) input, got 4D"):
        batchnorm.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"batch_norm: expected .* got 1D"):
        batch_norm(torch.randn(5), None, None, training=True)


def test_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match=r"BatchNorm3d\(4\): expected 4 channels in dim 1, got 3"):
        batchnorm.BatchNorm3d(4)(torch.randn(2, 3, 2, 2, 2))
    with pytest.raises(ValueError, match=r"batch_norm: expected weight of shape \(3,\).* got \(4,\)"):
        batch_norm(torch.randn(4, 3), None, None, torch.ones(4), training=True)


def test_single_value_per_channel_in_training() -> None:
    with pytest.raises(
        ValueError,
        match=r"BatchNorm2d\(3\): expected more than 1 value per channel when training, got input of shape \(1, 3, 1, 1\)",
    ):
        batchnorm.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    # fine in eval mode, and with one sample but several positions
    bn = batchnorm.BatchNorm2d(3)
    bn(torch.randn(1, 3, 2, 2))
    bn.eval()
    assert bn(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_input(dtype: torch.dtype) -> None:
    x = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(TypeError, match=rf"BatchNorm1d\(3\): expected a floating-point input .*got dtype {dtype}"):
        batchnorm.BatchNorm1d(3)(x)


def test_non_tensor_input() -> None:
    with pytest.raises(TypeError, match="expected a torch.Tensor input, got list"):
        batchnorm.BatchNorm1d(3)([[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_not_positive_in_training(eps: float) -> None:
    with pytest.raises(ValueError, match=r"batch_norm: eps must be positive when training .*, got"):
        batch_norm(torch.randn(4, 3), None, None, training=True, eps=eps)


def test_eps_zero_allowed_in_eval_but_not_in_training() -> None:
    bn = batchnorm.BatchNorm1d(3, eps=0.0)
    bn.eval()
    assert torch.isfinite(bn(torch.randn(4, 3))).all()
    bn.train()
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): eps must be positive when training .*, got 0.0"):
        bn(torch.randn(4, 3))


@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_eps_checked_at_the_forward_with_torchs_class_and_words(cls: str, eps: float) -> None:
    """As torch: any eps constructs; the training forward raises ValueError "eps must be positive"."""
    shape = {"BatchNorm1d": (2, 10), "BatchNorm2d": (2, 10, 5, 5), "BatchNorm3d": (2, 10, 4, 4, 4)}[cls]
    x = torch.randn(shape)
    theirs = getattr(torch.nn, cls)(10, eps=eps)
    ours = getattr(batchnorm, cls)(10, eps=eps)
    with pytest.raises(ValueError, match="eps must be positive"):
        theirs(x)
    with pytest.raises(ValueError, match=rf"{cls}\(10\): eps must be positive when training .*got {eps}"):
        ours(x)
    # no batch was taken in: the running statistics are untouched
    assert int(ours.num_batches_tracked) == 0
    assert torch.equal(ours.running_mean, torch.zeros(10))


def test_negative_eps_in_eval_raises_as_torch() -> None:
    """Evaluation with running statistics accepts eps = 0 and refuses eps < 0 (torch's rule)."""
    x = torch.randn(4, 3)
    theirs, ours = torch.nn.BatchNorm1d(3, eps=-1.0).eval(), batchnorm.BatchNorm1d(3, eps=-1.0).eval()
    with pytest.raises(ValueError, match="eps must be non-negative"):
        theirs(x)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): eps must be non-negative, got -1.0"):
        ours(x)
    # without running statistics evaluation normalizes with the batch's: eps must be positive
    free = batchnorm.BatchNorm1d(3, eps=0.0, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="eps must be positive"):
        free(x)


@pytest.mark.parametrize("eps", [float("inf"), float("nan")])
def test_non_finite_eps_refused_at_the_forward(eps: float) -> None:
    bn = batchnorm.BatchNorm1d(3, eps=eps)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): eps must be a finite number, got"):
        bn(torch.randn(4, 3))


def test_eps_not_a_number_refused_at_construction() -> None:
    with pytest.raises(TypeError, match=r"BatchNorm1d\(3\): expected eps to be a float, got str"):
        batchnorm.BatchNorm1d(3, eps="1e-5")  # type: ignore[arg-type]


@pytest.mark.parametrize("momentum", [-0.1, 1.5, 99.0])
def test_momentum_outside_unit_interval(momentum: float) -> None:
    with pytest.raises(ValueError, match=rf"BatchNorm2d\(3\): expected momentum in \[0, 1\].*got {momentum}"):
        batchnorm.BatchNorm2d(3, momentum=momentum)
    with pytest.raises(ValueError, match=r"batch_norm: expected momentum in \[0, 1\]"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=momentum)


def test_keras_style_momentum_hint() -> None:
    with pytest.raises(ValueError, match="from_keras_momentum"):
        batchnorm.BatchNorm1d(3, momentum=1.01)


def test_bad_num_features() -> None:
    with pytest.raises(ValueError, match="expected num_features to be a positive int, got 0"):
        batchnorm.BatchNorm1d(0)


def test_eval_without_running_stats() -> None:
    with pytest.raises(ValueError, match="expected running_mean and running_var in evaluation mode"):
        batch_norm(torch.randn(4, 3), None, None, training=False)
    with pytest.raises(ValueError, match="both given or both None"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True)


def test_errors_leave_running_stats_untouched() -> None:
    bn = batchnorm.BatchNorm2d(3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    for bad in (torch.randn(1, 3, 1, 1), torch.randn(2, 4, 2, 2), torch.ones(2, 3, 2, 2, dtype=torch.long)):
        with pytest.raises((ValueError, TypeError)):
            bn(bad)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    "call",
    [
        lambda f: f(torch.randn(4, 3), torch.zeros(4), torch.ones(4)),  # running stats of the wrong size
        lambda f: f(torch.randn(4, 3), torch.zeros(3), torch.ones(3), torch.ones(2)),  # weight of the wrong size
    ],
    ids=["running_mean", "weight"],
)
def test_wrong_size_is_both_value_and_runtime_error(call) -> None:
    """Where torch raises RuntimeError for a tensor of the wrong size, ours raises ShapeError: a
    ValueError (our convention) that is also a RuntimeError (torch's), with our message."""
    with pytest.raises(RuntimeError):
        call(torch.nn.functional.batch_norm)
    with pytest.raises(batchnorm.ShapeError, match="expected .* of shape") as info:
        call(batchnorm.batch_norm)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_wrong_channel_count_is_both_value_and_runtime_error() -> None:
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError):
        torch.nn.BatchNorm1d(3)(x)
    with pytest.raises(batchnorm.ShapeError, match="expected 3 channels"):
        batchnorm.BatchNorm1d(3)(x)
