"""8-bit attention (``attention='fp8'``): a Triton flash-attention forward that multiplies
Q·K^T in fp8 (e4m3) on GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper).

The idea is SageAttention's: Q and K are quantised per block of rows, one scale per query
block (128 rows) and per key block (64 rows), each the block's abs-max over 448 (the e4m3
maximum); K first loses its mean over the sequence (per head), which softmax ignores (it adds
the same q·mean to every logit of a query) but which would otherwise dominate K's abs-max and
leave its informative part few bits. The softmax scale and log2(e) ride on the query scale, so
the kernel's online softmax runs on exp2. The kernels are in
:mod:`wan_core.ops.fp8_attention_kernels`.

P·V stays in v's 16-bit dtype (bf16 for fp32 inputs) with fp32 accumulation: P lies in [0, 1]
and an e4m3 P would add a 2-3 % error per weight on top of Q·K's, fp8 P·V on Hopper would need
V transposed by an extra pass (fp8 MMAs take both operands K-major), and P·V is half the
attention FLOPs, so fp8 Q·K alone already moves the larger share of the gain.

``qk_format='int8'`` runs the same kernel with int8 Q·K codes (abs-max over 127, rounded),
SageAttention 1's choice: same tensor-core rate on Ada / Hopper, and for Gaussian-like q / k
about 3x less error than e4m3's 3-bit mantissa (see tests/test_fp8_attention.py).
``'none'`` keeps the scaled values unrounded (float32): the tests check the rest of the kernel
exactly with it.

:func:`fp8_attention_support` says why the kernel cannot run for a device (no triton, no CUDA,
no fp8 tensor cores, head dim over 128); ``wan_core.models.attention`` then warns once and uses
SDPA. :func:`fp8_attention` itself runs wherever triton runs its kernels (under
``TRITON_INTERPRET=1``, set only by the tests, on CPU tensors).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch

FORMATS = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "none": torch.float32}
MAX_HEAD_DIM = 128
BLOCK_M = 128       # query rows per program (and per query scale)
BLOCK_N = 64        # key rows per step of the online softmax (and per key scale)
MIN_D_PAD = 32      # fp8 MMAs reduce over multiples of 32


def fp8_attention_support(device, head_dim: int) -> Optional[str]:
    """None when :func:`fp8_attention` can run on ``device`` for this head dim, else why not
    (one line, for the fallback warning)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"it runs on CUDA GPUs only (the tensors are on {device.type})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the 'triton' package is not installed (pip install triton)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                "has no fp8 tensor cores (Ada or Hopper, 8.9+, needed)")
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} is over {MAX_HEAD_DIM}"
    return None


def _quantize(kernels, x: torch.Tensor, mean: Optional[torch.Tensor], block: int,
              factor: float, qk_format: str, d_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> (codes [B, H, L, D] in the format's dtype, scales [B, H, nblocks]
    float32 with ``x - mean ~= codes * scale / factor`` per block of ``block`` rows)."""
    b, length, heads, dim = x.shape
    n_blocks = -(-length // block)
    codes = torch.empty(b, heads, length, dim, dtype=FORMATS[qk_format], device=x.device)
    scales = torch.empty(b, heads, n_blocks, dtype=torch.float32, device=x.device)
    kernels.quantize_blocks[(n_blocks, b * heads)](
        x, x if mean is None else mean, codes, scales, length, heads, n_blocks, factor,
        *x.stride(), HEAD_DIM=dim, D_PAD=d_pad, BLOCK=block, SMOOTH=mean is not None,
        FORMAT=qk_format, num_warps=4)
    return codes, scales


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  qk_format: str = "fp8") -> torch.Tensor:
    """Softmax attention without mask: q [B, Lq, H, D], k / v [B, Lk, H, D] (D <= 128, any
    strides) -> [B, Lq, H, D] in q's dtype, Q·K^T in ``qk_format`` ('fp8', 'int8' or
    'none', see the module docstring), P·V in v's dtype (bf16 when v is not 16-bit)."""
    if qk_format not in FORMATS:
        raise ValueError(f"qk_format must be one of {', '.join(FORMATS)} (got {qk_format!r})")
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or \
            q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q [B, Lq, H, D] and k, v [B, Lk, H, D] expected; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, lq, heads, dim = q.shape
    lk = k.shape[1]
    if dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {dim} is over {MAX_HEAD_DIM}")
    d_pad = max(MIN_D_PAD, 1 << (dim - 1).bit_length())
    if v.dtype not in (torch.float16, torch.bfloat16):
        v = v.to(torch.bfloat16)
    out = torch.empty(b, lq, heads, dim, dtype=q.dtype, device=q.device)
    if lq == 0 or lk == 0 or b * heads == 0:
        return out.zero_()
    from . import fp8_attention_kernels as kernels

    log2_e = 1.0 / math.log(2.0)
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        q_codes, q_scales = _quantize(kernels, q, None, BLOCK_M, dim ** -0.5 * log2_e,
                                      qk_format, d_pad)
        k_mean = k.mean(dim=1, dtype=torch.float32)                    # [B, H, D]
        k_codes, k_scales = _quantize(kernels, k, k_mean, BLOCK_N, 1.0, qk_format, d_pad)
        grid = (q_scales.shape[-1], b * heads)
        kernels.attention_forward[grid](
            q_codes, k_codes, v, q_scales, k_scales, out, lq, lk, heads,
            q_scales.shape[-1], k_scales.shape[-1], *v.stride(), *out.stride(),
            HEAD_DIM=dim, D_PAD=d_pad, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, FORMAT=qk_format,
            num_warps=8 if d_pad > 64 else 4, num_stages=3)
    return out
