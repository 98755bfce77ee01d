"""What is specific to Wan-VAE 2.2: 2x2 pixel patchify, nested levels with parameter-free
resampling shortcuts, channel-keeping upsamplers, z48 stats."""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import DownResidualBlock, UpResidualBlock

# Per-channel statistics of the raw latents (official Wan 2.2 values): z = (raw - mean) / std.
LATENT_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
               -0.1382, 0.0542, 0.2813, 0.0891, 0.157, -0.0098, 0.0375, -0.1825,
               -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
               -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123,
               -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.052, 0.3748,
               0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
LATENT_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013,
              0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
              0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
              0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
              0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
              0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)

PATCH_SIZE = 2


def encoder_levels(dims: list[int], num_res_blocks: int, temporal: list[bool]) -> list[nn.Module]:
    last = len(dims) - 2
    return [DownResidualBlock(in_dim, out_dim, num_res_blocks,
                              temporal=i != last and temporal[i], down=i != last)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))]


def decoder_levels(dims: list[int], num_res_blocks: int, temporal: list[bool]) -> list[nn.Module]:
    last = len(dims) - 2
    return [UpResidualBlock(in_dim, out_dim, num_res_blocks + 1,
                            temporal=i != last and temporal[i], up=i != last)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H*p, W*p] -> [B, C*p*p, T, H, W]; channel order (c, pw, ph)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, C*p*p, T, H, W] -> [B, C, T, H*p, W*p]."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    c = cpp // (p * p)
    x = x.view(b, c, p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)  # b c t h ph w pw
    return x.reshape(b, c, t, h * p, w * p)
