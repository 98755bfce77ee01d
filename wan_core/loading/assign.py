"""Putting a state dict into a model built on the meta device, without a second weight copy.

fp8 matrix weights of ``wan_core.ops.Linear`` layers stay fp8 (scaled fp8 keeps its per-layer
``scale_weight``); every other tensor is converted to the compute dtype as it is assigned.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from ..ops import Linear, is_fp8
from ..ops.gguf import QuantizedTensor
from .checkpoint import CheckpointError, source_name


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
        if isinstance(value, QuantizedTensor):
            tensors[key] = _keep_quantized(model, key, value, device)
            continue
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


def _keep_quantized(model: nn.Module, key: str, value: QuantizedTensor, device) -> torch.Tensor:
    """Put a GGUF-quantised Linear weight into its layer as raw bytes (dequantised per call)."""
    layer, leaf = key.rsplit(".", 1)
    module = model.get_submodule(layer)
    if not isinstance(module, Linear) or leaf != "weight":
        raise RuntimeError(f"quantised tensor {key} is not a Linear weight")
    if tuple(value.shape) != module.weight_shape:
        raise RuntimeError(f"size mismatch for {key}: copying a param with shape "
                           f"{tuple(value.shape)}, the model has {module.weight_shape}")
    raw = nn.Parameter(value.raw.to(device), requires_grad=False)
    module.weight = raw
    module.qtype = value.qtype
    return raw


def build_from_state_dict(build, sd: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None,
                          device, source, what: str) -> nn.Module:
    """Build ``build()`` on the meta device and assign ``sd`` to it (no second weight copy).

    A state dict that does not fit the architecture inferred from it raises a CheckpointError
    naming the file, ``what`` was expected and the first mismatch PyTorch reported.
    """
    with torch.device("meta"):
        model = build()
    try:
        assign_state_dict(model, sd, dtype=dtype, device=device)
    except RuntimeError as e:
        raise CheckpointError(f"{source_name(source)} does not fit {what} inferred from its "
                              f"shapes: {str(e).splitlines()[0]} ...") from None
    return model


def convert_tensors(sd: dict, model: nn.Module, dtype: torch.dtype, device,
                    linear_dtype: torch.dtype | None = None) -> None:
    """Cast every tensor of ``sd`` (in place, one at a time, so the old one can be freed):
    fp8 weights of ``ops.Linear`` layers stay fp8 (their ``scale_weight`` kept), any other fp8
    tensor is dequantised with its scale, everything else goes to ``dtype``, except the other
    ``ops.Linear`` weights when ``linear_dtype`` (an fp8 dtype) asks to store them smaller."""
    linears = {n for n, m in model.named_modules() if isinstance(m, Linear)}
    for key in list(sd):
        if key.endswith(".scale_input") or key == "scaled_fp8":
            del sd[key]
    for key in list(sd):
        value = sd[key]
        if key.endswith(".scale_weight"):
            continue
        layer = key.rsplit(".", 1)[0]
        if isinstance(value, QuantizedTensor):
            if not (layer in linears and key.endswith(".weight")):
                sd[key] = value.dequantize(dtype, device)   # small tensors: once, at load
            continue
        if is_fp8(value.dtype):
            if layer in linears and key.endswith(".weight"):
                sd[key] = value.to(device)
                continue
            value = value.to(device=device, dtype=torch.float32)
            scale = sd.pop(layer + ".scale_weight", None)
            if scale is not None:
                value = value * scale.to(device=device, dtype=torch.float32)
        elif linear_dtype is not None and layer in linears and key.endswith(".weight"):
            sd[key] = value.to(device=device, dtype=linear_dtype)
            continue
        sd[key] = value.to(device=device, dtype=dtype)
    for key in [k for k in sd if k.endswith(".scale_weight")]:
        if not is_fp8(sd.get(key[: -len("scale_weight")] + "weight", torch.empty(0)).dtype):
            del sd[key]          # weight was upcast already; its scale would apply twice
