"""Normalization layers that only the lab's experiments need (not part of the public API).

- :class:`NoisyBatchNorm` — Santurkar et al. 2018's "noisy BN": a batch norm followed by
  time-varying, non-zero-mean, non-unit-variance noise, to make the layer inputs *less*
  stable than without BN.
- :class:`GroupedBatchNorm1d` and :class:`GroupedBatchRenorm1d` — batch norm and batch renorm
  whose statistics come from consecutive groups of ``group_size`` samples of the batch, the way
  BN behaves with ``group_size`` images per GPU and unsynchronized statistics (Wu & He 2018) or
  with Ioffe 2017's microbatches.

Shape: ``NoisyBatchNorm`` takes (N, C); the grouped layers take (N, C) or (N, C, L) (per-channel
statistics over the group's m samples and L positions, as Ioffe's conv BN over m·p·q values);
all return their input's shape.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import BatchNorm1d, BatchRenorm1d
from ..functional import update_step

__all__ = ["GroupedBatchNorm1d", "GroupedBatchRenorm1d", "NoisyBatchNorm", "group_view"]


class NoisyBatchNorm(nn.Module):
    """``noise_t(BN(x))``: batch norm, then noise whose distribution changes at every step.

    At every training-mode forward (one SGD step) a new shift and scale are drawn per unit j,
    ``mu_j ~ U(-noise_mean, noise_mean)`` and ``s_j ~ U(1, noise_scale)``; then per sample i

        y'_ij = y_ij * s_j * (1 + per_sample * e_ij) + mu_j + per_sample * e'_ij,   e, e' ~ N(0, 1)

    where ``y = BN(x)`` (after gamma and beta). This is the "workable form" of Santurkar et al.
    2018's noise (their appendix values were not available to us). In eval mode
    the noise is replaced by its expectation, ``y' = y * (1 + noise_scale) / 2`` (E[s] and
    E[mu] = 0), as dropout rescales at inference: the next layer was trained on inputs scaled
    by s on average, so plain ``y`` would be a systematic shift.

    Args:
        num_features: C.
        noise_mean: n_mu, half-width of the per-step shift distribution (>= 0).
        noise_scale: n_sigma, upper end of the per-step scale distribution (>= 1).
        per_sample: std of the per-sample multiplicative and additive noise (>= 0).
        generator: seeds the noise (a fresh unseeded one if None).

    Shape: (N, C) -> (N, C).
    """

    def __init__(
        self,
        num_features: int,
        noise_mean: float = 0.5,
        noise_scale: float = 1.5,
        per_sample: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not noise_mean >= 0 or not noise_scale >= 1 or not per_sample >= 0:
            raise ValueError(
                "NoisyBatchNorm: expected noise_mean >= 0, noise_scale >= 1 and per_sample >= 0, "
                f"got {noise_mean!r}, {noise_scale!r}, {per_sample!r}"
            )
        self.bn = BatchNorm1d(num_features)
        self.noise_mean = float(noise_mean)
        self.noise_scale = float(noise_scale)
        self.per_sample = float(per_sample)
        self.generator = generator if generator is not None else torch.Generator()

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(x)
        if not self.training:
            return y * (0.5 * (1.0 + self.noise_scale))
        n, c = y.shape
        g = self.generator
        shift = (torch.rand(c, generator=g) * 2.0 - 1.0) * self.noise_mean  # (C,)
        scale = 1.0 + torch.rand(c, generator=g) * (self.noise_scale - 1.0)  # (C,)
        mult = 1.0 + self.per_sample * torch.randn(n, c, generator=g)  # (N, C)
        add = self.per_sample * torch.randn(n, c, generator=g)  # (N, C)
        return y * scale * mult + shift + add


def group_view(x: Tensor, group_size: int) -> Tensor:
    """(N, C, *) -> (G, m, C, *) with m = ``group_size`` and G = N / m; ValueError if m does not
    divide N.

    Group g holds samples g*m .. g*m + m - 1 (consecutive, as a per-GPU split would).
    """
    n = x.shape[0]
    if n % group_size != 0:
        raise ValueError(f"group_view: batch of {n} is not a multiple of the group size {group_size}")
    return x.reshape(n // group_size, group_size, *x.shape[1:])  # (G, m, C, *)


def _group_dims(input: Tensor) -> tuple[int, ...]:
    """Dims of ``group_view(input)`` that one group's per-channel statistic reduces: m and any L."""
    return (1, *range(3, input.dim() + 1))


