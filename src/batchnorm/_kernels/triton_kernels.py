"""The Triton kernels behind `batchnorm._kernels.triton_bn` (device code only).

Imported only by ``triton_bn`` (never at ``import batchnorm``). Whether these run compiled
(CUDA) or in Triton's interpreter (CPU tensors) is decided by ``TRITON_INTERPRET`` when this
module is first imported.

Two kinds of kernels:

- reductions over a 2D tile [BLOCK_R, BLOCK_C]: rows r = n * S + s of the reduction index
  (N * S values per channel), columns = channels; element (n, c, s) sits at
  ``n * s_n + c * s_c + s * s_s`` (NCHW: s_n = C*S, s_c = S, s_s = 1; channels-last and 2D:
  S = 1 folded into the rows, s_c = 1). Grid (channel blocks, splits): a split owns a range
  of rows, so a small C with a large N*S still fills the device; partials are merged per
  channel by a second, tiny kernel;
- elementwise passes over the flat memory of a dense tensor, a tile of [BW, 32] elements
  (BW words of 32 bits, so a ReLU mask is packed one bit per element); the channel of memory
  offset i is ``(i // DIV) % C`` (DIV = S for NCHW, 1 for channels-last).

Statistics: each tile gives a two-pass (mean, M2) of x - shift (shift = the channel's first
value, so x - shift is exact near the mean: Sterbenz), merged Chan-style across tiles in the
accumulation dtype (float32, float64 for float64 input), and across splits in float64.
"""

from __future__ import annotations

import triton
import triton.language as tl

# activation / input-transform codes shared with triton_bn
ACT_IDENTITY, ACT_RELU, ACT_LEAKY, ACT_ELU = 0, 1, 2, 3


@triton.jit
def _expm1(y):
    """exp(y) - 1 without cancellation near 0 (Kahan: (u - 1) * y / log u, u = exp y)."""
    u = tl.exp(y)
    um1 = u - 1.0
    safe = (u != 1.0) & (um1 != -1.0)
    lu = tl.log(tl.where(safe, u, 2.0))
    return tl.where(safe, um1 * y / lu, tl.where(u == 1.0, y, -1.0))


@triton.jit
def _log1p(z):
    """log(1 + z) without cancellation near 0 (Kahan: log u * z / (u - 1), u = 1 + z)."""
    u = 1.0 + z
    um1 = u - 1.0
    return tl.where(u == 1.0, z, tl.log(u) * z / tl.where(u == 1.0, 1.0, um1))


@triton.jit
def _activate(y, slope, alpha, ACT: tl.constexpr):
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = tl.where(y >= 0, y, y * slope)
    elif ACT == 3:
        y = tl.where(y > 0, y, alpha * _expm1(tl.minimum(y, 0.0)))
    return y


@triton.jit
def _pre(g, v, bit, slope, alpha, tiny, MODE: tl.constexpr):
    """(dy, y) from the saved tensor v and g = dL/dz.

    MODE 0: y = v, dy = g. 1 (ReLU, bit mask): y = v (= x), dy = g * bit.
    2 (leaky, v = z): y = z >= 0 ? z : z / slope, dy = z > 0 ? g : g * slope.
    3 (ELU, v = z): y = z > 0 ? z : log1p(max(z / alpha, -1 + tiny)), dy = z > 0 ? g : g * (z + alpha).
    """
    if MODE == 1:
        dy = tl.where(bit != 0, g, 0.0)
        y = v
    elif MODE == 2:
        dy = tl.where(v > 0, g, g * slope)
        y = tl.where(v >= 0, v, v / slope)
    elif MODE == 3:
        dy = tl.where(v > 0, g, g * (v + alpha))
        y = tl.where(v > 0, v, _log1p(tl.maximum(v / alpha, -1.0 + tiny)))
    else:
        dy = g
        y = v
    return dy, y


