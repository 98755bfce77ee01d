"""Triton kernels of the 8-bit attention (:mod:`wan_core.ops.fp8_attention`).

Imported only when the kernels run, so wan_core imports without triton. Two launches per call:

``quantize_blocks``
    q or k [B, L, H, D] (any strides) -> codes [B, H, L, D] in the 8-bit format and one float32
    scale per block of ``BLOCK`` rows [B, H, ceil(L / BLOCK)] (the block's abs-max over the
    format's largest value, times ``factor``). With ``SMOOTH`` the per-head mean over the
    sequence ``MEAN`` [B, H, D] is subtracted first.
``attention_forward``
    flash attention over the codes: one program per block of ``BLOCK_M`` query rows and
    (batch, head) walks the key blocks of ``BLOCK_N`` rows with the online softmax, Q·K^T in the
    8-bit format (fp32 accumulation, int32 for int8), P·V in v's 16-bit dtype (fp32
    accumulation), output [B, Lq, H, D] in O's dtype.

``FORMAT`` (constexpr): ``"fp8"`` e4m3 codes (largest 448), ``"int8"`` (largest 127, rounded
to nearest), or ``"none"``: the same scaling without rounding, in float32, which checks
everything but the 8-bit rounding exactly (used by the tests under Triton's interpreter).
"""
import triton
import triton.language as tl


@triton.jit
def quantize_blocks(X, MEAN, CODES, SCALES, L, H, n_blocks, factor,
                    stride_b, stride_l, stride_h, stride_d,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                    SMOOTH: tl.constexpr, FORMAT: tl.constexpr):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    mask = (rows < L)[:, None] & (cols < HEAD_DIM)[None, :]
    x = tl.load(X + b * stride_b + h * stride_h + rows[:, None] * stride_l
                + cols[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    if SMOOTH:
        mean = tl.load(MEAN + bh.to(tl.int64) * HEAD_DIM + cols, mask=cols < HEAD_DIM,
                       other=0.0)
        # re-masked: the padding rows must not enter the block's abs-max as -mean
        x = tl.where(mask, x - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    if FORMAT == "fp8":
        scale = tl.where(amax > 0, amax / 448.0, 1.0)
        codes = tl.minimum(tl.maximum(x / scale, -448.0), 448.0).to(tl.float8e4nv)
    elif FORMAT == "int8":
        scale = tl.where(amax > 0, amax / 127.0, 1.0)
        y = x / scale
        codes = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int8)     # the cast truncates
    else:
        scale = tl.where(amax > 0, amax, 1.0)
        codes = x / scale
    out = CODES + bh.to(tl.int64) * L * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :]
    tl.store(out, codes, mask=mask)
    tl.store(SCALES + bh * n_blocks + block, scale * factor)


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A [rows, D_PAD] tile, zero past ``n_rows`` (when ``MASK_ROWS``) and past the head dim;
    the full tiles of a power-of-two head dim load without a mask."""
    if MASK_ROWS:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :],
                       other=0.0)
    elif D_PAD != HEAD_DIM:
        tile = tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _attend_key_block(acc, m_i, l_i, q, q_scale, K, V, KS, start, Lk, stride_vl, stride_vd,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                      FORMAT: tl.constexpr, MASKED: tl.constexpr):
    """One step of the online softmax: fold keys ``start .. start + BLOCK_N`` into the
    running max ``m_i``, sum ``l_i`` [BLOCK_M] and unnormalised output ``acc`` [BLOCK_M, D_PAD]
    (logits in log2 units: ``q_scale`` carries the softmax scale times log2(e))."""
    keys = start + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    k = _load_tile(K + keys[:, None] * HEAD_DIM + cols[None, :], keys, Lk, cols,
                   HEAD_DIM, D_PAD, MASKED)
    if FORMAT == "int8":
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * (q_scale * tl.load(KS + start // BLOCK_N))
    if MASKED:
        s = tl.where((keys < Lk)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_tile(V + keys[:, None] * stride_vl + cols[None, :] * stride_vd, keys, Lk, cols,
                   HEAD_DIM, D_PAD, MASKED)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def attention_forward(Q, K, V, QS, KS, O, Lq, Lk, H, n_q_blocks, n_k_blocks,
                      stride_vb, stride_vl, stride_vh, stride_vd,
                      stride_ob, stride_ol, stride_oh, stride_od,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, FORMAT: tl.constexpr):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    q = _load_tile(Q + bh.to(tl.int64) * Lq * HEAD_DIM + rows[:, None] * HEAD_DIM
                   + cols[None, :], rows, Lq, cols, HEAD_DIM, D_PAD, True)
    q_scale = tl.load(QS + bh * n_q_blocks + block)
    K += bh.to(tl.int64) * Lk * HEAD_DIM
    V += b * stride_vb + h * stride_vh
    KS += bh * n_k_blocks

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    full_blocks = Lk // BLOCK_N
    for j in range(full_blocks):
        acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, q, q_scale, K, V, KS, j * BLOCK_N, Lk,
                                          stride_vl, stride_vd, HEAD_DIM, D_PAD, BLOCK_N,
                                          FORMAT, False)
    if full_blocks * BLOCK_N < Lk:      # the last, partial key block (>= 1 real key)
        acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, q, q_scale, K, V, KS,
                                          full_blocks * BLOCK_N, Lk, stride_vl, stride_vd,
                                          HEAD_DIM, D_PAD, BLOCK_N, FORMAT, True)
    out = acc / l_i[:, None]
    ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + cols[None, :] * stride_od
    tl.store(ptrs, out.to(O.dtype.element_ty),
             mask=(rows < Lq)[:, None] & (cols < HEAD_DIM)[None, :])