def _per_channel(p: Tensor, input: Tensor) -> Tensor:
    """A (C,) parameter shaped to broadcast against (N, C, *) ``input``: (C,) or (C, 1)."""
    return p.reshape(-1, *([1] * (input.dim() - 2)))


class GroupedBatchNorm1d(BatchNorm1d):
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
    statistics, as BN.

    A batch with non-finite statistics updates nothing (one warning per layer), as our BN.

    With (N, C, L) input the statistics of a group are over its m samples and L positions, and
    the running-variance correction is n/(n-1) with n = m·L.

    Shape: (N, C) -> (N, C) or (N, C, L) -> (N, C, L); N must be a multiple of ``group_size`` in
    training.
    """

    def __init__(self, num_features: int, group_size: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"GroupedBatchNorm1d: expected group_size to be an int >= 2, got {group_size!r}")
        self.group_size = group_size

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]  # no mask: grouped statistics
        if not self.training or input.shape[0] <= self.group_size:
            return super().forward(input)
        xg = group_view(input, self.group_size)  # (G, m, C) or (G, m, C, L)
        dims = _group_dims(input)
        mean = xg.mean(dim=dims, keepdim=True)  # (G, 1, C) or (G, 1, C, 1)
        var = xg.var(dim=dims, unbiased=False, keepdim=True)  # (G, 1, C) or (G, 1, C, 1)
        y = ((xg - mean) / torch.sqrt(var + self.eps)).reshape(input.shape)  # (N, C) or (N, C, L)
        if self.affine:
            y = y * _per_channel(self.weight, input) + _per_channel(self.bias, input)
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


class GroupedBatchRenorm1d(BatchRenorm1d):
    """Batch renormalization (Ioffe 2017) over groups of ``group_size`` samples: his microbatches.

    Training, for each group g of m consecutive samples (per channel), with the shared moving
    mean mu and moving std sigma and the current limits (r_max_t, d_max_t) of the schedule:

        sigma_g = sqrt(var_g + eps),  r_g = sg(clip(sigma_g / sigma, 1/r_max_t, r_max_t)),
        d_g = sg(clip((mu_g - mu) / sigma, -d_max_t, d_max_t)),
        y = gamma * (r_g * (x - mu_g) / sigma_g + d_g) + beta

    then ONE moving-average update per step with the group averages of mu_g and sigma_g, and
    one schedule step. With ``group_size >= N`` this is exactly :class:`batchnorm.BatchRenorm1d`
    (which it subclasses for the schedule, buffers and inference). Eval: gamma (x - mu)/sigma + beta.

    With (N, C, L) input the statistics of a group are over its m samples and L positions.

    Shape: (N, C) -> (N, C) or (N, C, L) -> (N, C, L); N must be a multiple of ``group_size`` in
    training.
    """

    def __init__(self, num_features: int, group_size: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"GroupedBatchRenorm1d: expected group_size to be an int >= 2, got {group_size!r}")
        self.group_size = group_size

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.shape[0] <= self.group_size:
            return super().forward(input)
        step = int(self.num_batches_tracked.item())
        r_max, d_max = self.limits(step)
        xg = group_view(input, self.group_size)  # (G, m, C) or (G, m, C, L)
        dims = _group_dims(input)
        mean = xg.mean(dim=dims, keepdim=True)  # (G, 1, C) or (G, 1, C, 1)
        std = torch.sqrt(xg.var(dim=dims, unbiased=False, keepdim=True) + self.eps)  # (G, 1, C) or (G, 1, C, 1)
        with torch.no_grad():
            mu = _per_channel(self.running_mean.detach(), input)
            sigma = _per_channel(self.running_std.detach(), input)
            r = (std / sigma).clamp(1.0 / r_max, r_max)  # like std, a constant
            d = ((mean - mu) / sigma).clamp(-d_max, d_max)  # like mean, a constant
        y = ((xg - mean) / std * r + d).reshape(input.shape)  # (N, C) or (N, C, L)
        if self.affine:
            y = y * _per_channel(self.weight, input) + _per_channel(self.bias, input)
        with torch.no_grad():
            new_mean = mean.mean(dim=(0, *dims)).flatten()  # (C,)
            new_std = std.mean(dim=(0, *dims)).flatten()  # (C,)
        # a non-finite batch changes neither the statistics nor the schedule step
        update_step(
            input, self.running_mean, self.running_std, new_mean, new_std, self.momentum, self._where(),
            self.num_batches_tracked, self.num_batches_skipped, unbiased=False,
        )  # fmt: skip
        return y
