"""GGUF (ggml) block quantisation, dequantised in torch on the compute device.

A quantised weight is kept as its raw bytes: uint8 ``[rows, bytes_per_row]``, rows being the
output features; ``dequantize(raw, qtype, shape, dtype)`` rebuilds the float weight, one whole
layer at a time, vectorised over all blocks. Formats (ggml's ``block_*`` structs; ``d``,
``m``, ``dmin`` are fp16; ``QK_K`` = 256):

  * Q8_0 (34 B / 32): d, 32 x int8                       x = d * q
  * Q4_0 (18 B / 32): d, 16 B nibbles (lo: 0-15, hi: 16-31)   x = d * (q - 8)
  * Q4_1 (20 B / 32): d, m, 16 B nibbles                 x = d * q + m
  * Q5_0 (22 B / 32): d, 32-bit high bits, 16 B nibbles  x = d * (q - 16)
  * Q5_1 (24 B / 32): d, m, 32-bit high bits, nibbles    x = d * q + m
  * Q2_K (84 B / 256): 16 scale/min nibble pairs, 64 B of 2-bit q, d, dmin
  * Q3_K (110 B / 256): 32 B high-bit mask, 64 B of 2-bit q, 12 B of 16 6-bit scales, d
  * Q4_K (144 B / 256): d, dmin, 12 B of 8 6-bit scales + 8 6-bit mins, 128 B nibbles
  * Q5_K (176 B / 256): as Q4_K plus 32 B of high bits
  * Q6_K (210 B / 256): 128 B low nibbles, 64 B high 2 bits, 16 int8 scales, d
  * F32, F16, BF16: plain (BF16 stored as raw 16-bit words).
"""
from __future__ import annotations

import math

import torch

# ggml type id -> (name, elements per block, bytes per block)
QTYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2),
}
QK_K = 256


class UnsupportedQuantType(ValueError):
    """A GGUF tensor type this build cannot dequantise."""


