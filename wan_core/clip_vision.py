"""CLIP ViT image encoder (ViT-H/14 for Wan 2.1 I2V / FLF2V): penultimate-layer hidden states.

Wan feeds the DiT the hidden states after the second-to-last transformer block (all 257 tokens:
class token + 16x16 patches, no final LayerNorm, no projection). So the last block, the final
norm and the projection head are never computed, and this module does not even load them.

Weights load from three key layouts, converted by renaming and splitting (views, no copies):
  * Hugging Face ``CLIPVisionModel`` (ComfyUI's ``clip_vision_h.safetensors``):
    ``vision_model.embeddings.*``, ``vision_model.encoder.layers.N.self_attn.q_proj``, ...
  * the official Wan ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``:
    ``visual.patch_embedding``, ``visual.transformer.N.attn.to_qkv``, ``visual.transformer.N.mlp.0``
  * open_clip: ``visual.conv1``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ...

Preprocessing as the official Wan code: bicubic resize to the model's image size (no antialias,
no crop), then the OpenAI CLIP mean/std.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from .ops import Linear, build_from_state_dict, is_fp8

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
# Loading
# --------------------------------------------------------------------------------------------

_HF_RENAMES = (
    (r"^embeddings\.class_embedding$", "class_embedding"),
    (r"^embeddings\.patch_embedding\.", "patch_embedding."),
    (r"^embeddings\.position_embedding\.weight$", "position_embedding"),
    (r"^pre_layrnorm\.", "pre_norm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.out."),
    (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.\2."),
)
_WAN_RENAMES = (
    (r"^cls_embedding$", "class_embedding"),
    (r"^pos_embedding$", "position_embedding"),
    (r"^transformer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^transformer\.(\d+)\.attn\.to_qkv\.", r"blocks.\1.attn.qkv."),
    (r"^transformer\.(\d+)\.attn\.proj\.", r"blocks.\1.attn.out."),
    (r"^transformer\.(\d+)\.mlp\.0\.", r"blocks.\1.fc1."),
    (r"^transformer\.(\d+)\.mlp\.2\.", r"blocks.\1.fc2."),
)
_OPEN_CLIP_RENAMES = (
    (r"^conv1\.", "patch_embedding."),
    (r"^positional_embedding$", "position_embedding"),
    (r"^ln_pre\.", "pre_norm."),
    (r"^transformer\.resblocks\.(\d+)\.ln_([12])\.", r"blocks.\1.norm\2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.out."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.fc2."),
)
_KEEP = re.compile(r"^(class_embedding|position_embedding|patch_embedding\.|pre_norm\.|blocks\.)")


def to_canonical_layout(sd: Mapping) -> dict:
    """Rename any supported CLIP vision layout to this module's names; drop the text tower,
    the final norm and the projection. Fused qkv tensors are split into views."""
    sd = dict(sd)
    if any(k.startswith("visual.") for k in sd):  # a full CLIP file: keep the image tower
        sd = ckpt.select_prefix(sd, "visual.")
    else:
        sd = ckpt.strip_prefix(sd, ("clip_vision.", "model.", "image_encoder."))
        sd = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v
              for k, v in sd.items()}
    if "embeddings.patch_embedding.weight" in sd:
        renames = _HF_RENAMES
    elif "conv1.weight" in sd:
        renames = _OPEN_CLIP_RENAMES
    else:
        renames = _WAN_RENAMES
    out = {}
    for key, value in sd.items():
        for pattern, repl in renames:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        if key.endswith((".qkv.weight", ".qkv.bias")):
            prefix, kind = key.rsplit(".qkv.", 1)
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{kind}"] = part
        elif _KEEP.match(key):
            out[key] = value
    if "class_embedding" in out:
        out["class_embedding"] = out["class_embedding"].reshape(-1)
    if "position_embedding" in out:
        pos = out["position_embedding"]
        out["position_embedding"] = pos.reshape(-1, pos.shape[-1])
    return out


def config_from_state_dict(sd: Mapping, num_heads: Optional[int] = None,
                           activation: str = "gelu") -> CLIPVisionConfig:
    """Dimensions from a canonical-layout state dict. Heads cannot be read from the weights:
    known CLIP widths use their published head counts, others width / 64 (or ``num_heads``)."""
    try:
        patch = sd["patch_embedding.weight"]
        tokens = sd["position_embedding"].shape[0]
        mlp_dim = sd["blocks.0.fc1.weight"].shape[0]
    except KeyError as e:
        raise ckpt.CheckpointError(f"CLIP vision weights are incomplete: missing {e.args[0]}") from None
    width, patch_size = patch.shape[0], patch.shape[-1]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise ckpt.CheckpointError(f"CLIP position table has {tokens} entries; expected a square "
                                   "patch grid plus one class token")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    heads = num_heads or HEADS_BY_WIDTH.get(width) or max(1, width // 64)
    if width % heads:
        raise ckpt.CheckpointError(f"CLIP width {width} is not divisible by {heads} heads")
    if activation not in ("gelu", "quick_gelu"):
        raise ValueError(f"activation must be 'gelu' or 'quick_gelu', got {activation!r}")
    return CLIPVisionConfig(width=width, num_layers=max(layers) + 1, num_heads=heads,
                            mlp_dim=mlp_dim, patch_size=patch_size, image_size=grid * patch_size,
                            patch_bias="patch_embedding.bias" in sd, activation=activation)


def load_clip_vision(path_or_state_dict, dtype: Optional[torch.dtype] = None, device="cpu",
                     num_heads: Optional[int] = None, activation: str = "gelu") -> CLIPVisionEncoder:
    """Load a CLIP vision tower (ComfyUI ``clip_vision_h.safetensors``, the official Wan
    ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, or an open_clip state dict).

    ``dtype``: compute dtype (default: the file's, bf16 for fp8 files). ``num_heads`` and
    ``activation`` override what cannot be read from the weights (defaults fit ViT-H/14).
    Returns a :class:`CLIPVisionEncoder`; ``encode(images)`` -> [N, 257, 1280].
    """
    source = path_or_state_dict
    sd = source if isinstance(source, Mapping) else ckpt.load_state_dict(source)
    ckpt.require_kind(sd, "clip_vision", source)
    sd = to_canonical_layout(sd)
    cfg = config_from_state_dict(sd, num_heads, activation)
    last = f"blocks.{cfg.num_layers - 1}."
    sd = {k: v for k, v in sd.items() if not k.startswith(last)}  # never used: penultimate output
    if dtype is None:
        stored = sd["patch_embedding.weight"].dtype
        dtype = torch.bfloat16 if is_fp8(stored) else stored
    model = build_from_state_dict(lambda: CLIPVisionEncoder(cfg), sd, dtype=dtype, device=device,
                                  source=source, what=f"the CLIP vision encoder ({cfg})")
    return model.eval().requires_grad_(False)
