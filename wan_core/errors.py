"""Errors every layer of wan_core raises; the lowest module, imported by all others."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says why and what to do instead."""


class NonFiniteError(ValueError):
    """A latent or video came out with NaN / infinite values: never written as a result."""


MODEL_CAUSES = "a damaged weight file, a diverged LoRA, or fp16 overflow: try bf16"


def require_finite(tensor, what: str, causes: str = MODEL_CAUSES) -> None:
    """Raise NonFiniteError when ``tensor`` holds a NaN or an infinity; ``what`` names it and
    ``causes`` says where such values come from."""
    if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
        raise NonFiniteError(
            f"{what} contains NaN or infinite values, so it is not a valid result ({causes})")
