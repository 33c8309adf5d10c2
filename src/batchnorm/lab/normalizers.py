"""Normalization layers that only the lab's experiments need (not part of the public API):
:class:`GroupedBatchNorm1d` and :class:`GroupedBatchRenorm1d`, batch norm and batch renorm whose
statistics come from consecutive groups of ``group_size`` samples of the batch, the way BN
behaves with ``group_size`` images per GPU and unsynchronized statistics (Wu & He 2018) or with
Ioffe 2017's microbatches.

Shape: (N, C) or (N, C, L) (per-channel statistics over the group's m samples and L positions,
as Ioffe's conv BN over m·p·q values) -> the input's shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import BatchNorm1d, BatchRenorm1d
from ..functional import update_step

__all__ = ["GroupedBatchNorm1d", "GroupedBatchRenorm1d"]


class _Grouped(nn.Module):
    """The ``group_size`` option and per-group moments shared by the grouped layers below."""

    affine: bool
    weight: Any
    bias: Any

    def __init__(self, num_features: int, group_size: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[call-arg]
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"{type(self).__name__}: expected group_size to be an int >= 2, got {group_size!r}")
        self.group_size = group_size

    def _moments(self, input: Tensor) -> tuple[Tensor, tuple[int, ...], Tensor, Tensor]:
        """(xg (G, m, C[, L]), the dims of xg one statistic reduces, mean and biased var (G, 1,
        C[, 1])) of ``input`` (N, C[, L]) in groups of m = ``group_size`` consecutive samples (a
        per-GPU split); ValueError if m does not divide N."""
        n, m = input.shape[0], self.group_size
        if n % m != 0:
            raise ValueError(f"{type(self).__name__}: batch of {n} is not a multiple of the group size {m}")
        xg = input.reshape(n // m, m, *input.shape[1:])  # (G, m, C[, L])
        dims = (1, *range(3, input.dim() + 1))
        return xg, dims, xg.mean(dim=dims, keepdim=True), xg.var(dim=dims, unbiased=False, keepdim=True)

    def _affine(self, y: Tensor) -> Tensor:
        """gamma * y + beta on (N, C[, L]) (gamma, beta reshaped to (C[, 1])) if affine."""
        if not self.affine:
            return y
        shape = (-1, *([1] * (y.dim() - 2)))
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


class GroupedBatchNorm1d(_Grouped, BatchNorm1d):
    """Batch norm whose training statistics come from groups of ``group_size`` samples.

    Training, for each group g of m consecutive samples (per channel):

        y = gamma * (x - mu_g) / sqrt(var_g + eps) + beta,   var_g biased over the m samples

    and ONE running-statistics update per step with the group averages

        running_mean = (1 - momentum) * running_mean + momentum * mean_g(mu_g)
        running_var  = (1 - momentum) * running_var  + momentum * mean_g(m/(m-1) * var_g)

    — the expectation of what G unsynchronized per-GPU BNs record (each tracks its own group's
    statistics; averaging them is Alg. 2 at group size m). Unlike ghost batch norm, the spread
    between group means is *not* in the running variance: per-device BN never sees it. With
    ``group_size >= N`` this is exactly :class:`batchnorm.BatchNorm1d`. Eval: the running
    statistics, as BN. A batch with non-finite statistics updates nothing (one warning per
    layer), as our BN. On (N, C, L) input the correction is n/(n-1) with n = m·L.

    Shape: (N, C) -> (N, C) or (N, C, L) -> (N, C, L); N must be a multiple of ``group_size`` in
    training.
    """

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]  # no mask: grouped statistics
        if not self.training or input.shape[0] <= self.group_size:
            return super().forward(input)
        xg, dims, mean, var = self._moments(input)  # mean, var: (G, 1, C[, 1])
        y = self._affine(((xg - mean) / torch.sqrt(var + self.eps)).reshape(input.shape))  # (N, C[, L])
        if self.track_running_stats:
            n = self.group_size * (input[0, 0].numel())  # values per channel per group: m or m·L
            with torch.no_grad():
                new_mean = mean.mean(dim=(0, *dims)).flatten()  # (C,)
                new_var = var.mean(dim=(0, *dims)).flatten() * (n / (n - 1))  # (C,)
            # a non-finite batch never reaches the running statistics (decided on the device)
            update_step(
                input, self.running_mean, self.running_var, new_mean, new_var, self.momentum, self._where(),
                self.num_batches_tracked, self._skipped(), unbiased=False,
            )  # fmt: skip
        return y


class GroupedBatchRenorm1d(_Grouped, BatchRenorm1d):
    """Batch renormalization (Ioffe 2017) over groups of ``group_size`` samples: his microbatches.

    Training, for each group g of m consecutive samples (per channel), with the shared moving
    mean mu and moving std sigma and the current limits (r_max_t, d_max_t) of the schedule:

        sigma_g = sqrt(var_g + eps),  r_g = sg(clip(sigma_g / sigma, 1/r_max_t, r_max_t)),
        d_g = sg(clip((mu_g - mu) / sigma, -d_max_t, d_max_t)),
        y = gamma * (r_g * (x - mu_g) / sigma_g + d_g) + beta

    then ONE moving-average update per step with the group averages of mu_g and sigma_g, and
    one schedule step. With ``group_size >= N`` this is exactly :class:`batchnorm.BatchRenorm1d`
    (which it subclasses for the schedule, buffers and inference). Eval: gamma (x - mu)/sigma + beta.

    Shape: (N, C) -> (N, C) or (N, C, L) -> (N, C, L); N must be a multiple of ``group_size`` in
    training.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.shape[0] <= self.group_size:
            return super().forward(input)
        r_max, d_max = self.limits(int(self.num_batches_tracked.item()))
        xg, dims, mean, var = self._moments(input)  # mean, var: (G, 1, C[, 1])
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():
            shape = (-1, *([1] * (input.dim() - 2)))  # (C[, 1])
            sigma = self.running_std.detach().reshape(shape)
            r = (std / sigma).clamp(1.0 / r_max, r_max)  # like std, a constant
            d = ((mean - self.running_mean.detach().reshape(shape)) / sigma).clamp(-d_max, d_max)  # like mean
        y = self._affine(((xg - mean) / std * r + d).reshape(input.shape))  # (N, C[, L])
        with torch.no_grad():
            new_mean = mean.mean(dim=(0, *dims)).flatten()  # (C,)
            new_std = std.mean(dim=(0, *dims)).flatten()  # (C,)
        # a non-finite batch changes neither the statistics nor the schedule step
        update_step(
            input, self.running_mean, self.running_std, new_mean, new_std, self.momentum, self._where(),
            self.num_batches_tracked, self.num_batches_skipped, unbiased=False,
        )  # fmt: skip
        return y
