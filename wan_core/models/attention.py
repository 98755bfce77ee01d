"""One attention entry point for every model in the pack.

``attention(q, k, v, backend)`` takes q [B, Lq, heads, head_dim] and k/v [B, Lk, heads, head_dim]
and returns [B, Lq, heads, head_dim] in q's dtype. Wan attends every key (the text is zero-padded
to a fixed length and the pad tokens are attended, as in the official model); the only mask is an
optional additive float ``bias`` [B, 1, 1, Lk] on the logits, which the DiT uses to let one key stand
in for many identical pad keys (see ``supports_bias``).

Backends:
  ``sdpa``        PyTorch ``scaled_dot_product_attention`` (default; CPU and GPU)
  ``flash_attn``  the ``flash_attn`` package (CUDA, fp16/bf16), only when installed
  ``sage``        the ``sageattention`` package (CUDA), only when installed
  ``fp8``         wan_core's Triton kernel with Q·K^T in fp8 (:mod:`wan_core.ops.fp8_attention`;
                  CUDA with fp8 tensor cores, 8.9+, and ``triton``); elsewhere one warning per
                  reason and SDPA. Meant for self-attention: see :func:`cross_attention_backend`
  ``int8``        the same kernel with int8 Q·K^T codes (SageAttention's choice; a third of
                  fp8's error at the same tensor-core rate on Ada / Hopper)
Asking for a flash_attn / sage backend that is not installed raises ``AttentionBackendError``
with the fix.
"""
from __future__ import annotations

import importlib.util
import warnings
from functools import lru_cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash_attn", "sage", "fp8", "int8")

_PACKAGES = {"flash_attn": "flash_attn", "sage": "sageattention"}
_INSTALL_HINTS = {
    "flash_attn": "pip install flash-attn --no-build-isolation (needs a CUDA GPU)",
    "sage": "pip install sageattention (needs a CUDA GPU and triton)",
}


class AttentionBackendError(RuntimeError):
    """The requested attention backend is unknown or not installed."""


def available_backends() -> list[str]:
    """The backends usable in this Python environment (``sdpa`` is always there; ``fp8`` when
    triton is installed; without it ``fp8`` is still accepted and runs SDPA after a warning)."""
    found = [b for b, pkg in _PACKAGES.items() if importlib.util.find_spec(pkg)]
    return ["sdpa"] + found + (["fp8", "int8"] if importlib.util.find_spec("triton") else [])


def cross_attention_backend(backend: str) -> str:
    """The backend of the cross-attentions (text, I2V image) of a model whose self-attention
    uses ``backend``: ``fp8`` is for self-attention only (8-bit attention gives NaNs in the I2V
    image cross-attention, and the short text keys gain nothing), so it maps to ``sdpa``."""
    return "sdpa" if backend in ("fp8", "int8") else backend


def _sdpa(q, k, v, bias=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias)
    return out.transpose(1, 2)


def _flash_attn(q, k, v):
    from flash_attn import flash_attn_func

    if q.dtype not in (torch.float16, torch.bfloat16):
        dtype = q.dtype
        return flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16()).to(dtype)
    return flash_attn_func(q, k, v)


def _sage(q, k, v):
    from sageattention import sageattn

    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False).to(dtype)


@lru_cache(maxsize=None)
def _warn_fallback(backend: str, reason: str) -> None:
    warnings.warn(f"attention={backend!r}: {reason}; using sdpa instead", stacklevel=2)


# A Triton launch behind Python checks: a compiled block breaks its graph here and runs it
# eagerly. torch._disable_dynamo is torch.compiler.disable that imports dynamo at first call,
# not when this module is imported.
def _quantised(qk_format: str):
    @torch._disable_dynamo
    def impl(q, k, v):
        from ..ops import fp8_attention as fp8_ops

        reason = fp8_ops.fp8_attention_support(q.device, q.shape[-1])
        if reason is not None:
            _warn_fallback(qk_format, reason)
            return _sdpa(q, k, v)
        return fp8_ops.fp8_attention(q, k, v, qk_format=qk_format)
    return impl


# fp8 (e4m3) Q·K^T: rel. L2 0.034-0.038 per attention at the RMS-1 q/k that RMSNorm gives;
# int8 codes in the same kernel (SageAttention's choice): 0.011-0.013 (interpreter, CPU).
_fp8, _int8 = _quantised("fp8"), _quantised("int8")
_QUANTISED = (_fp8, _int8)

_IMPLS = {"sdpa": _sdpa, "flash_attn": _flash_attn, "sage": _sage, "fp8": _fp8, "int8": _int8}


@lru_cache(maxsize=None)
def resolve_backend(backend: str) -> Callable:
    """Check ``backend`` once and return its implementation; clear errors otherwise."""
    if backend not in _IMPLS:
        raise AttentionBackendError(
            f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    pkg = _PACKAGES.get(backend)
    if pkg and importlib.util.find_spec(pkg) is None:
        raise AttentionBackendError(
            f"attention backend {backend!r} was requested but the '{pkg}' package is not "
            f"installed. Install it ({_INSTALL_HINTS[backend]}) or use attention='sdpa'.")
    return _IMPLS[backend]


def _impl_for(backend: str, device: torch.device) -> Callable:
    impl = resolve_backend(backend)
    # _fp8 picks its own fallback (one warning, then SDPA)
    return impl if impl is _sdpa or impl in _QUANTISED or device.type == "cuda" else _sdpa


def supports_bias(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``attention(..., backend, bias=...)`` takes a float32 logit bias for q of this
    device and dtype.

    True where SDPA runs on the CPU (its kernel adds a float32 bias to any q dtype) or with
    float32 q; flash-attn / Sage / fp8 take no bias, and SDPA's GPU kernels are not relied on
    to keep a float32 bias exact next to a bf16/fp16 q.
    """
    device = torch.device(device)
    return _impl_for(backend, device) is _sdpa and (device.type != "cuda" or
                                                     dtype == torch.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              backend: str = "sdpa", bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention; ``bias`` (float32, broadcastable to [B, H, Lq, Lk]) is added to the
    scaled logits; only where ``supports_bias(backend, q.device, q.dtype)``.

    q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] (q's dtype). flash-attn and Sage run
    on CUDA tensors only; on CPU they fall back to SDPA (fp8 with one warning).
    """
    impl = _impl_for(backend, q.device)
    if bias is None:
        return impl(q, k, v)
    if not supports_bias(backend, q.device, q.dtype):
        raise ValueError(f"attention backend {backend!r} takes no logit bias for {q.dtype} "
                         f"on {q.device.type}")
    return impl(q, k, v, bias)
