"""CLIP vision files -> :class:`~wan_core.models.clip_vision.CLIPVisionEncoder`.

Three key layouts are converted by renaming and splitting (views, no copies): Hugging Face
``CLIPVisionModel`` (ComfyUI's ``clip_vision_h.safetensors``), the official Wan
``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` and open_clip state dicts.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Optional

import torch

from ..models.clip_vision import HEADS_BY_WIDTH, CLIPVisionConfig, CLIPVisionEncoder
from ..ops import is_fp8
from . import checkpoint as ckpt
from .assign import build_from_state_dict

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
