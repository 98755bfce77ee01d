"""Building blocks shared by Wan-VAE 2.1 and 2.2.

Every block works on video tensors ``[B, C, T, H, W]`` and is *streamed* over time: the VAE
feeds a clip to the network a few frames at a time (a "chunk") and each causal layer carries
the frames it still needs from one chunk to the next in a :class:`Stream`. Streaming is not an
optimisation here: the Wan VAEs were trained this way (the first chunk is treated specially
by the temporal resamplers), so the chunked result *is* the model's output.

Module and parameter names follow the official checkpoints (``residual.2.weight``,
``resample.1.bias``, ``time_conv.weight`` ...) so official state dicts load without renaming.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Causal 3x3x3 convolutions look two frames into the past.
HISTORY_FRAMES = 2


class Stream:
    """Per-layer state carried between time chunks of one encode or decode.

    ``history[layer]`` holds the last input frames a causal layer has seen (at most
    ``HISTORY_FRAMES``); ``first`` is True while the first chunk is being processed.
    """

    def __init__(self):
        self.history: dict[nn.Module, torch.Tensor] = {}
        self.first = True

    def end_chunk(self) -> None:
        self.first = False

    def cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.history.values())


class CausalConv3d(nn.Conv3d):
    """3D convolution that pads time only on the past side.

    ``padding=(pt, ph, pw)`` means ``2*pt`` past frames (zeros at the start of the stream,
    the previous chunk's last frames afterwards) and symmetric zero padding in space.
    x ``[B, C_in, T, H, W]`` -> ``[B, C_out, T', H', W']``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(0, pad[1], pad[2]))
        self.past_frames = 2 * pad[0]

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        if self.past_frames == 0:
            return super().forward(x)
        buf, real = self.begin(x, stream)
        buf[:, :, self.past_frames:].copy_(x)
        return self.finish(buf, real, stream)

    def begin(self, x: torch.Tensor, stream: Stream | None) -> tuple[torch.Tensor, int]:
        """Allocate this layer's time-padded input ``[B, C_in, past + T, H, W]`` for chunk
        ``x`` with the past frames (or zeros) in front; the caller writes the chunk's real
        input into ``buf[:, :, past:]`` (e.g. norm + SiLU of ``x`` directly, saving a copy).
        Returns the buffer and its number of real (non-padding) frames."""
        n = self.past_frames
        past = stream.history.get(self) if stream is not None else None
        have = 0 if past is None else past.shape[2]
        b, _, t, h, w = x.shape
        buf = torch.empty(b, self.in_channels, n + t, h, w, dtype=x.dtype, device=x.device,
                          memory_format=memory_format_of(x))
        if have < n:
            buf[:, :, :n - have].zero_()
        if past is not None:
            buf[:, :, n - have:n].copy_(past)
        return buf, have + t

    def finish(self, buf: torch.Tensor, real: int, stream: Stream | None) -> torch.Tensor:
        """Keep the last real frames for the next chunk and convolve the buffer."""
        if stream is not None:
            keep = min(self.past_frames, real)
            stream.history[self] = buf[:, :, buf.shape[2] - keep:].clone()
        return super().forward(buf)


class RMSNorm(nn.Module):
    """L2-normalise over channels (dim 1), times ``sqrt(C) * gamma``.

    ``frame_dims`` is 3 for video tensors ``[B, C, T, H, W]`` and 2 for images ``[N, C, H, W]``
    (the gamma shape stored in the checkpoints differs accordingly).
    """

    def __init__(self, dim: int, frame_dims: int = 3):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * frame_dims)))
        self.root_dim = dim ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * (self.gamma * self.root_dim).to(x.dtype)

    def silu_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out = SiLU(norm(x)), written in place (``out`` has x's shape)."""
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
        torch.div(x, norm, out=out)
        del norm
        out.mul_((self.gamma * self.root_dim).to(x.dtype))
        F.silu(out, inplace=True)


def norm_silu_conv(x: list, norm: RMSNorm, conv: CausalConv3d, stream: Stream) -> torch.Tensor:
    """conv(SiLU(norm(x))) with the activation written straight into the conv's padded input.

    ``x`` is passed as a one-element list that is emptied once the activation is written, so
    that a temporary input is freed before the convolution runs (one chunk-sized tensor less
    at the peak); keep your own reference when the input is still needed."""
    buf, real = conv.begin(x[0], stream)
    if torch.is_grad_enabled() and (x[0].requires_grad or norm.gamma.requires_grad):
        # Training (wan_core.demo): the in-place kernel below cannot be differentiated.
        buf[:, :, conv.past_frames:] = F.silu(norm(x.pop()))
    else:
        norm.silu_into(x.pop(), buf[:, :, conv.past_frames:])
    return conv.finish(buf, real, stream)


class ResidualBlock(nn.Module):
    """norm, SiLU, causal conv, norm, SiLU, causal conv; plus a (1x1x1 conv) shortcut.

    ``residual`` keeps the official indices 0/2/3/6 for its parameterised layers.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        hidden = [norm_silu_conv([x], norm1, conv1, stream)]   # x itself is kept for the sum
        y = norm_silu_conv(hidden, norm2, conv2, stream)
        return y.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no time mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, frame_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = frames_as_batch(x)                                   # [B*T, C, H, W]
        qkv = self.to_qkv(self.norm(frames))                          # [B*T, 3C, H, W]
        tokens = qkv.flatten(2).transpose(1, 2).unsqueeze(1)          # [B*T, 1, HW, 3C]
        q, k, v = tokens.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)                   # [B*T, 1, HW, C]
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return batch_as_frames(self.proj(y), b).add_(x)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for channels-last video tensors, else contiguous."""
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def frames_as_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W] (a view for channels-last video)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def batch_as_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W]."""
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """Halve or double H and W (per frame), optionally also T.

    Modes: ``upsample2d``, ``upsample3d``, ``downsample2d``, ``downsample3d``.
    Upsampling is nearest x2 then a 3x3 conv to ``up_out_dim`` channels (half the input in
    2.1, equal in 2.2). Temporal upsampling predicts two frames per input frame with a causal
    conv, skipped on the first chunk so that frame 0 stays a single frame. Temporal
    downsampling passes the first chunk through and afterwards convolves (stride 2) over the
    previous chunk's last frame plus the current ones.
    """

    def __init__(self, dim: int, mode: str, up_out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, up_out_dim, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        b = x.shape[0]
        if self.mode == "upsample3d" and not stream.first:
            x = self.time_conv(x, stream)                              # [B, 2C, T, H, W]
            _, c2, t, h, w = x.shape
            x = x.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        frames = frames_as_batch(x)
        if self.mode.startswith("up"):
            x = batch_as_frames(self._upsample_conv(frames), b)
        else:
            x = batch_as_frames(self.resample[1](F.pad(frames, (0, 1, 0, 1))), b)
        del frames
        if self.mode == "downsample3d":
            last = x[:, :, -1:].clone()
            if not stream.first:
                x = self.time_conv(torch.cat([stream.history[self], x], dim=2))
            stream.history[self] = last
        return x


    def _upsample_conv(self, x: torch.Tensor) -> torch.Tensor:
        """conv3x3(nearest_upsample_x2(x)) without building the upsampled image.

        Each of the four output phases (even/odd row, even/odd column) of a 3x3 conv over a
        nearest-upsampled image is a 2x2 conv over the original: 16 instead of 36
        multiply-adds per output pixel. x [N, C, H, W] -> [N, C_out, 2H, 2W] (channels-last).
        """
        conv = self.resample[1]
        n, _, h, w = x.shape
        out = torch.empty(n, h, 2, w, 2, conv.out_channels, dtype=x.dtype, device=x.device)
        for (a, b), kernel in self._phase_kernels(x.dtype).items():
            y = F.conv2d(x, kernel, conv.bias.to(x.dtype), padding=1)   # [N, C_out, H+1, W+1]
            out[:, :, a, :, b] = y[:, :, a:a + h, b:b + w].permute(0, 2, 3, 1)
            del y
        return out.view(n, 2 * h, 2 * w, conv.out_channels).permute(0, 3, 1, 2)

    def _phase_kernels(self, dtype: torch.dtype) -> dict:
        weight = self.resample[1].weight
        key = (weight.data_ptr(), _version(weight), dtype)
        cached = getattr(self, "_phase_cache", None)
        grad = torch.is_grad_enabled() and weight.requires_grad
        if cached is not None and cached[0] == key and not grad:
            return cached[1]
        # Which of the 3 taps fall on source row i-1/i (even phase) or i/i+1 (odd phase).
        fold = [weight.new_tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.float32),
                weight.new_tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.float32)]
        w32 = weight.float()
        kernels = {(a, b): torch.einsum("pk,oikl,ql->oipq", fold[a], w32, fold[b])
                   .to(dtype).contiguous(memory_format=torch.channels_last)
                   for a in (0, 1) for b in (0, 1)}
        if not grad:        # training builds them afresh: they carry the autograd graph
            self._phase_cache = (key, kernels)
        return kernels


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of the 2.2 down blocks: fold (ft x fs x fs) neighbourhoods into
    channels and average groups of them down to ``out_channels``.
    The chunk is zero-padded at its start to a multiple of ``ft`` frames."""

    def __init__(self, in_channels: int, out_channels: int, ft: int, fs: int):
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, ft, fs
        self.group = in_channels * ft * fs * fs // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        pad_t = (-x.shape[2]) % ft
        if pad_t:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_channels, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of the 2.2 up blocks, the inverse layout of :class:`AvgDown3D`:
    repeat channels, then unfold them into (ft x fs x fs) neighbourhoods. On the first chunk
    the first ``ft - 1`` frames are dropped (frame 0 stays a single frame)."""

    def __init__(self, in_channels: int, out_channels: int, ft: int, fs: int):
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, ft, fs
        self.repeats = out_channels * ft * fs * fs // in_channels

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        ft, fs, c = self.ft, self.fs, self.out_channels
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).reshape(b, c, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


class DownResidualBlock(nn.Module):
    """2.2 encoder level: residual blocks and an optional downsampler, plus an averaging
    shortcut over the whole level."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        y = x
        for layer in self.downsamples:
            y = layer(y, stream)
        return y.add_(self.avg_shortcut(x))


class UpResidualBlock(nn.Module):
    """2.2 decoder level: residual blocks and an optional upsampler, plus a duplicating
    shortcut when the level upsamples."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        y = x
        for layer in self.upsamples:
            y = layer(y, stream)
        if self.avg_shortcut is not None:
            y = y.add_(self.avg_shortcut(x, stream.first))
        return y


def _version(tensor: torch.Tensor) -> int:
    """In-place modification counter; 0 for inference tensors (e.g. weights loaded inside
    ComfyUI, which runs nodes under ``torch.inference_mode``), which cannot be modified."""
    return 0 if tensor.is_inference() else tensor._version
