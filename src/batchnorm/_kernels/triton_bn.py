"""Batch-norm kernels in Triton: the ``"triton"`` back-end (CUDA; CPU under the interpreter).

Same contract as `batchnorm._kernels.torch_ops` and `batchnorm._kernels.cpu`:

- ``train_forward(x, weight, bias, eps) -> (y, mean, var_biased)``
- ``eval_forward(x, mean, var, weight, bias, eps) -> y``
- ``backward(grad_y, x, mean, invstd, weight) -> (dx, sum(g * x_hat), sum(g))``
- ``batch_stats(x) -> (mean, var_biased)``
- ``backward_sums(grad_y, x, mean) -> (sum g, sum g * (x - mean))`` (float64) and
  ``backward_apply(grad_y, x, mean, invstd, weight, mean_g, mean_gxhat) -> dx``
- ``supports(x) -> bool``

plus fused variants:

- ``train_forward_act(x, weight, bias, eps, activation, negative_slope, alpha, residual)
  -> (z, mean, var, mask)``: z = act(BN(x) [+ residual]); for ReLU, ``mask`` packs z > 0 one
  bit per element (int32 words over z's flat memory: 1/32 of an fp32 tensor), else None;
- ``eval_forward_act(...) -> z``;
- ``backward_relu(grad_z, x, mean, invstd, weight, mask, residual_grad) -> (dx, dgamma, dbeta,
  dresidual | None)``: BN + ReLU (+ add) backward from x and the bit mask;
- ``backward_act(grad_z, z, weight, bias, invstd, activation, negative_slope, alpha)
  -> (dx, dgamma, dbeta)``: LeakyReLU/ELU/identity backward from the output alone, by inverting
  the activation (as `batchnorm._kernels.cpu_act`: y = act^-1(z), x_hat = (y - beta) / gamma).

Math (per channel c over its m = N * prod(spatial) values; docs/conventions.md):

    mu = (1/m) sum x,  var = (1/m) sum (x - mu)^2,  y = (x - mu) / sqrt(var + eps) * weight + bias
    dx = weight * invstd * (g - mean(g) - x_hat * mean(g * x_hat))

Passes: training forward = a split statistics pass (one read of x) + a merge of the splits +
one normalize pass; backward = one pass for both sums + a merge + one pass for dx; eval = a
parameter kernel + one pass. Layouts: NCHW-like (contiguous) and channels-last (C innermost,
also 2D (N, C)); outputs keep the input's dtype and memory format.

Precision: statistics accumulate in float32 (float64 for float64 input) for every dtype,
float16/bfloat16 included, on x - shift with the channel's first value as shift (exact near
the mean), tiles merged by Chan's formula, splits merged in float64; the mean is returned in
float64, the variance in ``acc_dtype``; normalization subtracts the mean as a hi + lo pair,
so mean 1e4 / std 1e-2 in float32 keeps the precision of the spread. ``backward`` re-centers
its sums on the batch mean of x it reads anyway (``mean`` must be that batch mean, as for
`batchnorm._kernels.cpu`).

Where the kernels run: on CUDA tensors compiled; on CPU tensors only in Triton's interpreter,
i.e. when ``TRITON_INTERPRET=1`` was set before this module was first imported (slow: for
tests). Importing this module imports triton and raises ImportError, with the install hint,
when triton is missing; ``import batchnorm`` never imports it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .torch_ops import acc_dtype
from .triton_plan import (  # triton and the kernels, imported with the install hint
    ACT_CODES,
    INTERPRETED,
    Geo,
    K,
    check,
    interpreter_requested,
    like,
    on_device,
    reduce_plan,
    supports,
    triton,
    unavailable_reason,
    vec,
    words_per_program,
)

__all__ = [
    "INTERPRETED",
    "interpreter_requested",
    "supports",
    "unavailable_reason",
    "train_forward",
    "eval_forward",
    "backward",
    "batch_stats",
    "backward_sums",
    "backward_apply",
    "train_forward_act",
    "eval_forward_act",
    "backward_relu",
    "backward_act",
]


def _stats(
    x: Tensor, geo: Geo, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean float64, var acc, prm (4, C) acc) of x (one read)."""
    acc = acc_dtype(x.dtype)
    block_r, block_c, nsplit, per = reduce_plan(geo, x.device)
    part = torch.empty((2, nsplit, geo.c), dtype=acc, device=x.device)
    K.stats_part[(triton.cdiv(geo.c, block_c), nsplit)](
        x, part, geo.c, geo.S, geo.r, geo.s_n, geo.s_c, geo.s_s, per, nsplit, BLOCK_R=block_r, BLOCK_C=block_c
    )
    mean = torch.empty(geo.c, dtype=torch.float64, device=x.device)
    var = torch.empty(geo.c, dtype=acc, device=x.device)
    prm = torch.empty((4, geo.c), dtype=acc, device=x.device)
    w, has_w = vec(weight, x)
    b, has_b = vec(bias, x)
    fc = min(128, triton.next_power_of_2(geo.c))
    K.stats_final[(triton.cdiv(geo.c, fc),)](
        x,
        part,
        w,
        b,
        mean,
        var,
        prm,
        geo.c,
        geo.r,
        per,
        nsplit,
        geo.s_c,
        float(eps),
        HAS_W=has_w,
        HAS_B=has_b,
        BLOCK_C=fc,
    )
    return mean, var, prm


