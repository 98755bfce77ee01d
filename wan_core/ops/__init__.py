"""Layers whose weights are stored small or patched: ``Linear`` rebuilds its weight per call in
the compute dtype from fp8 / scaled fp8 or GGUF-quantised storage (``gguf``) and applies LoRA /
LoKr / LoHa / full-delta patches (``lora``) without touching the stored weight."""
from .linear import FP8_DTYPES, Linear, is_fp8

__all__ = ["FP8_DTYPES", "Linear", "is_fp8"]
