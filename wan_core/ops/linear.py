"""Layers whose weights may be stored in a smaller dtype than they are computed in.

Wan checkpoints are often shipped as fp8 (``float8_e4m3fn`` / ``float8_e5m2``), optionally
"scaled" the ComfyUI way: an fp32 ``scale_weight`` per layer such that the real weight is
``weight.to(dtype) * scale_weight``. Keeping such weights fp8 in memory and casting one layer
at a time at compute time halves the memory of a bf16 model.

``Linear`` here is a drop-in ``nn.Linear`` that does that cast (``wan_core.loading.assign``
puts fp8 state dicts into it without widening them).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


class Linear(nn.Linear):
    """``nn.Linear`` that casts its stored weight to the input's dtype at call time.

    ``scale_weight`` (a 0-d or 1-element fp32 tensor, or None) multiplies the cast weight:
    ComfyUI's ``fp8_scaled`` format.
    """

    scale_weight: torch.Tensor | None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("scale_weight", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype or self.scale_weight is not None:
            w = w.to(x.dtype)
            if self.scale_weight is not None:
                w = w * self.scale_weight.to(device=w.device, dtype=x.dtype)
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)