@triton.jit
def stats_part(x_ptr, part_ptr, C, S, R, s_n, s_c, s_s, per, nsplit, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (channel block, split): (mean, M2) of x - shift over the split's rows.

    part: (2, nsplit, C) in the accumulation dtype.
    """
    ACC = part_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    coff = cols.to(tl.int64) * s_c
    shift = tl.load(x_ptr + coff, mask=cmask, other=0.0).to(ACC)
    sp = tl.program_id(1)
    r0 = sp * per
    r_end = tl.minimum(R, r0 + per)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        roff = (rows // S).to(tl.int64) * s_n + (rows % S).to(tl.int64) * s_s
        m = rmask[:, None] & cmask[None, :]
        xv = tl.load(x_ptr + roff[:, None] + coff[None, :], mask=m, other=0.0).to(ACC)
        d = tl.where(m, xv - shift[None, :], 0.0)  # (BLOCK_R, BLOCK_C)
        nb = tl.minimum(r_end - start, BLOCK_R).to(ACC)
        na = (start - r0).to(ACC)
        tmean = tl.sum(d, axis=0) / nb
        dc = tl.where(m, d - tmean[None, :], 0.0)
        tm2 = tl.sum(dc * dc, axis=0)
        delta = tmean - mean
        frac = nb / (na + nb)
        mean = mean + delta * frac
        m2 = m2 + tm2 + delta * delta * (na * frac)
    tl.store(part_ptr + sp * C + cols, mean, mask=cmask)
    tl.store(part_ptr + (nsplit + sp) * C + cols, m2, mask=cmask)


@triton.jit
def stats_final(
    x_ptr,
    part_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    var_ptr,
    prm_ptr,
    C,
    R,
    per,
    nsplit,
    s_c,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Chan merge of the splits in float64: mean (float64), biased var, and the normalize
    parameters prm (4, C) = (hi, lo, scale, beta) with y = ((x - hi) - lo) * scale + beta."""
    ACC = var_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    shift = tl.load(x_ptr + cols.to(tl.int64) * s_c, mask=cmask, other=0.0).to(ACC)
    mean = tl.zeros([BLOCK_C], tl.float64)
    m2 = tl.zeros([BLOCK_C], tl.float64)
    for sp in range(0, nsplit):
        na = (sp * per).to(tl.float64)
        nb = tl.minimum(R - sp * per, per).to(tl.float64)
        pm = tl.load(part_ptr + sp * C + cols, mask=cmask, other=0.0).to(tl.float64)
        pm2 = tl.load(part_ptr + (nsplit + sp) * C + cols, mask=cmask, other=0.0).to(tl.float64)
        frac = nb / (na + nb)
        delta = pm - mean
        mean = mean + delta * frac
        m2 = m2 + pm2 + delta * delta * (na * frac)
    var = tl.maximum(m2 / R, 0.0)
    tl.store(mean_ptr + cols, shift.to(tl.float64) + mean, mask=cmask)
    tl.store(var_ptr + cols, var.to(ACC), mask=cmask)
    scale = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float64)
    beta = tl.zeros([BLOCK_C], ACC)
    if HAS_B:
        beta = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    tl.store(prm_ptr + cols, shift, mask=cmask)
    tl.store(prm_ptr + C + cols, mean.to(ACC), mask=cmask)
    tl.store(prm_ptr + 2 * C + cols, scale.to(ACC), mask=cmask)
    tl.store(prm_ptr + 3 * C + cols, beta, mask=cmask)


@triton.jit
def eval_params(
    mean_ptr, var_ptr, w_ptr, b_ptr, prm_ptr, C, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr
):
    """prm (4, C) = (hi, lo, scale, beta) from fixed statistics: the float64 mean as a hi + lo
    pair in the accumulation dtype, scale = weight / sqrt(var + eps) formed in float64."""
    ACC = prm_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
    hi = mu.to(ACC)
    lo = (mu - hi.to(tl.float64)).to(ACC)
    var = tl.load(var_ptr + cols, mask=cmask, other=1.0).to(tl.float64)
    scale = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float64)
    beta = tl.zeros([BLOCK_C], ACC)
    if HAS_B:
        beta = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    tl.store(prm_ptr + cols, hi, mask=cmask)
    tl.store(prm_ptr + C + cols, lo, mask=cmask)
    tl.store(prm_ptr + 2 * C + cols, scale.to(ACC), mask=cmask)
    tl.store(prm_ptr + 3 * C + cols, beta, mask=cmask)


