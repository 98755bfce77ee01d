"""The fp8 attention kernel on CPU through Triton's interpreter, in a process of its own.

``python -m tests.fp8_attention_interpreted`` prints one JSON object of relative L2 errors
against SDPA; tests/test_fp8_attention.py runs it and checks the figures. It is a separate
process because ``TRITON_INTERPRET=1`` must be set before triton is first imported (triton's own
``tl.max`` / ``tl.sum`` are jit functions fixed at that import), which in a pytest session may
already have happened; the library never sets it.

Triton 3.9's interpreter gets two things wrong that a GPU does right, so :func:`main` patches
them: its fp32 -> fp8 e4m3 cast does not carry a rounded-up mantissa into the exponent (7.75 ->
4.0), rounds ties up and does not saturate (500 -> 256), and its ``tl.dot`` multiplies bf16
operands as raw integer bits (its fp32 -> bf16 cast also truncates). These are replaced by
torch's casts (fp8 saturating to +-448 like the GPU's satfinite conversion, bf16 to nearest
even) and a bf16 dot widened to fp32. Not checkable on CPU: the GPU's fp8 / bf16 MMAs, their
accumulation order, speed, and compilation for a device (block sizes, warps, stages).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def reference(q, k, v):
    """fp32 SDPA of the same (possibly 16-bit) inputs, [B, L, H, D]."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def qkv(length, dim, dtype, spread=1.0, heads=2, seed=0):
    """q, k with entries ~N(0, spread^2), v ~N(0, 1); [1, L, H, D]. The DiT's q / k leave an
    RMSNorm, so their entries have an RMS of the norm weights (1 in Wan's initialisation)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, length, heads, dim, generator=gen) for _ in range(3))
    return (q * spread).to(dtype), (k * spread).to(dtype), v.to(dtype)


def unsmoothed_fp8(q, k, v, block_m, block_n):
    """Torch emulation of the kernel's numerics without the K mean subtraction."""
    def blocks(x, rows):                                       # x [L, D] -> e4m3 per block
        out = torch.empty_like(x)
        for i in range(0, x.shape[0], rows):
            part = x[i:i + rows]
            scale = part.abs().max() / 448.0
            out[i:i + rows] = (part / scale).to(torch.float8_e4m3fn).float() * scale
        return out

    d = q.shape[-1]
    outs = []
    for h in range(q.shape[2]):
        qh = blocks(q[0, :, h].float() * d ** -0.5, block_m)
        kh = blocks(k[0, :, h].float(), block_n)
        p = torch.softmax(qh @ kh.T, dim=-1)
        outs.append(p.to(v.dtype).float() @ v[0, :, h].float())
    return torch.stack(outs, dim=1)[None]


def _patch_interpreter():
    from triton.language import core as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    dot = interpreter.InterpreterBuilder.create_dot

    def exact_convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype in (tl.float32, tl.float16):
            x = torch.from_numpy(np.ascontiguousarray(data).astype(np.float32))
            if output_dtype == tl.float8e4nv:
                return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            if output_dtype == tl.bfloat16:
                return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return convert(data, input_dtype, output_dtype, rounding_mode)

    def widen(h):
        if h.dtype == tl.bfloat16:
            bits = h.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return h

    def bf16_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter._convert_float = exact_convert
    interpreter.InterpreterBuilder.create_dot = bf16_dot


LENGTHS = (45, 130)         # below one 64-key block; two full key blocks + 2 keys
DIMS = (64, 128)
SPREADS = (0.5, 1.0)
OFFSET = 20.0


def main() -> dict:
    os.environ["TRITON_INTERPRET"] = "1"          # before the first import of triton
    import triton

    _patch_interpreter()
    from wan_core.ops import fp8_attention as ops

    start = time.perf_counter()
    res = {"triton": triton.__version__, "none": {}, "formats": {}}
    for length in LENGTHS:
        for dim in DIMS:
            for dtype in ("bfloat16", "float16"):
                q, k, v = qkv(length, dim, getattr(torch, dtype))
                out = ops.fp8_attention(q, k, v, qk_format="none")
                assert out.dtype == q.dtype and out.shape == q.shape
                res["none"][f"{length}-{dim}-{dtype}"] = rel_l2(out, reference(q, k, v))
            for spread in SPREADS:
                q, k, v = qkv(length, dim, torch.bfloat16, spread, seed=length + dim)
                ref = reference(q, k, v)
                for fmt in ("fp8", "int8"):
                    res["formats"][f"{length}-{dim}-{spread}-{fmt}"] = rel_l2(
                        ops.fp8_attention(q, k, v, qk_format=fmt), ref)
    q, k, v = qkv(130, 128, torch.bfloat16, 0.5, seed=3)
    one = time.perf_counter()
    plain = ops.fp8_attention(q, k, v)
    res["one_call_s"] = time.perf_counter() - one          # L=130, D=128, 2 heads
    offset = OFFSET * torch.randn(128, generator=torch.Generator().manual_seed(4))
    k_off = (k.float() + offset).to(torch.bfloat16)
    ref_off = reference(q, k_off, v)
    res["offset"] = {
        "plain": rel_l2(plain, reference(q, k, v)),
        "smoothed": rel_l2(ops.fp8_attention(q, k_off, v), ref_off),
        "unsmoothed": rel_l2(unsmoothed_fp8(q, k_off, v, ops.BLOCK_M, ops.BLOCK_N), ref_off),
    }
    # for scale: SDPA itself in bf16 on the spread-1 inputs
    q, k, v = qkv(130, 128, torch.bfloat16, 1.0, seed=130 + 128)
    res["sdpa_bf16"] = rel_l2(F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2), reference(q, k, v))
    res["total_s"] = time.perf_counter() - start
    return res


if __name__ == "__main__":
    print(json.dumps(main()))
