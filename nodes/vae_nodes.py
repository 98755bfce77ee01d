"""VAE decode / encode nodes with spatial tiling."""
from __future__ import annotations

from wan_core.errors import require_finite

from . import host
from .latents import from_comfy_latent, to_comfy_latent


def _tile_argument(tiling: str, tile_size: int):
    return {"auto": None, "off": False, "on": (tile_size, tile_size)}[tiling]


def _tiling_inputs():
    return {
        "tiling": (["auto", "off", "on"], {
            "default": "auto",
            "tooltip": "auto: tile only when the frame does not fit in free memory; off: never "
                       "tile; on: always tile with tile_size. Each tile still streams over time, "
                       "so memory does not grow with video length."}),
        "tile_size": ("INT", {"default": 256, "min": 64, "max": 2048, "step": 32,
                              "tooltip": "Tile size in pixels when tiling is 'on' (tiles "
                                         "overlap by a quarter and are blended)."}),
    }


class WanCoreVAEDecode:
    CATEGORY = "WanCore"
    DESCRIPTION = "Decodes a Wan video latent to frames, streaming over time (bounded memory)."
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The video frames (one IMAGE per frame).",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("WANCORE_VAE", {"tooltip": "The VAE that matches the model."}),
            "latent": ("LATENT", {"tooltip": "A video latent from WanCore Sampler (or native)."}),
            **_tiling_inputs(),
        }}

    def decode(self, vae, latent, tiling="auto", tile_size=256):
        from wan_core.video_io import video_to_frames

        z = from_comfy_latent(latent, vae.config.z_dim)
        require_finite(z, "WanCore VAE Decode: the input latent",
                       "the node that made it failed: check the sampler's model, LoRAs and "
                       "dtype; the VAE was not run")
        device = host.load_for_compute(vae)
        video = vae.decode(z.to(device), tile=_tile_argument(tiling, tile_size))
        require_finite(video, "WanCore VAE Decode: the decoded video")
        frames = [video_to_frames(v.cpu()) for v in video]
        import torch

        return (torch.cat(frames, dim=0),)


class WanCoreVAEEncode:
    CATEGORY = "WanCore"
    DESCRIPTION = ("Encodes frames (4n+1 of them) to a Wan video latent, e.g. for "
                   "video-to-video with the sampler's denoise below 1.")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Raw video latent (ComfyUI's convention).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("WANCORE_VAE", {"tooltip": "The VAE that matches the model."}),
            "images": ("IMAGE", {"tooltip": "Video frames; their count must be 4n+1."}),
            **_tiling_inputs(),
        }}

    def encode(self, vae, images, tiling="auto", tile_size=256):
        from wan_core.video_io import frames_to_video

        video = frames_to_video(images)[None]
        device = host.load_for_compute(vae)
        z = vae.encode(video.to(device), tile=_tile_argument(tiling, tile_size))
        return (to_comfy_latent(z.float()),)


NODE_CLASS_MAPPINGS = {"WanCoreVAEDecode": WanCoreVAEDecode, "WanCoreVAEEncode": WanCoreVAEEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"WanCoreVAEDecode": "WanCore VAE Decode",
                              "WanCoreVAEEncode": "WanCore VAE Encode"}
