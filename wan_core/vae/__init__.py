"""Wan-VAE 2.1 and 2.2: causal chunked and spatially tiled encode/decode.

    from wan_core.vae import load_vae
    vae = load_vae("wan_2.1_vae.safetensors")
    z = vae.encode(video)                 # [B, 3, 1+4n, H, W] in [-1, 1] -> normalised latent
    video = vae.decode(z, tile=None)      # automatic tiling from the memory budget
    raw = vae.denormalize(z)              # ComfyUI LATENT space; vae.normalize(raw) goes back
"""
from .loading import diffusers_to_official, infer_config, load_vae
from .model import VAEConfig, WanVAE

__all__ = ["load_vae", "WanVAE", "VAEConfig", "infer_config", "diffusers_to_official"]