@triton.jit
def normalize(
    x_ptr,
    y_ptr,
    prm_ptr,
    res_ptr,
    mask_ptr,
    numel,
    nwords,
    C,
    DIV,
    slope,
    alpha,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    BW: tl.constexpr,
):
    """z = act(((x - hi) - lo) * scale + beta [+ residual]) over the flat memory; with
    WRITE_MASK, bit j of word w of the mask is z[32 w + j] > 0."""
    ACC = prm_ptr.dtype.element_ty
    words = tl.program_id(0).to(tl.int64) * BW + tl.arange(0, BW)
    bits = tl.arange(0, 32)
    off = words[:, None] * 32 + bits[None, :]  # (BW, 32) flat memory offsets
    m = off < numel
    c = (off // DIV) % C
    hi = tl.load(prm_ptr + c, mask=m, other=0.0)
    lo = tl.load(prm_ptr + C + c, mask=m, other=0.0)
    sc = tl.load(prm_ptr + 2 * C + c, mask=m, other=0.0)
    be = tl.load(prm_ptr + 3 * C + c, mask=m, other=0.0)
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(ACC)
    y = ((x - hi) - lo) * sc + be
    if HAS_RES:
        y = y + tl.load(res_ptr + off, mask=m, other=0.0).to(ACC)
    y = _activate(y, slope, alpha, ACT)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)
    if WRITE_MASK:
        on = (m & (y > 0)).to(tl.uint32) << bits.to(tl.uint32)[None, :]
        word = tl.sum(on, axis=1)
        tl.store(mask_ptr + words, word.to(tl.int32, bitcast=True), mask=words < nwords)


@triton.jit
def bwd_part(
    g_ptr,
    v_ptr,
    mean_ptr,
    mask_ptr,
    part_ptr,
    C,
    S,
    R,
    s_n,
    s_c,
    s_s,
    per,
    nsplit,
    slope,
    alpha,
    tiny,
    MODE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per (channel block, split): sum dy, sum dy * d, sum d with d = (y - hi) - lo around the
    given mean (hi + lo pair); (dy, y) from `_pre`. part: (3, nsplit, C)."""
    ACC = part_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    coff = cols.to(tl.int64) * s_c
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
    hi = mu.to(ACC)
    lo = (mu - hi.to(tl.float64)).to(ACC)
    sp = tl.program_id(1)
    r0 = sp * per
    r_end = tl.minimum(R, r0 + per)
    sg = tl.zeros([BLOCK_C], ACC)
    sgd = tl.zeros([BLOCK_C], ACC)
    sd = tl.zeros([BLOCK_C], ACC)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        roff = (rows // S).to(tl.int64) * s_n + (rows % S).to(tl.int64) * s_s
        off = roff[:, None] + coff[None, :]
        m = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(ACC)
        v = tl.load(v_ptr + off, mask=m, other=0.0).to(ACC)
        bit = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)
        if MODE == 1:
            word = tl.load(mask_ptr + (off >> 5), mask=m, other=0)
            bit = (word >> (off & 31).to(tl.int32)) & 1
        dy, y = _pre(g, v, bit, slope, alpha, tiny, MODE)
        d = tl.where(m, (y - hi[None, :]) - lo[None, :], 0.0)
        dy = tl.where(m, dy, 0.0)
        sg += tl.sum(dy, axis=0)
        sgd += tl.sum(dy * d, axis=0)
        sd += tl.sum(d, axis=0)
    tl.store(part_ptr + sp * C + cols, sg, mask=cmask)
    tl.store(part_ptr + (nsplit + sp) * C + cols, sgd, mask=cmask)
    tl.store(part_ptr + (2 * nsplit + sp) * C + cols, sd, mask=cmask)


@triton.jit
def bwd_final(
    part_ptr,
    mean_ptr,
    inv_ptr,
    w_ptr,
    coef_ptr,
    dw_ptr,
    db_ptr,
    C,
    R,
    nsplit,
    HAS_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Sum the splits in float64, re-center on the batch mean (sum d / R), and form
    dgamma = sum dy * x_hat, dbeta = sum dy and coef (5, C) = (hi, lo, k1, k2, k3) with
    dx = k1 * dy + k2 * ((y - hi) - lo) + k3."""
    ACC = coef_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sg = tl.zeros([BLOCK_C], tl.float64)
    sgd = tl.zeros([BLOCK_C], tl.float64)
    sd = tl.zeros([BLOCK_C], tl.float64)
    for sp in range(0, nsplit):
        sg += tl.load(part_ptr + sp * C + cols, mask=cmask, other=0.0).to(tl.float64)
        sgd += tl.load(part_ptr + (nsplit + sp) * C + cols, mask=cmask, other=0.0).to(tl.float64)
        sd += tl.load(part_ptr + (2 * nsplit + sp) * C + cols, mask=cmask, other=0.0).to(tl.float64)
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
    hi = mu.to(ACC)
    lo = (mu - hi.to(tl.float64)).to(ACC)
    delta = sd / R  # batch mean minus the given mean
    sxc = sgd - delta * sg
    inv = tl.load(inv_ptr + cols, mask=cmask, other=1.0).to(tl.float64)
    k1 = inv
    if HAS_W:
        k1 = k1 * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float64)
    dgamma = sxc * inv
    k2 = -k1 * inv * (dgamma / R)
    k3 = -k1 * (sg / R) - k2 * delta
    tl.store(dw_ptr + cols, dgamma.to(dw_ptr.dtype.element_ty), mask=cmask)
    tl.store(db_ptr + cols, sg.to(db_ptr.dtype.element_ty), mask=cmask)
    tl.store(coef_ptr + cols, hi, mask=cmask)
    tl.store(coef_ptr + C + cols, lo, mask=cmask)
    tl.store(coef_ptr + 2 * C + cols, k1.to(ACC), mask=cmask)
    tl.store(coef_ptr + 3 * C + cols, k2.to(ACC), mask=cmask)
    tl.store(coef_ptr + 4 * C + cols, k3.to(ACC), mask=cmask)