def _normalize(
    x: Tensor,
    geo: Geo,
    prm: Tensor,
    act: int,
    slope: float,
    alpha: float,
    residual: Tensor | None,
    want_mask: bool,
) -> tuple[Tensor, Tensor | None]:
    """(y, bit mask of the activation's positive side or None) from x and ``prm`` (4, C)."""
    y = torch.empty_like(x)
    nwords = triton.cdiv(geo.numel, 32)
    mask = torch.empty(nwords, dtype=torch.int32, device=x.device) if want_mask else x
    bw = words_per_program(x)
    K.normalize[(triton.cdiv(nwords, bw),)](
        x,
        y,
        prm,
        x if residual is None else residual,
        mask,
        geo.numel,
        nwords,
        geo.c,
        geo.div,
        float(slope),
        float(alpha),
        ACT=act,
        HAS_RES=residual is not None,
        WRITE_MASK=want_mask,
        BW=bw,
    )
    return y, (mask if want_mask else None)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean float64, biased var ``acc_dtype``), one read of x, no output written.

    Shape: x (N, C, *) -> mean (C,), var (C,).
    """
    layout = check(x, "batch_stats")
    xd = x.detach()
    with on_device(x):
        mean, var, _ = _stats(xd, Geo(xd, layout), None, None, 1.0)
    return mean, var


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: (y, mean float64, var_biased ``acc_dtype``); y has x's dtype and format.

    Shape: x (N, C, *) -> y (N, C, *), mean (C,), var (C,).
    """
    z, mean, var, _ = train_forward_act(x, weight, bias, eps, "identity")
    return z, mean, var


def train_forward_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str = "relu",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """z = act(BN_train(x) [+ residual]): (z, mean float64, var_biased, mask).

    ``activation`` in ("identity", "relu", "leaky_relu", "elu"); ``residual`` (x's shape) only
    with "relu" (BN + add + ReLU, the tail of a ResNet block). ``mask`` (ReLU only, else None):
    int32 words, bit j of word w is ``z.flatten-in-memory[32 w + j] > 0``, for
    `backward_relu`.

    Shape: x, residual (N, C, *) -> z (N, C, *), mean (C,), var (C,), mask (ceil(numel / 32),).
    """
    layout = check(x, "train_forward_act")
    act = _act_code(activation, "train_forward_act")
    if residual is not None and act != K.ACT_RELU:
        raise ValueError(
            f"batchnorm._kernels.triton_bn.train_forward_act: a residual needs activation 'relu', got {activation!r}"
        )
    xd = x.detach()
    res = None if residual is None else like(residual, xd, "train_forward_act")
    geo = Geo(xd, layout)
    with on_device(x):
        mean, var, prm = _stats(xd, geo, weight, bias, eps)
        z, mask = _normalize(xd, geo, prm, act, negative_slope, alpha, res, act == K.ACT_RELU)
    return z, mean, var, mask


def _act_code(activation: str, where: str) -> int:
    if activation not in ACT_CODES:
        raise ValueError(
            f"batchnorm._kernels.triton_bn.{where}: expected activation in {tuple(ACT_CODES)}, got {activation!r}"
        )
    return ACT_CODES[activation]


