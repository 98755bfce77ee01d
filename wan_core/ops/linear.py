"""Layers whose weights may be stored in a smaller dtype than they are computed in.

Wan checkpoints are often shipped as fp8 (``float8_e4m3fn`` / ``float8_e5m2``), optionally
"scaled" the ComfyUI way: an fp32 ``scale_weight`` per layer such that the real weight is
``weight.to(dtype) * scale_weight``. Keeping such weights fp8 in memory and casting one layer
at a time at compute time halves the memory of a bf16 model.

``Linear`` here is a drop-in ``nn.Linear`` that does that cast (``wan_core.loading.assign``
puts fp8 state dicts into it without widening them). It also carries ``patches``: weight deltas
(LoRA, LoKr, LoHa, full diffs; ``wan_core.ops.lora``) applied at call time, low-rank ones to
the activations (``y += s * (x @ down^T) @ up^T``), the others added to the weight in float32;
so a patched layer never rounds its delta into the stored dtype and never changes the stored
weight.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp8 import device_multiplies_fp8, fp8_linear, usable
from .gguf import dequantize

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


class Linear(nn.Linear):
    """``nn.Linear`` whose weight is rebuilt in the input's dtype at call time.

    ``scale_weight`` (a 0-d or 1-element fp32 tensor, or None) multiplies the cast weight:
    ComfyUI's ``fp8_scaled`` format. ``qtype`` (a ggml type id, or None): ``weight`` holds
    GGUF-quantised bytes ``[out, bytes_per_row]`` (uint8), dequantised per call on the weight's
    device (``wan_core.ops.gguf``). ``patches`` (a ModuleList of ``WeightPatch``, empty for a
    plain layer): low-rank ones act on the activations, the others are added to the
    dequantised weight in float32, once per call; their tensors are non-persistent buffers, so
    they follow ``.to(device)`` and stay out of ``state_dict()``.
    """

    scale_weight: torch.Tensor | None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("scale_weight", None, persistent=False)
        self.patches = nn.ModuleList()
        self.qtype: int | None = None
        self.fp8_compute = False      # multiply in fp8 (``wan_core.ops.fp8``) where it can

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The logical weight shape ``(out, in)``, whatever the storage."""
        return (self.out_features, self.in_features)

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight this layer computes with, ``[out, in]`` in ``dtype``: the stored weight
        dequantised (GGUF) or cast (fp8, bf16 ...), times ``scale_weight``, plus the deltas of
        the patches that must be merged (full, LoKr, LoHa; added in float32, cast once).
        Low-rank patches are not in it: :meth:`forward` applies them to the activations."""
        merged = [p for p in self.patches if not p.low_rank]
        work = torch.float32 if merged else dtype
        if self.qtype is not None:
            w = dequantize(self.weight, self.qtype, self.weight_shape, work)
        else:
            w = self.weight.to(work)
        if self.scale_weight is not None:
            w = w * self.scale_weight.to(device=w.device, dtype=work)
        if merged:
            if w is self.weight:
                w = w.clone()
            for patch in merged:
                w.add_(patch.delta(w.shape, w.device))
            w = w.to(dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if self.fp8_compute and self.qtype is None and usable(self.weight) and \
                all(p.low_rank for p in self.patches) and \
                device_multiplies_fp8(x.device.type, x.device.index):
            y = fp8_linear(x, self.weight, self.scale_weight, b, x.dtype)
        else:
            if b is not None and b.dtype != x.dtype:
                b = b.to(x.dtype)
            y = F.linear(x, self.compute_weight(x.dtype), b)
        for patch in self.patches:
            if patch.low_rank:
                y = patch.add_to_output(x, y)
        return y
