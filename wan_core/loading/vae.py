"""Loading Wan VAE weights: layout detection, diffusers key conversion, config inference."""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from ..models.vae import VAEConfig, WanVAE
from ..ops import is_fp8
from .assign import build_from_state_dict
from .checkpoint import CheckpointError, load_state_dict, require_kind, source_name, strip_prefix

# Prefixes some repackaged files put in front of the official keys.
VAE_PREFIXES = ("first_stage_model.", "vae.", "model.")

# diffusers ResNet sub-layer -> official index inside ``residual`` (or the shortcut).
_DIFFUSERS_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
                     "conv2": "residual.6", "conv_shortcut": "shortcut"}


def load_vae(path_or_state_dict, dtype: torch.dtype | None = None, device="cpu") -> WanVAE:
    """Load a Wan-VAE 2.1 or 2.2 from a file or state dict; version and dimensions are
    inferred from the weights.

    Accepts the official ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` pickles (read with
    ``weights_only=True``), ComfyUI's ``wan_2.1_vae`` / ``wan2.2_vae`` safetensors (official
    keys, optionally prefixed) and diffusers ``AutoencoderKLWan`` weights. ``dtype`` defaults to
    the file's dtype (fp8 files are widened to bf16).
    """
    sd = load_state_dict(path_or_state_dict)
    sd = strip_prefix(sd, VAE_PREFIXES)
    require_kind(sd, "vae", path_or_state_dict)
    if is_diffusers_layout(sd):
        sd = diffusers_to_official(sd)
    cfg = infer_config(sd, path_or_state_dict)
    if dtype is None:
        dtype = sd["conv2.weight"].dtype
        if is_fp8(dtype) or not dtype.is_floating_point:
            dtype = torch.bfloat16
    model = build_from_state_dict(lambda: WanVAE(cfg), sd, dtype=dtype, device=device,
                                  source=path_or_state_dict, what=f"a Wan {cfg.version} VAE")
    model.latent_mean = model.latent_mean.to(device)
    model.latent_inv_std = model.latent_inv_std.to(device)
    return model.to_channels_last().eval().requires_grad_(False)


# -------------------------------------------------------------------------------- layouts

def is_diffusers_layout(sd) -> bool:
    return "post_quant_conv.weight" in sd or "decoder.conv_in.weight" in sd


def diffusers_to_official(sd) -> dict:
    """Rename diffusers ``AutoencoderKLWan`` keys (2.1 or 2.2) to the official layout."""
    residual = any(k.startswith("encoder.down_blocks.") and ".resnets." in k for k in sd)
    resnets = defaultdict(int)      # (encoder|decoder, block) -> number of resnets
    has_resampler = set()
    for k in sd:
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsampler|upsamplers?)\.", k)
        if m:
            key = (m.group(1), int(m.group(3)))
            if m.group(5) is not None:
                resnets[key] = max(resnets[key], int(m.group(5)) + 1)
            else:
                has_resampler.add(key)
    flat_offset = {}
    offset = 0
    for block in sorted(i for part, i in resnets if part == "decoder"):
        flat_offset[block] = offset
        offset += resnets[("decoder", block)] + (("decoder", block) in has_resampler)

    out = {}
    for key, value in sd.items():
        out[_official_key(key, residual, resnets, flat_offset)] = value
    return out


def _resnet_key(rest: str) -> str:
    first, _, tail = rest.partition(".")
    return f"{_DIFFUSERS_RESNET.get(first, first)}.{tail}"


