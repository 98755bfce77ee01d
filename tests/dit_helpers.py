"""Tiny random Wan DiT checkpoints in the official layout, for the DiT tests."""
from __future__ import annotations

import torch

from wan_core.models.configs import DiTConfig
from wan_core.models.dit import WanDiT

TINY = dict(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=64, freq_dim=32)


def tiny_config(model_type: str = "t2v", **overrides) -> DiTConfig:
    """A small config of the given kind; I2V/FLF2V take 36 channels, TI2V 48 in and out."""
    kw = dict(TINY)
    if model_type in ("i2v", "flf2v"):
        kw.update(in_dim=36, out_dim=16, has_image_branch=True, image_dim=48,
                  image_pos_tokens=10 if model_type == "flf2v" else 0)
    elif model_type == "ti2v":
        kw.update(in_dim=48, out_dim=48)
    kw.update(overrides)
    return DiTConfig(model_type=model_type, **kw)


def random_state_dict(cfg: DiTConfig, seed: int = 0, scale: float = 0.1) -> dict:
    """Random fp32 weights with official key names (norm scales near 1, others ~N(0, scale))."""
    gen = torch.Generator().manual_seed(seed)
    model = WanDiT(cfg)
    sd = {}
    for key, p in model.state_dict().items():
        noise = torch.randn(p.shape, generator=gen)
        is_norm_scale = ("norm" in key or key.startswith("img_emb.proj.0") or
                         key.startswith("img_emb.proj.4")) and key.endswith(".weight")
        sd[key] = 1.0 + 0.1 * noise if is_norm_scale else scale * noise
    return sd


def random_inputs(cfg: DiTConfig, batch: int = 2, frames: int = 3, height: int = 8,
                  width: int = 12, text_tokens=(20, 7), seed: int = 1) -> dict:
    """x, t, context (list of [L_i, text_dim]) and, for image models, y / clip_fea."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.out_dim, frames, height, width, generator=gen)
    inputs = dict(
        x=x,
        t=torch.tensor([900.0, 250.0, 500.0, 10.0][:batch]),
        context=[torch.randn(text_tokens[i % len(text_tokens)], cfg.text_dim, generator=gen)
                 for i in range(batch)],
    )
    if cfg.in_dim > x.shape[1]:
        inputs["y"] = torch.randn(batch, cfg.in_dim - x.shape[1], frames, height, width,
                                  generator=gen)
    if cfg.has_image_branch:
        n = cfg.image_pos_tokens or 5
        inputs["clip_fea"] = torch.randn(batch, n, cfg.image_dim, generator=gen)
    return inputs