@triton.jit
def dx_apply(
    g_ptr,
    v_ptr,
    mask_ptr,
    coef_ptr,
    dx_ptr,
    dres_ptr,
    numel,
    C,
    DIV,
    slope,
    alpha,
    tiny,
    MODE: tl.constexpr,
    WRITE_RES: tl.constexpr,
    BW: tl.constexpr,
):
    """dx = k1 * dy + k2 * ((y - hi) - lo) + k3 over the flat memory, (dy, y) from
    `_pre`; with WRITE_RES also the residual's gradient dy."""
    ACC = coef_ptr.dtype.element_ty
    words = tl.program_id(0).to(tl.int64) * BW + tl.arange(0, BW)
    bits = tl.arange(0, 32)
    off = words[:, None] * 32 + bits[None, :]  # (BW, 32)
    m = off < numel
    c = (off // DIV) % C
    hi = tl.load(coef_ptr + c, mask=m, other=0.0)
    lo = tl.load(coef_ptr + C + c, mask=m, other=0.0)
    k1 = tl.load(coef_ptr + 2 * C + c, mask=m, other=0.0)
    k2 = tl.load(coef_ptr + 3 * C + c, mask=m, other=0.0)
    k3 = tl.load(coef_ptr + 4 * C + c, mask=m, other=0.0)
    g = tl.load(g_ptr + off, mask=m, other=0.0).to(ACC)
    v = tl.load(v_ptr + off, mask=m, other=0.0).to(ACC)
    bit = tl.zeros([BW, 32], tl.int32)
    if MODE == 1:
        word = tl.load(mask_ptr + words, mask=words * 32 < numel, other=0)
        bit = (word[:, None] >> bits[None, :]) & 1
    dy, y = _pre(g, v, bit, slope, alpha, tiny, MODE)
    dx = k1 * dy + k2 * ((y - hi) - lo) + k3
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
    if WRITE_RES:
        tl.store(dres_ptr + off, dy.to(dres_ptr.dtype.element_ty), mask=m)
