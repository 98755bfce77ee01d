"""What is specific to Wan-VAE 2.1: flat level layout, channel-halving upsamplers, z16 stats."""
from __future__ import annotations

import torch.nn as nn

from .blocks import Resample, ResidualBlock

# Per-channel statistics of the raw latents (official Wan 2.1 values): z = (raw - mean) / std.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

PATCH_SIZE = 1


def encoder_levels(dims: list[int], num_res_blocks: int, temporal: list[bool]) -> list[nn.Module]:
    """One flat list: residual blocks of each level, then its downsampler (not after the last)."""
    layers: list[nn.Module] = []
    last = len(dims) - 2
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for j in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
        if i != last:
            layers.append(Resample(out_dim, "downsample3d" if temporal[i] else "downsample2d"))
    return layers


def decoder_levels(dims: list[int], num_res_blocks: int, temporal: list[bool]) -> list[nn.Module]:
    """One flat list: num_res_blocks + 1 residual blocks per level, then an upsampler that
    halves the channels (so every level after the first starts from half its input width)."""
    layers: list[nn.Module] = []
    last = len(dims) - 2
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            in_dim //= 2
        for j in range(num_res_blocks + 1):
            layers.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
        if i != last:
            layers.append(Resample(out_dim, "upsample3d" if temporal[i] else "upsample2d", out_dim // 2))
    return layers
