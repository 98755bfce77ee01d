"""Checks of the sampling settings a user types (steps, cfg, shift, denoise, seed).

Every front end (CLI, demo, nodes, ``pipeline.generate``) runs these before any heavy work, so
a NaN cfg or a negative seed is refused with a readable message instead of producing a
silently wrong video.
"""
from __future__ import annotations

import math

SEED_MAX = 2**64 - 1     # seeds are 0 .. 2**64-1 (torch.Generator.manual_seed's range)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> int:
    if not (_is_number(value) and float(value).is_integer() and value >= 1):
        raise ValueError(f"{name} must be a whole number of at least 1 (got {value!r})")
    return int(value)


def check_positive_number(name: str, value) -> float:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number above 0 (got {value!r})")
    return float(value)


def check_seed(seed) -> int:
    if not (_is_number(seed) and float(seed).is_integer() and 0 <= seed <= SEED_MAX):
        raise ValueError(f"seed must be a whole number from 0 to 2**64-1 = {SEED_MAX} "
                         f"(got {seed!r})")
    return int(seed)


def check_sampling_settings(steps=None, cfg=None, shift=None, denoise=None, seed=None) -> None:
    """Raise ValueError for the first setting out of range; None means 'not given'."""
    if steps is not None:
        check_positive_int("steps", steps)
    if cfg is not None:
        check_positive_number("cfg (guidance scale)", cfg)
    if shift is not None:
        check_positive_number("shift", shift)
    if denoise is not None and not (_is_number(denoise) and 0 <= denoise <= 1):
        raise ValueError(f"denoise must be in [0, 1] (0 returns the input latent, 1 is plain "
                         f"generation; got {denoise!r})")
    if seed is not None:
        check_seed(seed)
