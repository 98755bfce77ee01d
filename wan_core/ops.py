"""Layers whose weights may be stored in a smaller dtype than they are computed in.

Wan checkpoints are often shipped as fp8 (``float8_e4m3fn`` / ``float8_e5m2``), optionally
"scaled" the ComfyUI way: an fp32 ``scale_weight`` per layer such that the real weight is
``weight.to(dtype) * scale_weight``. Keeping such weights fp8 in memory and casting one layer
at a time at compute time halves the memory of a bf16 model.

``Linear`` here is a drop-in ``nn.Linear`` that does that cast; ``assign_state_dict`` puts a
state dict into a model built on the meta device without copying the tensors more than needed.
"""
from __future__ import annotations

from typing import Mapping

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


def assign_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                      device: torch.device | str = "cpu", keep_fp8: bool = True) -> None:
    """Load ``sd`` into ``model`` (typically built on the meta device) by assignment.

    Every tensor is converted to ``dtype`` (when given) and moved to ``device``, except the
    weights of ``wan_core.ops.Linear`` layers stored in fp8, which stay fp8 when ``keep_fp8``
    and are cast per layer at compute time. ``<layer>.scale_weight`` entries become that layer's
    scale; other scaled-fp8 extras (``scale_input``, the ``scaled_fp8`` marker) are dropped.
    Raises ``KeyError``-free, readable errors via ``load_state_dict(strict=True)``.
    """
    fp8_linear = {name for name, m in model.named_modules() if isinstance(m, Linear)}
    scales = {}
    tensors = {}
    for key, value in sd.items():
        if key.endswith(".scale_weight"):
            scales[key[: -len(".scale_weight")]] = value
            continue
        if key.endswith(".scale_input") or key in ("scaled_fp8",):
            continue
        tensors[key] = value

    for key, value in list(tensors.items()):
        layer = key.rsplit(".", 1)[0]
        keep = keep_fp8 and is_fp8(value.dtype) and layer in fp8_linear and key.endswith(".weight")
        target_dtype = value.dtype if keep or dtype is None else dtype
        if is_fp8(value.dtype) and not keep:
            value = value.to(torch.float32)
            if layer in scales:
                value = value * scales.pop(layer).to(torch.float32)
        tensors[key] = value.to(device=device, dtype=target_dtype)

    model.load_state_dict(tensors, strict=True, assign=True)
    for layer, scale in scales.items():
        module = model.get_submodule(layer)
        if isinstance(module, Linear):
            module.scale_weight = scale.to(device=device, dtype=torch.float32).reshape(())


def build_from_state_dict(build, sd: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None,
                          device, source, what: str) -> nn.Module:
    """Build ``build()`` on the meta device and assign ``sd`` to it (no second weight copy).

    A state dict that does not fit the architecture inferred from it raises a CheckpointError
    naming the file, ``what`` was expected and the first mismatch PyTorch reported.
    """
    from .checkpoint import CheckpointError, source_name

    with torch.device("meta"):
        model = build()
    try:
        assign_state_dict(model, sd, dtype=dtype, device=device)
    except RuntimeError as e:
        raise CheckpointError(f"{source_name(source)} does not fit {what} inferred from its "
                              f"shapes: {str(e).splitlines()[0]} ...") from None
    return model
