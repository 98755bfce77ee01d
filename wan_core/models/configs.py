"""Wan DiT configurations: the variant table and detection from a state dict's shapes.

``detect_dit_config(sd)`` reads every number from tensor shapes (works on meta tensors and on
shapes-only dicts of ``torch.Size``), never from file names. The one number shapes cannot give
is the number of attention heads (``norm_q`` is over the full dim); it is resolved, in order,
from: an explicit ``num_heads`` argument, ``num_heads`` / ``num_attention_heads`` in a
config.json or the safetensors ``__metadata__`` (passed in as ``metadata``), and finally
head_dim 128 (every released Wan model) when dim is a multiple of 128.

``DEFAULTS`` holds the official sampling defaults per variant, for the sampler and the nodes.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional

HEAD_DIM = 128          # every released Wan model
IMAGE_TOKENS_I2V = 257  # CLIP ViT-H/14 tokens (2.1 I2V); FLF2V uses 2 * 257 = emb_pos length


class ConfigError(ValueError):
    """A state dict does not describe a Wan DiT this pack can build."""


@dataclass
class DiTConfig:
    """Architecture of one Wan DiT, as inferred from its weights.

    model_type: 't2v' | 'i2v' | 'flf2v' | 'ti2v' | 'vace'.
    variant: 'wan2.1-t2v-1.3B', 'wan2.1-t2v-14B' (also the shape of each Wan 2.2 T2V-A14B
    expert), 'wan2.1-i2v-14B', 'wan2.1-flf2v-14B', 'wan2.2-i2v-A14B', 'wan2.2-ti2v-5B',
    'wan2.1-vace-1.3B', 'wan2.1-vace-14B' (also each Wan 2.2 VACE-Fun A14B expert), or
    'custom' for any other size (tiny test models).
    vace_layers: VACE models: the main block after which each VACE block's hint is added
    (1.3B: 0, 2, ..., 28; 14B: 0, 5, ..., 35); () for every other model. vace_in_dim: the
    control latent's channels (96).
    """

    model_type: str = "t2v"
    variant: str = "custom"
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple = (1, 2, 2)
    text_len: int = 512
    eps: float = 1e-6
    has_image_branch: bool = False      # 2.1 I2V/FLF2V: img_emb + k_img/v_img in cross-attn
    image_dim: int = 1280               # CLIP feature width fed to img_emb
    image_pos_tokens: int = 0           # FLF2V: length of img_emb.emb_pos (514), else 0
    rope_max_len: int = 1024            # positions per axis in the RoPE tables
    vace_layers: tuple = ()             # VACE: main block index of each VACE block's hint
    vace_in_dim: int = 0                # VACE: control latent channels (96)

    @property
    def is_vace(self) -> bool:
        return bool(self.vace_layers)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def per_token_time(self) -> bool:
        """True for TI2V-5B, which is trained with per-token timesteps [B, L]."""
        return self.model_type == "ti2v"

    @property
    def latent_channels(self) -> int:
        return self.out_dim

    def num_params(self) -> int:
        """Parameter count implied by this config (for logs and checks)."""
        d, f = self.dim, self.ffn_dim
        p = math.prod(self.patch_size)
        n = self.in_dim * p * d + d                                   # patch embedding
        n += self.text_dim * d + d + d * d + d                        # text embedding
        n += self.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d    # time
        block = 8 * (d * d + d) + 4 * d + 2 * d                       # attn q,k,v,o x2 + norms
        block += d * f + f + f * d + d + 6 * d
        if self.has_image_branch:
            block += 2 * (d * d + d) + d
        n += self.num_layers * block
        n += 2 * d + d * self.out_dim * p + self.out_dim * p          # head
        if self.has_image_branch:
            c = self.image_dim
            n += 2 * c + c * c + c + c * d + d + 2 * d + self.image_pos_tokens * c
        if self.vace_layers:
            n += self.vace_in_dim * p * d + d                         # VACE patch embedding
            n += len(self.vace_layers) * (block + 2 * (d * d + d)) - (d * d + d)
        return n


_PAIR_FIELDS = ("model_type", "in_dim", "out_dim", "dim", "ffn_dim", "num_layers", "num_heads",
                "text_dim", "has_image_branch")


def describe(config: DiTConfig) -> str:
    """One short phrase for messages: ``wan2.1-t2v-14B (t2v, 16 -> 16 channels, dim 5120)``."""
    return (f"{config.variant} ({config.model_type}, {config.in_dim} -> {config.out_dim} "
            f"channels, dim {config.dim}, {config.num_layers} layers)")


def expert_pair_mismatch(high: DiTConfig, low: DiTConfig) -> Optional[str]:
    """Why two DiTs cannot be the high- and low-noise experts of one Wan 2.2 pair (they must
    have the same architecture), or None when they fit."""
    differ = [name for name in _PAIR_FIELDS if getattr(high, name) != getattr(low, name)]
    if not differ:
        return None
    return (f"the high-noise expert is {describe(high)} but the low-noise expert is "
            f"{describe(low)}; the two experts of a Wan 2.2 pair must be the same model type "
            f"and size (they differ in {', '.join(differ)})")


@dataclass(frozen=True)
class VariantDefaults:
    """Official sampling defaults (Wan 2.1 / 2.2 code and READMEs). size is (width, height)."""

    steps: int
    shift: float
    guide: float
    frames: int
    fps: int
    size: tuple
    guide_low: Optional[float] = None    # MoE: guidance of the low-noise expert
    boundary: Optional[float] = None     # MoE: high-noise expert while t >= boundary * 1000
    shift_480p: Optional[float] = None   # 2.1 I2V: the 480P checkpoint uses a smaller shift
    vae: str = "wan2.1"


DEFAULTS: dict[str, VariantDefaults] = {
    "wan2.1-t2v-1.3B": VariantDefaults(50, 5.0, 5.0, 81, 16, (832, 480)),
    "wan2.1-t2v-14B": VariantDefaults(50, 5.0, 5.0, 81, 16, (1280, 720)),
    "wan2.1-i2v-14B": VariantDefaults(40, 5.0, 5.0, 81, 16, (1280, 720), shift_480p=3.0),
    "wan2.1-flf2v-14B": VariantDefaults(50, 16.0, 5.0, 81, 16, (1280, 720)),
    "wan2.2-t2v-A14B": VariantDefaults(40, 12.0, 4.0, 81, 16, (1280, 720), guide_low=3.0,
                                       boundary=0.875),
    "wan2.2-i2v-A14B": VariantDefaults(40, 5.0, 3.5, 81, 16, (1280, 720), guide_low=3.5,
                                       boundary=0.900),
    "wan2.2-ti2v-5B": VariantDefaults(50, 5.0, 5.0, 121, 24, (1280, 704), vae="wan2.2"),
    "wan2.1-vace-1.3B": VariantDefaults(50, 16.0, 5.0, 81, 16, (832, 480)),
    "wan2.1-vace-14B": VariantDefaults(50, 16.0, 5.0, 81, 16, (1280, 720)),
    "custom": VariantDefaults(50, 5.0, 5.0, 81, 16, (832, 480)),
}

# (model_type, dim, ffn_dim, num_layers, in_dim, out_dim) -> variant name
_KNOWN = {
    ("t2v", 1536, 8960, 30, 16, 16): "wan2.1-t2v-1.3B",
    ("t2v", 5120, 13824, 40, 16, 16): "wan2.1-t2v-14B",
    ("i2v", 5120, 13824, 40, 36, 16): "wan2.1-i2v-14B",
    ("flf2v", 5120, 13824, 40, 36, 16): "wan2.1-flf2v-14B",
    ("ti2v", 3072, 14336, 30, 48, 48): "wan2.2-ti2v-5B",
    ("vace", 1536, 8960, 30, 16, 16): "wan2.1-vace-1.3B",
    ("vace", 5120, 13824, 40, 16, 16): "wan2.1-vace-14B",
}
_KNOWN_NO_CLIP_I2V = {(5120, 13824, 40, 36, 16): "wan2.2-i2v-A14B"}

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_VACE_BLOCK_RE = re.compile(r"^vace_blocks\.(\d+)\.")


def vace_plan(num_layers: int, vace_blocks: int) -> tuple:
    """The main blocks after which the hints of ``vace_blocks`` VACE blocks are added, evenly
    spaced from block 0 as in every released VACE model: 30 layers / 15 VACE blocks -> 0, 2,
    ..., 28; 40 / 8 -> 0, 5, ..., 35."""
    if not 0 < vace_blocks <= num_layers:
        raise ConfigError(f"{vace_blocks} VACE blocks do not fit a model of {num_layers} "
                          "blocks")
    step = num_layers // vace_blocks
    return tuple(i * step for i in range(vace_blocks))


def _shape(value) -> tuple:
    """Shape of a tensor, meta tensor, torch.Size or plain tuple/list."""
    shape = getattr(value, "shape", value)
    return tuple(int(s) for s in shape)


def heads_from_metadata(metadata: Mapping | None) -> Optional[int]:
    """``num_heads`` (official config.json / our safetensors metadata) or
    ``num_attention_heads`` (diffusers config.json), if present."""
    if not metadata:
        return None
    for key in ("num_heads", "num_attention_heads"):
        if key in metadata and metadata[key] not in (None, ""):
            return int(metadata[key])
    return None


def detect_dit_config(sd: Mapping, num_heads: Optional[int] = None,
                      metadata: Mapping | None = None) -> DiTConfig:
    """Infer a ``DiTConfig`` from an official-layout state dict (bare keys).

    ``sd`` values may be tensors (any device, including meta) or shapes. See the module
    docstring for how ``num_heads`` is resolved.
    """
    def need(key):
        if key not in sd:
            raise ConfigError(f"missing tensor '{key}'; this is not a complete Wan diffusion "
                              "model (or its layout is not recognised)")
        return _shape(sd[key])

    patch_w = need("patch_embedding.weight")            # [dim, in_dim, pt, ph, pw]
    if len(patch_w) != 5:
        raise ConfigError(f"patch_embedding.weight has shape {patch_w}, expected 5 dims")
    dim, in_dim, patch = patch_w[0], patch_w[1], tuple(patch_w[2:])
    layers = {int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))}
    if not layers:
        raise ConfigError("no transformer blocks (blocks.N.*) found")
    num_layers = max(layers) + 1
    ffn_dim = need("blocks.0.ffn.0.weight")[0]
    text_dim = need("text_embedding.0.weight")[1]
    freq_dim = need("time_embedding.0.weight")[1]
    out_dim = need("head.head.weight")[0] // math.prod(patch)

    has_image = "img_emb.proj.0.weight" in sd or "blocks.0.cross_attn.k_img.weight" in sd
    image_dim = _shape(sd["img_emb.proj.0.weight"])[0] if "img_emb.proj.0.weight" in sd else 1280
    pos_tokens = _shape(sd["img_emb.emb_pos"])[1] if "img_emb.emb_pos" in sd else 0

    vace_blocks = {int(m.group(1)) for k in sd if (m := _VACE_BLOCK_RE.match(k))}
    vace_layers, vace_in_dim = (), 0
    if vace_blocks or "vace_patch_embedding.weight" in sd:
        vace_w = need("vace_patch_embedding.weight")     # [dim, 96, pt, ph, pw]
        if not vace_blocks or vace_w[0] != dim or tuple(vace_w[2:]) != patch:
            raise ConfigError(f"the VACE weights do not fit this model: vace_patch_embedding "
                              f"{list(vace_w)} for a model of dim {dim}"
                              + ("" if vace_blocks else " and no vace_blocks"))
        vace_in_dim = vace_w[1]
        count = max(vace_blocks) + 1
        given = (metadata or {}).get("vace_layers")        # a diffusers config.json lists it
        if isinstance(given, str):
            given = json.loads(given)
        vace_layers = tuple(sorted(int(i) for i in given)) if given else \
            vace_plan(num_layers, count)
        if len(vace_layers) != count or vace_layers[0] != 0 or max(vace_layers) >= num_layers \
                or len(set(vace_layers)) != count:
            raise ConfigError(f"vace_layers {list(vace_layers)} do not fit {count} VACE blocks "
                              f"and {num_layers} main blocks (distinct indices, the first 0)")

    if vace_layers:
        model_type = "vace"
    elif has_image:
        model_type = "flf2v" if pos_tokens else "i2v"
    elif out_dim == 48 and in_dim == 48:
        model_type = "ti2v"
    elif in_dim > out_dim:
        model_type = "i2v"          # 2.2 I2V-A14B: mask + image latent on channels, no CLIP
    else:
        model_type = "t2v"

    heads = num_heads or heads_from_metadata(metadata)
    if heads is None:
        if dim % HEAD_DIM:
            raise ConfigError(
                f"cannot tell the number of attention heads of a dim-{dim} model (dim is not a "
                f"multiple of {HEAD_DIM}); pass num_heads=... or store 'num_heads' in the "
                "safetensors metadata / a config.json next to the file")
        heads = dim // HEAD_DIM
    if dim % heads or (dim // heads) % 2:
        raise ConfigError(f"dim {dim} is not divisible into {heads} heads of even size")

    key = (model_type, dim, ffn_dim, num_layers, in_dim, out_dim)
    variant = _KNOWN.get(key, "custom")
    if model_type == "i2v" and not has_image:
        variant = _KNOWN_NO_CLIP_I2V.get(key[1:], "custom")

    return DiTConfig(model_type=model_type, variant=variant, dim=dim, ffn_dim=ffn_dim,
                     num_heads=heads, num_layers=num_layers, in_dim=in_dim, out_dim=out_dim,
                     text_dim=text_dim, freq_dim=freq_dim, patch_size=patch,
                     has_image_branch=has_image, image_dim=image_dim,
                     image_pos_tokens=pos_tokens, vace_layers=vace_layers,
                     vace_in_dim=vace_in_dim)
