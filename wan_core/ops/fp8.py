"""fp8 matrix multiplication for Linears whose weights are stored in fp8 (``compute='fp8'``).

A Linear stored as ``float8_e4m3fn`` (fp8 / scaled-fp8 checkpoints, or ``weight_dtype=fp8``)
normally casts its weight to bf16 per call and multiplies in bf16. With fp8 compute it keeps
the weight fp8 and quantises the activation instead: one scale per token row (the row's
largest magnitude over 448, the e4m3 maximum), then ``torch._scaled_mm`` multiplies the two
fp8 operands with the row scales and the weight's per-tensor scale and returns bf16. LoRA
patches stay bf16 on top (``add_to_output``); a layer with merged patches (full deltas, LoKr,
LoHa), GGUF storage or another fp8 format keeps the bf16 path.

On a GPU this pays only where the hardware multiplies fp8 (compute capability 8.9+: Ada,
Hopper) and when the activation quantisation does not cost more than it saves (fused into the
preceding element-wise work under ``compile``); elsewhere :func:`fp8_matmul_support` says why
not and the model keeps the bf16 path. On the CPU ``_scaled_mm`` runs too (slowly): that is
where the numerics are tested.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Optional

import torch

E4M3_MAX = 448.0
ALIGN = 16          # _scaled_mm's CUDA kernels need both matrix dimensions in multiples of 16


def fp8_matmul_support(device) -> Optional[str]:
    """None when ``device`` can multiply in fp8, else why not (for one warning)."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"this PyTorch ({torch.__version__}) has no fp8 matrix multiply"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
                    " has no fp8 matrix units (Ada or Hopper, 8.9+, needed)")
    elif device.type != "cpu":
        return f"fp8 matrix multiply is not available on {device.type}"
    return None


@torch.compiler.assume_constant_result
def device_multiplies_fp8(device_type: str, index: Optional[int]) -> bool:
    """Whether this device can run fp8 compute; warns once per device when it cannot (the
    layers then keep the bf16 path). A constant for ``torch.compile`` (compiled blocks,
    ``wan_core.models.block_compile``): called once while tracing, not traced itself."""
    return _device_multiplies_fp8(device_type, index)


@lru_cache(maxsize=None)
def _device_multiplies_fp8(device_type: str, index: Optional[int]) -> bool:
    reason = fp8_matmul_support(torch.device(device_type, index) if index is not None
                                else torch.device(device_type))
    if reason is not None:
        warnings.warn(f"compute='fp8': {reason}; multiplying in bf16 instead", stacklevel=3)
    return reason is None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [N, K] -> (``float8_e4m3fn`` [N, K], float32 scales [N, 1]) with
    ``x ~= q.float() * scale``: each row scaled so its largest magnitude maps to 448."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    q = (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """``x`` [..., K] (any float dtype) times the fp8 ``weight`` [N, K] (real weight =
    ``weight * weight_scale``), plus ``bias``, in ``out_dtype`` (bf16 / fp16 / fp32)."""
    shape = x.shape
    q, row_scale = quantize_rows(x.reshape(-1, shape[-1]))
    w_scale = (weight_scale.float().reshape(()) if weight_scale is not None
               else torch.ones((), device=x.device))
    col_scale = w_scale.to(x.device).expand(1, weight.shape[0]).contiguous()
    y = torch._scaled_mm(q, weight.t(), scale_a=row_scale, scale_b=col_scale,
                         out_dtype=out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.reshape(*shape[:-1], weight.shape[0])


def usable(weight: torch.Tensor) -> bool:
    """Whether a stored weight can go to ``_scaled_mm`` as it is (e4m3, aligned sizes)."""
    return (weight.dtype == getattr(torch, "float8_e4m3fn", None) and weight.dim() == 2
            and weight.shape[0] % ALIGN == 0 and weight.shape[1] % ALIGN == 0)


def set_fp8_compute(model: torch.nn.Module, enabled: bool = True) -> int:
    """Turn fp8 multiplication on (or off) for every Linear (``wan_core.ops.Linear``: the
    layers with an ``fp8_compute`` switch) of ``model`` whose stored weight can use it; returns
    how many layers will."""
    count = 0
    for module in model.modules():
        if hasattr(module, "fp8_compute"):
            module.fp8_compute = enabled
            count += int(enabled and module.qtype is None and usable(module.weight))
    return count
