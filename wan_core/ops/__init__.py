"""Layers whose weights are stored small or patched: they compute with a weight that is
rebuilt per call in the compute dtype (fp8 / scaled fp8 today)."""
from .linear import FP8_DTYPES, Linear, is_fp8

__all__ = ["FP8_DTYPES", "Linear", "is_fp8"]
