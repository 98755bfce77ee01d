"""ComfyUI LATENT <-> wan_core latents.

ComfyUI's LATENT holds *raw* (unnormalised) VAE latents ``{"samples": [B, C, T, h, w]}``;
wan_core samples and decodes in the official normalised space. Converting here, with the same
statistics the VAE uses, keeps our latents interchangeable with native ComfyUI Wan latents.
"""
from __future__ import annotations

import torch


def _stats(channels: int, like: torch.Tensor):
    from wan_core.models.vae import latent_stats

    mean, std = latent_stats(channels)
    shape = (1, channels, 1, 1, 1)
    return mean.view(shape).to(like), std.view(shape).to(like)


def to_comfy_latent(z: torch.Tensor) -> dict:
    """Normalised latent ``[B, C, T, h, w]`` -> ComfyUI LATENT (raw)."""
    mean, std = _stats(z.shape[1], z)
    return {"samples": (z * std + mean).cpu()}


def from_comfy_latent(latent: dict, channels: int | None = None) -> torch.Tensor:
    """ComfyUI LATENT (raw) -> normalised latent ``[B, C, T, h, w]`` float32."""
    raw = latent["samples"].float()
    if raw.dim() != 5:
        raise ValueError(f"expected a video latent [B, C, T, h, w]; got shape {tuple(raw.shape)} "
                         "(an image latent? encode a video with WanCore VAE Encode)")
    if channels is not None and raw.shape[1] != channels:
        raise ValueError(f"the latent has {raw.shape[1]} channels but the model expects "
                         f"{channels} (a Wan 2.1 VAE makes 16, the Wan 2.2 VAE 48)")
    mean, std = _stats(raw.shape[1], raw)
    return (raw - mean) / std
