"""Wan-VAE 2.1 and 2.2: causal chunked and spatially tiled encode/decode.

    from wan_core import load_vae
    vae = load_vae("wan_2.1_vae.safetensors")
    z = vae.encode(video)                 # [B, 3, 1+4n, H, W] in [-1, 1] -> normalised latent
    video = vae.decode(z, tile=None)      # automatic tiling from the memory budget
    raw = vae.denormalize(z)              # ComfyUI LATENT space; vae.normalize(raw) goes back
"""
from .model import VAEConfig, WanVAE

__all__ = ["WanVAE", "VAEConfig"]


def latent_stats(z_dim: int):
    """``(mean, std)`` float32 ``[z_dim]`` of the official latent normalisation for a latent
    with ``z_dim`` channels (16: Wan 2.1 VAE, 48: Wan 2.2 VAE; any other: identity), the same
    statistics a loaded VAE of that size uses. Lets the sampler hand out raw (ComfyUI) latents
    without a VAE."""
    from .model import VERSIONS, _latent_stats

    return _latent_stats(VERSIONS["2.2" if z_dim == 48 else "2.1"], z_dim)


__all__.append("latent_stats")