def qtype_name(qtype: int) -> str:
    return QTYPES[qtype][0] if qtype in QTYPES else f"type {qtype}"


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2k] uint8 -> [..., k] float32 (little-endian fp16)."""
    return raw.contiguous().view(torch.float16).float()


def _u32(raw: torch.Tensor) -> torch.Tensor:
    """[..., 4] uint8 -> [...] int64 (little-endian uint32)."""
    b = raw.long()
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k]: all low nibbles, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(value: torch.Tensor, count: int) -> torch.Tensor:
    """[n] int64 -> [n, count] its low ``count`` bits (bit i at column i)."""
    return (value[:, None] >> torch.arange(count, device=value.device)) & 1


# -- 32-element formats ------------------------------------------------------------------------

def _q8_0(b):
    return _f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()


def _q4_0(b):
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b):
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5(b, offset):
    q = _nibbles(b[:, offset + 4:]).long() | (_bits(_u32(b[:, offset:offset + 4]), 32) << 4)
    return q.float()


def _q5_0(b):
    return _f16(b[:, :2]) * (_q5(b, 2) - 16)


def _q5_1(b):
    return _f16(b[:, :2]) * _q5(b, 4) + _f16(b[:, 2:4])


# -- K-quants (256-element super-blocks) -----------------------------------------------------

def _scale_min_k4(s: torch.Tensor):
    """12 bytes -> 8 six-bit scales and 8 six-bit mins ([n, 8] each), ggml's get_scale_min_k4."""
    s = s.long()
    low, high = s[:, :4], s[:, 8:12]
    scales = torch.cat([low & 63, (high & 0x0F) | ((low >> 6) << 4)], dim=1)
    mins = torch.cat([s[:, 4:8] & 63, (high >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _k_groups(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes of nibbles -> [n, 8, 32]: 4 chunks of 32 bytes, low nibbles then high."""
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat([q & 0x0F, q >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scales, mins = _scale_min_k4(b[:, 4:16])
    q = _k_groups(b[:, 16:144]).float()
    return (d[:, :, None] * scales[:, :, None] * q - dmin[:, :, None] * mins[:, :, None]).flatten(1)


def _q5_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scales, mins = _scale_min_k4(b[:, 4:16])
    high = (b[:, 16:48].long()[:, None, :] >> torch.arange(8, device=b.device)[None, :, None]) & 1
    q = (_k_groups(b[:, 48:176]).long() | (high << 4)).float()           # [n, 8, 32]
    return (d[:, :, None] * scales[:, :, None] * q - dmin[:, :, None] * mins[:, :, None]).flatten(1)


def _q6_k(b):
    ql, qh = b[:, :128].long(), b[:, 128:192].long()
    scales = b[:, 192:208].view(torch.int8).float()                       # [n, 16]
    d = _f16(b[:, 208:210])
    ql = ql.reshape(-1, 2, 2, 32)             # [n, half, (l, l + 32), 32]
    qh = qh.reshape(-1, 2, 1, 32)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2)                          # [n, 2, 4, 32]
    shifts = torch.tensor([0, 2, 4, 6], device=b.device)[None, None, :, None]
    q = (low | (((qh >> shifts) & 3) << 4)).float() - 32                  # [n, 2, 4, 32]
    q = q.reshape(-1, 2, 4, 2, 16)                                         # 16-element groups
    s = scales.reshape(-1, 2, 4, 2)[..., None]          # group (half, quarter, sub) -> scale
    return (d[:, :, None, None, None] * s * q).flatten(1)


def _q2_k(b):
    scales = b[:, :16].long()
    qs = b[:, 16:80].long().reshape(-1, 2, 1, 32)       # [n, half, shift, 32]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    shifts = torch.tensor([0, 2, 4, 6], device=b.device)[None, None, :, None]
    q = ((qs >> shifts) & 3).float().reshape(-1, 2, 4, 2, 16)             # [n, half, j, sub, 16]
    sc = scales.reshape(-1, 2, 4, 2, 1)
    return (d[:, :, None, None, None] * (sc & 0x0F) * q
            - dmin[:, :, None, None, None] * (sc >> 4)).flatten(1)


def _q3_k(b):
    hmask = b[:, :32].long()
    qs = b[:, 32:96].long().reshape(-1, 2, 1, 32)
    raw = b[:, 96:108].long()
    d = _f16(b[:, 108:110])
    j = torch.arange(16, device=b.device)
    low = torch.where(j < 8, raw[:, j % 8] & 0x0F, raw[:, j % 8] >> 4)
    high = (raw[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    scales = (low | (high << 4)).float() - 32                             # [n, 16]
    shifts = torch.tensor([0, 2, 4, 6], device=b.device)[None, None, :, None]
    q = (qs >> shifts) & 3                                                # [n, 2, 4, 32]
    bit = torch.arange(8, device=b.device).reshape(1, 2, 4, 1)            # mask bit per (half, j)
    missing = ((hmask[:, None, None, :] >> bit) & 1) == 0
    q = (q - 4 * missing.long()).float().reshape(-1, 2, 4, 2, 16)
    return (d[:, :, None, None, None] * scales.reshape(-1, 2, 4, 2, 1) * q).flatten(1)


_BLOCK_DEQUANT = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 10: _q2_k, 11: _q3_k,
                  12: _q4_k, 13: _q5_k, 14: _q6_k}


class QuantizedTensor:
    """A GGUF-quantised tensor as read from a file: raw bytes (uint8, usually a view of the
    memory-mapped file), its ggml type and its logical shape. Loaders put ``raw`` into a
    ``wan_core.ops.Linear`` (which dequantises it per call) or dequantise small tensors once."""

    def __init__(self, raw: torch.Tensor, qtype: int, shape):
        self.raw, self.qtype, self.shape = raw, int(qtype), torch.Size(shape)

    dtype = torch.uint8

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        raw = self.raw if device is None else self.raw.to(device)
        return dequantize(raw, self.qtype, self.shape, dtype)

    def __repr__(self) -> str:
        return f"QuantizedTensor({qtype_name(self.qtype)}, shape={tuple(self.shape)})"


def dequantize(raw: torch.Tensor, qtype: int, shape, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """Raw GGUF bytes (uint8, ``[rows, bytes_per_row]`` or flat) -> a ``shape`` tensor in
    ``dtype`` on ``raw``'s device."""
    if qtype not in QTYPES:
        raise UnsupportedQuantType(f"GGUF tensor type {qtype_name(qtype)} is not supported; "
                                   f"supported: {', '.join(sorted(n for n, _, _ in QTYPES.values()))}")
    numel = math.prod(shape)
    name, block, size = QTYPES[qtype]
    if raw.numel() != numel // block * size:
        raise ValueError(f"{name} data of {raw.numel()} bytes does not hold a {tuple(shape)} "
                         f"tensor ({numel // block * size} bytes expected)")
    flat = raw.reshape(-1)
    if name == "F32":
        out = flat.view(torch.float32)
    elif name == "F16":
        out = flat.view(torch.float16)
    elif name == "BF16":
        out = flat.view(torch.bfloat16)
    else:
        out = _BLOCK_DEQUANT[qtype](flat.reshape(-1, size))
    return out.reshape(shape).to(dtype)