def _official_key(key: str, residual: bool, resnets, flat_offset) -> str:
    top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for src, dst in top.items():
        if key.startswith(src):
            return dst + key[len(src):]
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key
    simple = {"conv_in.": "conv1.", "norm_out.": "head.0.", "conv_out.": "head.2."}
    for src, dst in simple.items():
        if rest.startswith(src):
            return f"{part}.{dst}{rest[len(src):]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", rest)
    if m:
        if m.group(1) == "attentions":
            return f"{part}.middle.1.{m.group(3)}"
        return f"{part}.middle.{2 * int(m.group(2))}.{_resnet_key(m.group(3))}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(.*)", rest)
    if not m:
        return key
    block, tail = int(m.group(2)), m.group(3)
    name = "downsamples" if part == "encoder" else "upsamples"
    r = re.match(r"resnets\.(\d+)\.(.*)", tail)
    s = re.match(r"(downsampler|upsampler|upsamplers\.0)\.(.*)", tail)
    n_res = resnets[(part, block)]
    if part == "encoder" and not residual:       # 2.1 encoder: already flat
        return f"encoder.downsamples.{block}.{tail if tail.startswith(('resample', 'time_conv')) else _resnet_key(tail)}"
    if residual:                                 # 2.2: nested levels
        if r:
            return f"{part}.{name}.{block}.{name}.{r.group(1)}.{_resnet_key(r.group(2))}"
        if s:
            return f"{part}.{name}.{block}.{name}.{n_res}.{s.group(2)}"
        return key
    base = flat_offset[block]                    # 2.1 decoder: flatten
    if r:
        return f"decoder.upsamples.{base + int(r.group(1))}.{_resnet_key(r.group(2))}"
    if s:
        return f"decoder.upsamples.{base + n_res}.{s.group(2)}"
    return key


# -------------------------------------------------------------------------------- config

def infer_config(sd, source=None) -> VAEConfig:
    """Read every dimension of a Wan VAE from its official-layout state dict."""
    name = source_name(source)
    needed = ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight", "decoder.head.2.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(f"{name} is a VAE but not a Wan 2.1/2.2 video VAE (missing {missing[0]}); "
                              "use a Wan VAE such as wan_2.1_vae.safetensors or wan2.2_vae.safetensors")
    if any(k.startswith("encoder.downsamples.") and ".to_qkv." in k for k in sd):
        raise CheckpointError(f"{name}: Wan VAEs with attention inside the resolution levels are not supported")
    nested = any(re.match(r"encoder\.downsamples\.\d+\.downsamples\.", k) for k in sd)
    version = "2.2" if nested else "2.1"
    dim = sd["encoder.conv1.weight"].shape[0]
    z_dim = sd["conv2.weight"].shape[0]

    levels = _encoder_levels(sd, nested)                # [(out_channels list, temporal flag)]
    dim_mult = tuple(chans[0] // dim for chans, _ in levels)
    num_res_blocks = len(levels[0][0])
    temporal = tuple(t for _, t in levels[:-1])
    decoder_dim = sd["decoder.conv1.weight"].shape[0] // dim_mult[-1]
    cfg = VAEConfig(version=version, dim=dim, decoder_dim=decoder_dim, z_dim=z_dim,
                    dim_mult=dim_mult, num_res_blocks=num_res_blocks, temporal_downsample=temporal)
    in_ch = sd["encoder.conv1.weight"].shape[1]
    out_ch = sd["decoder.head.2.weight"].shape[0]
    if in_ch != cfg.image_channels or out_ch != cfg.image_channels:
        raise CheckpointError(f"{name}: unexpected Wan {version} VAE image channels "
                              f"(encoder in {in_ch}, decoder out {out_ch}, expected {cfg.image_channels})")
    return cfg


def _encoder_levels(sd, nested: bool) -> list:
    """Group the encoder's residual blocks into resolution levels, in order."""
    levels, current = [], []
    if nested:
        blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
        for i in blocks:
            prefix = f"encoder.downsamples.{i}.downsamples."
            chans, temporal = _level_layers(sd, prefix)
            levels.append((chans, temporal))
        return levels
    prefix = "encoder.downsamples."
    indices = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    for i in indices:
        p = f"{prefix}{i}."
        if f"{p}resample.1.weight" in sd:
            levels.append((current, f"{p}time_conv.weight" in sd))
            current = []
        elif f"{p}residual.2.weight" in sd:
            current.append(sd[f"{p}residual.2.weight"].shape[0])
    levels.append((current, False))
    return levels


def _level_layers(sd, prefix: str):
    indices = sorted({int(m.group(1)) for k in sd
                      if k.startswith(prefix) and (m := re.match(r"(\d+)\.", k[len(prefix):]))})
    chans, temporal = [], False
    for j in indices:
        p = f"{prefix}{j}."
        if f"{p}residual.2.weight" in sd:
            chans.append(sd[f"{p}residual.2.weight"].shape[0])
        elif f"{p}time_conv.weight" in sd:
            temporal = True
    return chans, temporal
