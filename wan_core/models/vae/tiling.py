"""Spatial tiling for the Wan VAEs: overlapping tiles, each streamed over time, feathered seams.

A tile is a rectangle of the *latent* grid; in pixels it is that rectangle times the VAE's
spatial stride. Each tile is encoded/decoded on its own (its own causal stream over the whole
clip), multiplied by a weight that is 1 inside the tile and ramps linearly to ~0 across the
overlap with a neighbour, accumulated, and finally divided by the summed weights. Tiles see
zero padding at their borders instead of the neighbouring pixels, so tiled output is close to,
not equal to, untiled output; the feathered overlap hides the seam.

The tile size is chosen from a memory budget (``max_memory`` bytes, or a share of the free
RAM / VRAM) with :func:`pass_peak_bytes`: an estimate of the peak activation + cache memory of
streaming one tile (:func:`stream_peak_bytes`) plus a copy of the weights of the half that
runs, which convolution libraries keep in their own layout (oneDNN on CPU). Measured on the
full-size 2.1 decoder (random weights, CPU): 29x29-latent tiles peaked at 1,284 MB for an
estimate of 1,243 MB, an untiled 60x104 latent at 5,681 MB for 7,428 MB (conservative).
``tile=None`` decodes untiled whenever the whole frame fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Share of the currently free memory the VAE may use when no budget is given.
DEFAULT_BUDGET_SHARE = {"cpu": 0.5, "cuda": 0.7}
# Peak working memory of one layer, in units of (frames + 2) x channels x pixels of its level.
WORKING_TENSORS = 4
MIN_TILE_LATENT = 8       # smallest automatic tile side, in latent pixels
OVERLAP_SHARE = 0.25      # overlap between neighbouring tiles, as a share of the tile side


@dataclass(frozen=True)
class TilePlan:
    """Tile rectangles in latent units: ``ys``/``xs`` are lists of (start, end)."""
    ys: list
    xs: list
    overlap: int          # nominal overlap in latent pixels (the feather width)

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)


# -------------------------------------------------------------------------------- memory model

def _levels(cfg, kind: str, h: int, w: int):
    """(channels, frames per chunk, pixels, cached causal convs) of each resolution level of
    the streaming pass over an h x w latent tile (steady state, after the first chunk)."""
    mult = tuple(cfg.dim_mult)
    nrb = cfg.num_res_blocks
    n_levels = len(mult)
    if kind == "decode":
        dims = [cfg.decoder_dim * m for m in (mult[-1],) + mult[::-1]]
        temporal = list(cfg.temporal_downsample)[::-1]
        pixels, frames = h * w, 1
        out = [(cfg.z_dim, 1, pixels, 1), (dims[0], 1, pixels, 4)]       # conv1, middle
        for i in range(n_levels):
            out.append((dims[i + 1], frames, pixels, 2 * (nrb + 1)))
            if i != n_levels - 1:
                if temporal[i]:
                    frames *= 2
                    out.append((dims[i + 1], frames // 2, pixels, 1))      # time_conv cache
                pixels *= 4
        out.append((dims[-1], frames, pixels, 1))                          # head
        return out
    dims = [cfg.dim * m for m in (1,) + mult]
    temporal = list(cfg.temporal_downsample)
    pixels, frames = h * w * 4 ** (n_levels - 1), 2 ** sum(temporal)
    out = [(cfg.image_channels, frames, pixels, 1)]
    for i in range(n_levels):
        out.append((dims[i + 1], frames, pixels, 2 * nrb))
        if i != n_levels - 1:
            pixels //= 4
            if temporal[i]:
                frames //= 2
    out.append((dims[-1], frames, pixels, 5))                              # middle + head
    return out


def stream_peak_bytes(cfg, kind: str, h: int, w: int, batch: int = 1, element_size: int = 4) -> int:
    """Estimated peak bytes of streaming one (h x w latent) tile: every causal conv's cached
    frames plus the working tensors of the widest level."""
    levels = _levels(cfg, kind, h, w)
    cache = sum(c * 2 * px * n for c, _, px, n in levels)
    working = max(WORKING_TENSORS * (f + 2) * c * px for c, f, px, _ in levels)
    return batch * element_size * (cache + working)


def weight_copy_bytes(vae, kind: str) -> int:
    """Bytes of the encoder's or decoder's weights: the reordered copy a pass keeps."""
    half = vae.encoder if kind == "encode" else vae.decoder
    return sum(p.numel() * p.element_size() for p in half.parameters())


def pass_peak_bytes(vae, kind: str, h: int, w: int, batch: int = 1) -> int:
    """Estimated peak bytes of an encode or decode pass over one (h x w latent) tile: the
    streaming state (:func:`stream_peak_bytes`) plus one reordered copy of the weights of the
    encoder or decoder."""
    esize = next(vae.parameters()).element_size()
    return weight_copy_bytes(vae, kind) + stream_peak_bytes(vae.config, kind, h, w, batch, esize)


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (CUDA: mem_get_info; CPU: MemAvailable of /proc/meminfo)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_BUDGET_SHARE["cuda"])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * DEFAULT_BUDGET_SHARE["cpu"])
    except OSError:
        pass
    return 4 * 2**30


# -------------------------------------------------------------------------------- planning

def plan_tiles(vae, shape, kind: str, tile, max_memory: int | None) -> TilePlan | None:
    """Decide how to tile an encode (``shape`` = video shape) or decode (latent shape).

    Returns None for an untiled pass: ``tile=False``, or ``tile=None`` when the whole frame fits
    the budget, or tiles at least as large as the frame.
    """
    if tile is False:
        return None
    cfg = vae.config
    _, sh, sw = cfg.stride
    if kind == "encode":
        lat_h, lat_w = shape[-2] // sh, shape[-1] // sw
    else:
        lat_h, lat_w = shape[-2], shape[-1]
    if tile is None or tile is True:
        device = next(vae.parameters()).device
        budget = max_memory if max_memory is not None else available_memory(device)
        if tile is None and pass_peak_bytes(vae, kind, lat_h, lat_w, shape[0]) <= budget:
            return None
        side = _largest_tile(vae, kind, budget, shape[0], max(lat_h, lat_w))
        th, tw = min(side, lat_h), min(side, lat_w)
    else:
        th_px, tw_px = (tile, tile) if isinstance(tile, int) else tuple(tile)
        if th_px <= 0 or tw_px <= 0:
            raise ValueError(f"tile sizes must be positive pixel counts; got {th_px}x{tw_px}")
        th, tw = max(1, th_px // sh), max(1, tw_px // sw)
        if th_px % sh or tw_px % sw:
            raise ValueError(f"tile size must be a multiple of {sh} pixels for the Wan "
                             f"{cfg.version} VAE; got {th_px}x{tw_px}")
    if th >= lat_h and tw >= lat_w:
        return None
    overlap = max(1, int(min(th, tw) * OVERLAP_SHARE))
    return TilePlan(_spans(lat_h, th, overlap), _spans(lat_w, tw, overlap), overlap)


def _largest_tile(vae, kind, budget, batch, limit) -> int:
    """Largest square tile side (latent pixels, at least MIN_TILE_LATENT) whose
    :func:`pass_peak_bytes` fits ``budget``."""
    stream_budget = budget - weight_copy_bytes(vae, kind)      # summed once, not per side
    esize = next(vae.parameters()).element_size()
    side = MIN_TILE_LATENT
    while side < limit and stream_peak_bytes(vae.config, kind, side + 1, side + 1, batch,
                                             esize) <= stream_budget:
        side += 1
    return side


def _spans(length: int, size: int, overlap: int) -> list:
    """Start/end pairs of tiles of ``size`` covering ``length`` with at least ``overlap``."""
    if size >= length:
        return [(0, length)]
    step = max(1, size - overlap)
    n = math.ceil((length - size) / step) + 1
    starts = [round(k * (length - size) / (n - 1)) for k in range(n)]
    return [(s, s + size) for s in starts]


def _ramp(span, spans, scale: int, overlap: int) -> torch.Tensor:
    """1D blend weight of one tile (in output units): 1 inside, a linear ramp over
    ``overlap * scale`` samples at each side that touches another tile (not at frame edges)."""
    start, end = span
    n = (end - start) * scale
    pos = torch.arange(n, dtype=torch.float32) + 0.5
    weight = torch.ones(n)
    width = overlap * scale
    if start > min(s for s, _ in spans):
        weight = torch.minimum(weight, pos / width)
    if end < max(e for _, e in spans):
        weight = torch.minimum(weight, (n - pos) / width)
    return weight


# -------------------------------------------------------------------------------- tiled passes

def decode_tiled(vae, raw: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """raw latents [B, z, T, h, w] -> video [B, 3, 1+4(T-1), h*s, w*s] (float32), tile by tile."""
    _, s, _ = vae.config.stride
    b, _, t, h, w = raw.shape
    device = vae.conv2.weight.device
    out = torch.zeros(b, 3, vae.video_frames(t), h * s, w * s, dtype=torch.float32, device=device)
    weight_sum = torch.zeros(h * s, w * s, dtype=torch.float32, device=device)
    for ys in plan.ys:
        wy = _ramp(ys, plan.ys, s, plan.overlap).to(device)
        for xs in plan.xs:
            weight = wy[:, None] * _ramp(xs, plan.xs, s, plan.overlap).to(device)[None, :]
            region = (slice(ys[0] * s, ys[1] * s), slice(xs[0] * s, xs[1] * s))

            def sink(pos, frames, weight=weight, region=region):
                out[:, :, pos:pos + frames.shape[2], region[0], region[1]].add_(frames.mul_(weight))

            vae.decode_raw_stream(raw[:, :, :, ys[0]:ys[1], xs[0]:xs[1]], sink)
            weight_sum[region] += weight
    return out.div_(weight_sum)


def encode_tiled(vae, video: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """video [B, 3, 1+4n, H, W] -> raw latents [B, z, 1+n, H/s, W/s] (float32), tile by tile."""
    _, s, _ = vae.config.stride
    b, _, t, hh, ww = video.shape
    h, w = hh // s, ww // s
    device = vae.conv2.weight.device
    out = torch.zeros(b, vae.config.z_dim, vae.latent_frames(t), h, w, dtype=torch.float32, device=device)
    weight_sum = torch.zeros(h, w, dtype=torch.float32, device=device)
    for ys in plan.ys:
        wy = _ramp(ys, plan.ys, 1, plan.overlap).to(device)
        for xs in plan.xs:
            weight = wy[:, None] * _ramp(xs, plan.xs, 1, plan.overlap).to(device)[None, :]
            tile = video[:, :, :, ys[0] * s:ys[1] * s, xs[0] * s:xs[1] * s]
            out[:, :, :, ys[0]:ys[1], xs[0]:xs[1]] += vae.encode_raw_stream(tile) * weight
            weight_sum[ys[0]:ys[1], xs[0]:xs[1]] += weight
    return out.div_(weight_sum)
