"""Layers whose weights may be stored in a smaller dtype than they are computed in.

Wan checkpoints are often shipped as fp8 (``float8_e4m3fn`` / ``float8_e5m2``), optionally
"scaled" the ComfyUI way: an fp32 ``scale_weight`` per layer such that the real weight is
``weight.to(dtype) * scale_weight``. Keeping such weights fp8 in memory and casting one layer
at a time at compute time halves the memory of a bf16 model.

``Linear`` here is a drop-in ``nn.Linear`` that does that cast (``wan_core.loading.assign``
puts fp8 state dicts into it without widening them). It also carries ``patches``: weight deltas
(LoRA, LoKr, LoHa, full diffs; ``wan_core.ops.lora``) added in float32 at call time, so a
patched layer never rounds its delta into the stored dtype and never changes the stored weight.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


class Linear(nn.Linear):
    """``nn.Linear`` whose weight is rebuilt in the input's dtype at call time.

    ``scale_weight`` (a 0-d or 1-element fp32 tensor, or None) multiplies the cast weight:
    ComfyUI's ``fp8_scaled`` format. ``patches`` (a ModuleList of ``WeightPatch``, empty for a
    plain layer) add their deltas to the dequantised weight in float32, once per call; their
    tensors are non-persistent buffers, so they follow ``.to(device)`` and stay out of
    ``state_dict()``.
    """

    scale_weight: torch.Tensor | None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("scale_weight", None, persistent=False)
        self.patches = nn.ModuleList()

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight this layer computes with, ``[out, in]`` in ``dtype``."""
        w = self.weight
        if self.patches:
            w = w.float()
            if self.scale_weight is not None:
                w = w * self.scale_weight.to(device=w.device, dtype=torch.float32)
            elif w is self.weight:
                w = w.clone()
            for patch in self.patches:
                w.add_(patch.delta(w.shape, w.device))
            return w.to(dtype)
        if w.dtype != dtype or self.scale_weight is not None:
            w = w.to(dtype)
            if self.scale_weight is not None:
                w = w * self.scale_weight.to(device=w.device, dtype=dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, self.compute_weight(x.dtype), b)
