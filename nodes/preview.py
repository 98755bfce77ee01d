"""A cheap live preview of the sampler's current clean-latent prediction.

Latent channels are projected to RGB with a fixed linear map (the first three directions of a
deterministic orthonormal basis), normalised per image. It shows layout and motion, not true
colours; it costs a few hundred microseconds per step.
"""
from __future__ import annotations

import functools

import torch

PREVIEW_SIZE = 512


@functools.lru_cache(maxsize=4)
def _projection(channels: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(channels)
    basis, _ = torch.linalg.qr(torch.randn(channels, max(3, channels), generator=generator))
    return basis[:, :3].contiguous()  # [C, 3]


def latent_to_rgb(x0: torch.Tensor) -> torch.Tensor:
    """``[B, C, F, h, w]`` latent -> ``[h, F'*w, 3]`` uint8: up to 4 frames side by side."""
    frames = x0[0].float().cpu()
    picks = torch.linspace(0, frames.shape[1] - 1, min(4, frames.shape[1])).round().long()
    rgb = torch.einsum("cfhw,cd->fhwd", frames[:, picks], _projection(frames.shape[0]))
    lo = rgb.amin(dim=(0, 1, 2), keepdim=True)
    hi = rgb.amax(dim=(0, 1, 2), keepdim=True)
    rgb = (rgb - lo) / (hi - lo).clamp_min(1e-6)
    return (torch.cat(list(rgb), dim=1) * 255).round().to(torch.uint8)


def latent_preview(x0: torch.Tensor, channels: int):
    """The ``("JPEG", PIL.Image, max_size)`` tuple ComfyUI's progress bar shows."""
    from PIL import Image

    image = Image.fromarray(latent_to_rgb(x0).numpy())
    return ("JPEG", image, PREVIEW_SIZE)