def eval_forward(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Inference: y = weight * (x - mean) / sqrt(var + eps) + bias, one pass over x.

    Shape: x (N, C, *) -> y of the same shape, dtype and memory format; mean, var (C,).
    """
    return eval_forward_act(x, mean, var, weight, bias, eps, "identity")


def eval_forward_act(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str = "relu",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    """Inference z = act(BN_eval(x) [+ residual]) in one pass (any activation, residual optional).

    Shape: x, residual (N, C, *); mean, var (C,) -> z (N, C, *).
    """
    layout = check(x, "eval_forward_act")
    act = _act_code(activation, "eval_forward_act")
    xd = x.detach()
    res = None if residual is None else like(residual, xd, "eval_forward_act")
    geo = Geo(xd, layout)
    prm = torch.empty((4, geo.c), dtype=acc_dtype(x.dtype), device=x.device)
    w, has_w = vec(weight, xd)
    b, has_b = vec(bias, xd)
    fc = min(128, triton.next_power_of_2(geo.c))
    with on_device(x):
        K.eval_params[(triton.cdiv(geo.c, fc),)](
            mean.detach().contiguous(),
            var.detach().contiguous(),
            w,
            b,
            prm,
            geo.c,
            float(eps),
            HAS_W=has_w,
            HAS_B=has_b,
            BLOCK_C=fc,
        )
        z, _ = _normalize(xd, geo, prm, act, negative_slope, alpha, res, False)
    return z


def _bwd_sums(
    g: Tensor,
    v: Tensor,
    mean: Tensor,
    mask: Tensor | None,
    geo: Geo,
    mode: int,
    slope: float,
    alpha: float,
    tiny: float,
) -> tuple[Tensor, int]:
    """(3, nsplit, C) partial sums (sum dy, sum dy d, sum d) in ``acc_dtype``."""
    block_r, block_c, nsplit, per = reduce_plan(geo, v.device)
    part = torch.empty((3, nsplit, geo.c), dtype=acc_dtype(v.dtype), device=v.device)
    K.bwd_part[(triton.cdiv(geo.c, block_c), nsplit)](
        g,
        v,
        mean,
        v if mask is None else mask,
        part,
        geo.c,
        geo.S,
        geo.r,
        geo.s_n,
        geo.s_c,
        geo.s_s,
        per,
        nsplit,
        float(slope),
        float(alpha),
        float(tiny),
        MODE=mode,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return part, nsplit


def _backward(
    g: Tensor,
    v: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mask: Tensor | None,
    geo: Geo,
    mode: int,
    slope: float,
    alpha: float,
    want_res: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The full backward: sums, merge, dx (and dres)."""
    acc = acc_dtype(v.dtype)
    tiny = float(torch.finfo(v.dtype).eps)
    mean = mean.detach().contiguous()
    part, nsplit = _bwd_sums(g, v, mean, mask, geo, mode, slope, alpha, tiny)
    coef = torch.empty((5, geo.c), dtype=acc, device=v.device)
    dw = torch.empty(geo.c, dtype=acc, device=v.device)
    db = torch.empty(geo.c, dtype=acc, device=v.device)
    w, has_w = vec(weight, v)
    fc = min(128, triton.next_power_of_2(geo.c))
    K.bwd_final[(triton.cdiv(geo.c, fc),)](
        part, mean, invstd.detach().contiguous(), w, coef, dw, db, geo.c, geo.r, nsplit, HAS_W=has_w, BLOCK_C=fc
    )
    dx = torch.empty_like(v)
    dres = torch.empty_like(v) if want_res else None
    bw = words_per_program(v)
    K.dx_apply[(triton.cdiv(triton.cdiv(geo.numel, 32), bw),)](
        g,
        v,
        v if mask is None else mask,
        coef,
        dx,
        v if dres is None else dres,
        geo.numel,
        geo.c,
        geo.div,
        float(slope),
        float(alpha),
        tiny,
        MODE=mode,
        WRITE_RES=want_res,
        BW=bw,
    )
    return dx, dw, db, dres


def backward(
    grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Training backward with g = dL/dy:

        dbeta = sum g,  dgamma = sum g * x_hat,  dx = weight * invstd * (g - mean(g) - x_hat * mean(g * x_hat))

    ``mean`` must be the batch mean of x (re-centered from x's own sums). Returns (dx in x's
    dtype and format, dgamma, dbeta in ``acc_dtype``). Not differentiable.

    Shape: grad_y, x (N, C, *) -> dx (N, C, *), dgamma (C,), dbeta (C,).
    """
    layout = check(x, "backward")
    xd = x.detach()
    g = like(grad_y, xd, "backward")
    with on_device(x):
        dx, dw, db, _ = _backward(g, xd, mean, invstd, weight, None, Geo(xd, layout), K.ACT_IDENTITY, 0.0, 0.0, False)
    return dx, dw, db


def backward_relu(
    grad_z: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mask: Tensor,
    residual_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward of z = relu(BN(x) [+ residual]) from x and the bit mask of
    `train_forward_act`: dy = g * [z > 0], then the BN backward of dy; the residual's
    gradient is dy itself (returned when ``residual_grad``).

    Shape: grad_z, x (N, C, *); mask (ceil(numel / 32),) int32 -> dx, dgamma (C,), dbeta (C,), dres.
    """
    layout = check(x, "backward_relu")
    xd = x.detach()
    g = like(grad_z, xd, "backward_relu")
    nwords = triton.cdiv(xd.numel(), 32)
    if mask.dtype != torch.int32 or mask.shape != (nwords,):
        raise ValueError(
            f"batchnorm._kernels.triton_bn.backward_relu: expected an int32 mask of shape ({nwords},), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    with on_device(x):
        return _backward(
            g, xd, mean, invstd, weight, mask.contiguous(), Geo(xd, layout), K.ACT_RELU, 0.0, 0.0, residual_grad
        )


def backward_act(
    grad_z: Tensor,
    z: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    invstd: Tensor,
    activation: str,
    negative_slope: float,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """BN + invertible activation backward from the output z alone: (dx, dgamma, dbeta).

    y = act^-1(z), dy = g * act'(y), then the BN backward in the variables of y: x_hat =
    (y - beta) / gamma, so the kernel runs with mean = beta, invstd' = 1 / gamma and
    weight' = gamma^2 * invstd (its dx scale weight' * invstd' = gamma * invstd). ``weight``
    must be invertible (see `batchnorm.functional_act`).

    Shape: grad_z, z (N, C, *) -> dx (N, C, *), dgamma (C,), dbeta (C,).
    """
    layout = check(z, "backward_act")
    modes = {"identity": K.ACT_IDENTITY, "leaky_relu": K.ACT_LEAKY, "elu": K.ACT_ELU}
    if activation not in modes:
        raise ValueError(
            f"batchnorm._kernels.triton_bn.backward_act: expected activation in {tuple(modes)}, got {activation!r}"
        )
    zd = z.detach()
    g = like(grad_z, zd, "backward_act")
    c = z.shape[1]
    inv = invstd.detach().to(torch.float64)
    gamma = torch.ones_like(inv) if weight is None else weight.detach().to(torch.float64)
    beta = torch.zeros_like(inv) if bias is None else bias.detach().to(torch.float64)
    with on_device(z):
        dx, dw, db, _ = _backward(
            g,
            zd,
            beta.reshape(c),
            (1.0 / gamma).reshape(c),
            gamma * gamma * inv,
            None,
            Geo(zd, layout),
            modes[activation],
            negative_slope,
            alpha,
            False,
        )
    return dx, dw, db


def backward_sums(grad_y: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """(sum g, sum g * (x - mean)) per channel in float64 around the given ``mean`` (any value,
    e.g. a synchronized batch's), one read of g and x.

    Shape: grad_y, x (N, C, *), mean (C,) -> sum_g (C,), sum_g_xc (C,).
    """
    layout = check(x, "backward_sums")
    xd = x.detach()
    g = like(grad_y, xd, "backward_sums")
    with on_device(x):
        part, _ = _bwd_sums(g, xd, mean.detach().contiguous(), None, Geo(xd, layout), K.ACT_IDENTITY, 0.0, 0.0, 0.0)
    tot = part[:2].to(torch.float64).sum(dim=1)  # (2, nsplit, C) -> (2, C)
    return tot[0], tot[1]


def backward_apply(
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_g: Tensor,
    mean_gxhat: Tensor,
) -> Tensor:
    """dx = weight * invstd * (g - mean_g - x_hat * mean_gxhat), x_hat = (x - mean) * invstd,
    from already-reduced means (SyncBatchNorm), one pass; coefficients formed in float64.

    Shape: grad_y, x (N, C, *); mean, invstd, weight, mean_g, mean_gxhat (C,) -> dx (N, C, *).
    """
    layout = check(x, "backward_apply")
    xd = x.detach()
    g = like(grad_y, xd, "backward_apply")
    acc = acc_dtype(x.dtype)
    mu = mean.detach().to(torch.float64)
    hi = mu.to(acc)
    inv = invstd.detach().to(torch.float64)
    k1 = inv if weight is None else inv * weight.detach().to(torch.float64)
    k2 = -k1 * inv * mean_gxhat.detach().to(torch.float64)
    k3 = -k1 * mean_g.detach().to(torch.float64)
    coef = torch.stack([hi.to(torch.float64), mu - hi.to(torch.float64), k1, k2, k3]).to(acc).contiguous()
    geo = Geo(xd, layout)
    dx = torch.empty_like(xd)
    bw = words_per_program(xd)
    with on_device(x):
        K.dx_apply[(triton.cdiv(triton.cdiv(geo.numel, 32), bw),)](
            g,
            xd,
            xd,
            coef,
            dx,
            xd,
            geo.numel,
            geo.c,
            geo.div,
            0.0,
            0.0,
            0.0,
            MODE=K.ACT_IDENTITY,
            WRITE_RES=False,
            BW=bw,
        )
    return dx
