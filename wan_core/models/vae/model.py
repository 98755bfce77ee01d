"""The Wan video VAE (2.1 and 2.2): encoder, decoder and causal streaming over time.

Latents come in two spaces:
- *raw*: what the encoder produces (ComfyUI's LATENT holds these);
- *normalised*: ``(raw - mean) / std`` per channel, what the official pipeline and the DiT use.
``WanVAE.encode`` / ``decode`` work in the normalised space, ``normalize`` / ``denormalize``
convert.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from . import wan21, wan22
from .blocks import AttentionBlock, CausalConv3d, ResidualBlock, RMSNorm, Stream, norm_silu_conv

VERSIONS = {"2.1": wan21, "2.2": wan22}
CHANNELS_LAST = torch.channels_last_3d
# On CUDA, let cuDNN time its algorithms for each convolution shape during encode / decode
# (``torch.backends.cudnn.benchmark``; restored afterwards). A decode repeats a few dozen
# shapes (one per layer, first chunk and the others) hundreds of times, so the one-off timing
# on the first call of a size pays back within the call or the next one. CPU runs never touch it.
CUDNN_BENCHMARK = True


@contextlib.contextmanager
def cudnn_autotuning(device):
    """``torch.backends.cudnn.benchmark`` on for the block when ``device`` is a CUDA device
    (and ``CUDNN_BENCHMARK``), then back to what it was; nothing at all on other devices."""
    if torch.device(device).type != "cuda" or not CUDNN_BENCHMARK:
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of one Wan VAE, inferred from its weights (see ``wan_core.loading.vae.infer_config``)."""
    version: str                          # "2.1" | "2.2"
    dim: int                              # encoder base width (96 for 2.1, 160 for 2.2)
    decoder_dim: int                      # decoder base width (96 for 2.1, 256 for 2.2)
    z_dim: int                            # latent channels (16 / 48)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def patch_size(self) -> int:
        return VERSIONS[self.version].PATCH_SIZE

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) compression factors, e.g. (4, 8, 8) or (4, 16, 16)."""
        spatial = 2 ** (len(self.dim_mult) - 1) * self.patch_size
        return (2 ** sum(self.temporal_downsample), spatial, spatial)

    @property
    def image_channels(self) -> int:
        return 3 * self.patch_size ** 2


class Encoder(nn.Module):
    """Pixels (patchified for 2.2) [B, 3p^2, T, H, W] -> [B, 2z, T', H/s, W/s] per chunk."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1,) + tuple(cfg.dim_mult)]
        self.conv1 = CausalConv3d(cfg.image_channels, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*VERSIONS[cfg.version].encoder_levels(
            dims, cfg.num_res_blocks, list(cfg.temporal_downsample)))
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(RMSNorm(top), nn.SiLU(), CausalConv3d(top, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        x = self.conv1(x, stream)
        for layer in self.downsamples:
            x = layer(x, stream)
        for layer in self.middle:
            x = layer(x, stream)
        x = [x]
        return norm_silu_conv(x, self.head[0], self.head[2], stream)


class Decoder(nn.Module):
    """Latents [B, z, 1, h, w] per chunk -> pixels [B, 3p^2, 1 or 4, h*s/p, w*s/p]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = tuple(cfg.dim_mult)
        dims = [cfg.decoder_dim * m for m in (mult[-1],) + mult[::-1]]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        self.upsamples = nn.Sequential(*VERSIONS[cfg.version].decoder_levels(
            dims, cfg.num_res_blocks, list(cfg.temporal_downsample)[::-1]))
        out = dims[-1]
        self.head = nn.Sequential(RMSNorm(out), nn.SiLU(), CausalConv3d(out, cfg.image_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        x = self.conv1(x, stream)
        for layer in self.middle:
            x = layer(x, stream)
        for layer in self.upsamples:
            x = layer(x, stream)
        x = [x]
        return norm_silu_conv(x, self.head[0], self.head[2], stream)


class WanVAE(nn.Module):
    """Wan-VAE 2.1 / 2.2 with causal streaming and optional spatial tiling.

    Parameter names match the official checkpoints: ``encoder.*``, ``conv1`` (to mean and
    log-variance), ``conv2`` (latent -> decoder input), ``decoder.*``.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)
        stats = VERSIONS[cfg.version]
        mean, std = _latent_stats(stats, cfg.z_dim)
        self.register_buffer("latent_mean", mean, persistent=False)
        self.register_buffer("latent_inv_std", 1.0 / std, persistent=False)

    def to_channels_last(self) -> "WanVAE":
        """Give every weight its own channels-last copy (faster convolutions and channel norms,
        and per-frame 2D ops become views; activations follow at the start of each chunk).
        Copying also releases memory-mapped checkpoint storage, which would otherwise stay
        resident for as long as any one tensor of the file is alive."""
        for m in self.modules():
            for name, p in m.named_parameters(recurse=False):
                fmt = {5: torch.channels_last_3d, 4: torch.channels_last}.get(p.dim(), torch.contiguous_format)
                if name != "weight" or not isinstance(m, (nn.Conv2d, nn.Conv3d)):
                    fmt = torch.contiguous_format
                p.data = p.data.clone(memory_format=fmt)
        return self

    # ---------------------------------------------------------------- latent spaces
    def _stat(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return getattr(self, name).to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents (ComfyUI LATENT) [B, z, T, h, w] -> official normalised latents."""
        return (raw - self._stat("latent_mean", raw)) * self._stat("latent_inv_std", raw)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Official normalised latents -> raw latents (ComfyUI LATENT)."""
        return z / self._stat("latent_inv_std", z) + self._stat("latent_mean", z)

    # ---------------------------------------------------------------- shape checks
    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.config.stride[0]

    def video_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.config.stride[0]

    def check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W] in [-1, 1]; got shape {tuple(video.shape)}")
        st, sh, sw = self.config.stride
        t, h, w = video.shape[2:]
        if t < 1 or (t - 1) % st:
            lo = t - (t - 1) % st if t > 1 else 1
            raise ValueError(f"the Wan {self.config.version} VAE encodes {st}n+1 frames "
                             f"(1, {1 + st}, {1 + 2 * st}, ...); got {t}; use {lo} or {lo + st}")
        if h % sh or w % sw:
            raise ValueError(
                f"video height and width must be multiples of {sh} for the Wan {self.config.version} "
                f"VAE; got {w}x{h}: crop or resize to {w // sw * sw}x{h // sh * sh} "
                f"or {-(-w // sw) * sw}x{-(-h // sh) * sh}")

    def check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"latents for the Wan {self.config.version} VAE must be "
                             f"[B, {self.config.z_dim}, T, h, w]; got shape {tuple(z.shape)}")

    # ---------------------------------------------------------------- streaming core
    def _param(self) -> torch.Tensor:
        return self.conv2.weight

    def encode_raw_stream(self, video: torch.Tensor) -> torch.Tensor:
        """Untiled causal encode: [B, 3, 1+4n, H, W] -> raw latent mean [B, z, 1+n, H/s, W/s]
        (float32). Chunks of 1, then stride_t frames, as the official code."""
        cfg = self.config
        st, sh, sw = cfg.stride
        p = self._param()
        b, _, t, h, w = video.shape
        out = torch.empty(b, cfg.z_dim, self.latent_frames(t), h // sh, w // sw,
                          dtype=torch.float32, device=p.device)
        stream = Stream()
        start, pos = 0, 0
        while start < t:
            n = 1 if start == 0 else st
            chunk = video[:, :, start:start + n].to(device=p.device, dtype=p.dtype)
            chunk = wan22.patchify(chunk, cfg.patch_size).contiguous(memory_format=CHANNELS_LAST)
            feats = self.encoder(chunk, stream)
            mu = self.conv1(feats)[:, :cfg.z_dim]
            out[:, :, pos:pos + mu.shape[2]] = mu
            pos += mu.shape[2]
            start += n
            stream.end_chunk()
            del chunk, feats, mu
        return out

    def decode_raw_stream(self, raw: torch.Tensor,
                          sink: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor | None:
        """Untiled causal decode of raw latents [B, z, T, h, w], one latent frame at a time.

        Each decoded chunk (float32 [B, 3, 1 or 4, H, W], clamped to [-1, 1]) is handed to
        ``sink(first_frame_index, frames)``; without a sink the frames are written into a
        preallocated [B, 3, 1+4(T-1), H, W] tensor, which is returned.
        """
        cfg = self.config
        _, sh, sw = cfg.stride
        p = self._param()
        b, _, t, h, w = raw.shape
        out = None
        if sink is None:
            out = torch.empty(b, 3, self.video_frames(t), h * sh, w * sw, dtype=torch.float32,
                              device=p.device)

            def sink(pos, frames):
                out[:, :, pos:pos + frames.shape[2]] = frames
        stream = Stream()
        pos = 0
        for i in range(t):
            x = raw[:, :, i:i + 1].to(device=p.device, dtype=p.dtype)
            x = self.conv2(x.contiguous(memory_format=CHANNELS_LAST))
            frames = wan22.unpatchify(self.decoder(x, stream), cfg.patch_size)
            frames = frames.float().clamp_(-1.0, 1.0)
            sink(pos, frames)
            pos += frames.shape[2]
            stream.end_chunk()
            del x, frames
        return out

    # ---------------------------------------------------------------- public API
    @torch.inference_mode()
    def encode(self, video: torch.Tensor, tile=None, max_memory: int | None = None) -> torch.Tensor:
        """video [B, 3, 1+4n, H, W] in [-1, 1] -> normalised latent [B, z, 1+n, H/s, W/s] (float32).

        ``tile``: None = automatic (untiled when the memory budget allows), False = untiled,
        (h, w) = tile size in pixels. ``max_memory``: budget in bytes (default: from free memory).
        """
        from .tiling import encode_tiled, plan_tiles

        self.check_video(video)
        plan = plan_tiles(self, video.shape, "encode", tile, max_memory)
        with cudnn_autotuning(self._param().device):
            raw = self.encode_raw_stream(video) if plan is None else \
                encode_tiled(self, video, plan)
        return self.normalize(raw)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, tile=None, max_memory: int | None = None) -> torch.Tensor:
        """normalised latent [B, z, T, h, w] -> video [B, 3, 1+4(T-1), h*s, w*s] in [-1, 1] (float32).

        ``tile`` / ``max_memory`` as in :meth:`encode` (tile sizes in output pixels).
        """
        from .tiling import decode_tiled, plan_tiles

        self.check_latent(z)
        raw = self.denormalize(z.float())
        plan = plan_tiles(self, z.shape, "decode", tile, max_memory)
        with cudnn_autotuning(self._param().device):
            return self.decode_raw_stream(raw) if plan is None else \
                decode_tiled(self, raw, plan)


def _latent_stats(stats_module, z_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Explicit CPU device: the model may be built under ``torch.device("meta")``.
    mean = torch.tensor(stats_module.LATENT_MEAN, dtype=torch.float32, device="cpu")
    std = torch.tensor(stats_module.LATENT_STD, dtype=torch.float32, device="cpu")
    if mean.numel() != z_dim:  # a non-standard VAE: identity normalisation
        return torch.zeros(z_dim, device="cpu"), torch.ones(z_dim, device="cpu")
    return mean, std
