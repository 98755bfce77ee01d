"""CLIP ViT image encoder (ViT-H/14 for Wan 2.1 I2V / FLF2V): penultimate-layer hidden states.

Wan feeds the DiT the hidden states after the second-to-last transformer block (all 257 tokens:
class token + 16x16 patches, no final LayerNorm, no projection). So the last block, the final
norm and the projection head are never computed, and this module does not even load them.

Weights are loaded by ``wan_core.loading.clip_vision`` from the Hugging Face, official Wan and
open_clip key layouts.

Preprocessing as the official Wan code: bicubic resize to the model's image size (no antialias,
no crop), then the OpenAI CLIP mean/std.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import Linear

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Known CLIP ViT widths -> heads (ViT-H/14 uses 16 heads of 80 channels, not 1280/64).
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}


@dataclass
class CLIPVisionConfig:
    width: int           # 1280 for ViT-H/14
    num_layers: int      # transformer blocks in the file (32); the last one is not used
    num_heads: int
    mlp_dim: int         # 5120
    patch_size: int      # 14
    image_size: int      # 224
    patch_bias: bool = False
    activation: str = "gelu"  # exact GELU (ViT-H/14); "quick_gelu" for OpenAI's own models
    eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the storage dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = (Linear(width, width) for _ in range(3))
        self.out = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, width] -> [B, L, width]; full (unmasked) attention."""
        b, n = x.shape[0], self.num_heads
        q, k, v = (proj(x).view(b, -1, n, proj.out_features // n).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out(out.transpose(1, 2).reshape(b, -1, self.out.in_features))


class Block(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = SelfAttention(cfg.width, cfg.num_heads)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.eps)
        self.fc1 = Linear(cfg.width, cfg.mlp_dim)
        self.act = QuickGELU() if cfg.activation == "quick_gelu" else nn.GELU()
        self.fc2 = Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class CLIPVisionEncoder(nn.Module):
    """Pixels [B, 3, S, S] (already normalised) -> penultimate hidden states [B, T, width],
    T = (S / patch)^2 + 1 (257 for ViT-H/14 at 224 px). Use :meth:`encode` for raw images."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size,
                                         bias=cfg.patch_bias)
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.position_embedding = nn.Parameter(torch.empty(cfg.num_tokens, cfg.width))
        self.pre_norm = LayerNorm(cfg.width, eps=cfg.eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers - 1))

    @property
    def device(self) -> torch.device:
        return self.class_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.class_embedding.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, patches, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        return x

    def preprocess(self, images: torch.Tensor, value_range=(0.0, 1.0)) -> torch.Tensor:
        """Images -> normalised pixels [B, 3, S, S] in float32.

        ``images``: ComfyUI IMAGE [N, H, W, C] or channels-first [N, C, H, W] (C = 3, or 4 with
        alpha, which is dropped), values in ``value_range`` ((0, 1) for ComfyUI, (-1, 1) for
        Wan's video tensors). Resized bicubically (no antialias, no crop) to S x S.
        """
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"expected images [N, H, W, 3] or [N, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-1] in (3, 4) and images.shape[1] not in (3, 4):
            images = images.permute(0, 3, 1, 2)
        elif images.shape[1] not in (3, 4):
            raise ValueError(f"images must have 3 colour channels, got shape {tuple(images.shape)}")
        x = images[:, :3].to(device=self.device, dtype=torch.float32)
        lo, hi = value_range
        if (lo, hi) != (0.0, 1.0):
            x = (x - lo) / (hi - lo)
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, images: torch.Tensor, value_range=(0.0, 1.0), device=None) -> torch.Tensor:
        """Images (see :meth:`preprocess`) -> penultimate hidden states [N, 257, 1280] for
        ViT-H/14, on ``device`` (default: the encoder's device)."""
        out = self(self.preprocess(images, value_range))
        return out if device is None else out.to(device)


# --------------------------------------------------------------------------------------------
