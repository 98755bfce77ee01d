"""What the DiT is conditioned on besides text: video size checks, image preparation, the I2V
mask + image latent (``y``), CLIP image tokens, and the TI2V first-frame latent.

Everything is built as the official Wan code builds it (wan/image2video.py and
wan/textimage2video.py); the tests compare the tensors with the official construction.

Shapes: latents are ``[B, C, F_lat, h, w]`` with ``F_lat = (frames - 1) // 4 + 1`` and
``h, w = height // s, width // s`` for the VAE's spatial stride ``s`` (8 for Wan 2.1, 16 for
Wan 2.2). Images are ``[3, H, W]`` in [-1, 1] unless stated otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

TEMPORAL_STRIDE = 4
PATCH = 2  # the DiT's spatial patch size; sizes must be multiples of VAE stride x PATCH


class VideoSizeError(ValueError):
    """An invalid width, height or frame count; the message proposes valid values."""


def nearest_valid_frames(frames: int) -> tuple[int, int]:
    """The 4n+1 counts just below and above ``frames``."""
    below = max(1, frames - (frames - 1) % TEMPORAL_STRIDE)
    return below, below + TEMPORAL_STRIDE


def check_video_size(width: int, height: int, frames: int, spatial_stride: int = 8) -> None:
    """Raise VideoSizeError unless frames is 4n+1 and width/height are multiples of
    ``spatial_stride * PATCH`` (16 for Wan 2.1's VAE, 32 for Wan 2.2's)."""
    multiple = spatial_stride * PATCH
    problems = []
    if frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
        below, above = nearest_valid_frames(max(frames, 1))
        options = f"{below} or {above}" if frames > 1 else "1 or 5"
        problems.append(f"frames must be 4n+1 (1, 5, 9, ..., 81); got {frames}: use {options}")
    for name, value in (("width", width), ("height", height)):
        if value < multiple or value % multiple:
            lo = max(multiple, value // multiple * multiple)
            hi = lo + multiple if value > lo else lo
            options = f"{lo} or {hi}" if lo != hi else f"{lo}"
            problems.append(f"{name} must be a multiple of {multiple} for this model; "
                            f"got {value}: use {options}")
    if problems:
        raise VideoSizeError("; ".join(problems))


def latent_frames(frames: int) -> int:
    return (frames - 1) // TEMPORAL_STRIDE + 1


def latent_shape(z_dim: int, frames: int, height: int, width: int,
                 spatial_stride: int) -> tuple[int, int, int, int]:
    """``(C, F_lat, h, w)`` of the latent for a video of that size."""
    return (z_dim, latent_frames(frames), height // spatial_stride, width // spatial_stride)


def prepare_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize an image to cover ``width x height`` and centre-crop it there.

    ``image``: ``[3, H, W]`` in [-1, 1]. Returns ``[3, height, width]`` in [-1, 1] (float32).
    Resizing is bicubic without antialiasing, as the official I2V code resizes; when the aspect
    ratio already matches, this is exactly the official resize.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W]; got shape {tuple(image.shape)}")
    _, h, w = image.shape
    scale = max(width / w, height / h)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    out = image.float()[None]
    if (rh, rw) != (h, w):
        out = F.interpolate(out, size=(rh, rw), mode="bicubic", align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return out[0, :, top:top + height, left:left + width]


def i2v_mask(frames: int, lat_h: int, lat_w: int, known: tuple[int, ...] = (0,)) -> torch.Tensor:
    """The I2V mask as the official code builds it: ``[4, F_lat, lat_h, lat_w]``.

    One value per pixel frame (1 = given, 0 = to generate); the first latent frame covers one
    pixel frame, so its value is repeated 4 times; then every 4 pixel frames fold into the 4
    channels of one latent frame. ``known`` lists the given pixel frames (0 for I2V, 0 and -1
    for first-last-frame).
    """
    mask = torch.zeros(frames, lat_h, lat_w)
    for index in known:
        mask[index] = 1
    mask = torch.cat([mask[0:1].repeat(TEMPORAL_STRIDE, 1, 1), mask[1:]], dim=0)
    return mask.view(-1, TEMPORAL_STRIDE, lat_h, lat_w).transpose(0, 1).contiguous()


def i2v_pixel_video(frames: int, start: torch.Tensor, end: Optional[torch.Tensor]) -> torch.Tensor:
    """The video the official I2V code encodes for ``y``: the given frame(s), zeros elsewhere.

    ``start``/``end``: ``[3, H, W]`` in [-1, 1]. Returns ``[1, 3, frames, H, W]``.
    """
    video = torch.zeros(1, 3, frames, *start.shape[1:], dtype=start.dtype)
    video[0, :, 0] = start
    if end is not None:
        video[0, :, -1] = end
    return video


@dataclass
class VideoConditioning:
    """Everything the sampler needs besides text; what WANCORE_VIDEO_COND carries.

    ``y``: ``[1, 4 + C, F_lat, h, w]`` mask + normalised image latent (2.1 I2V / FLF2V, 2.2 I2V).
    ``clip_fea``: ``[1, 257 or 514, 1280]`` CLIP image tokens (2.1 I2V / FLF2V only).
    ``first_latent``: ``[1, C, 1, h, w]`` normalised latent of the given first frame (TI2V).
    """
    width: int
    height: int
    frames: int
    y: Optional[torch.Tensor] = None
    clip_fea: Optional[torch.Tensor] = None
    first_latent: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)

    @property
    def is_image_conditioned(self) -> bool:
        return self.y is not None or self.first_latent is not None


def build_i2v_conditioning(vae, start: torch.Tensor, width: int, height: int, frames: int,
                           end: Optional[torch.Tensor] = None, clip_vision=None) -> VideoConditioning:
    """Mask + image latent (+ CLIP tokens when ``clip_vision`` is given) for I2V / FLF2V.

    ``start``/``end``: ``[3, H, W]`` in [-1, 1], any size (resized and cropped to fit).
    ``vae``: a Wan VAE (``encode`` takes ``[B, 3, T, H, W]`` in [-1, 1]).
    ``clip_vision``: a CLIP vision encoder (``wan_core.load_clip_vision``); as in the official
    code it sees the images as given (it resizes them to 224 px itself).
    """
    stride = vae.config.stride[1]
    check_video_size(width, height, frames, stride)
    clip_images = [start] if end is None else [start, end]
    start = prepare_image(start, width, height)
    end = prepare_image(end, width, height) if end is not None else None
    lat_h, lat_w = height // stride, width // stride
    known = (0,) if end is None else (0, frames - 1)
    mask = i2v_mask(frames, lat_h, lat_w, known)
    video = i2v_pixel_video(frames, start, end)
    with torch.no_grad():
        latent = vae.encode(video)[0].float().cpu()
    y = torch.cat([mask, latent], dim=0)[None]
    clip_fea = None
    if clip_vision is not None:
        with torch.no_grad():  # one image at a time: start and end may differ in size
            tokens = torch.cat([clip_vision.encode(img[None], value_range=(-1.0, 1.0))
                                for img in clip_images])  # [n, 257, 1280]
        clip_fea = tokens.reshape(1, -1, tokens.shape[-1]).float().cpu()
    return VideoConditioning(width, height, frames, y=y, clip_fea=clip_fea)


def build_ti2v_conditioning(vae, image: torch.Tensor, width: int, height: int,
                            frames: int) -> VideoConditioning:
    """The first-frame latent of TI2V-5B: ``first_latent`` ``[1, C, 1, h, w]``."""
    stride = vae.config.stride[1]
    check_video_size(width, height, frames, stride)
    image = prepare_image(image, width, height)
    with torch.no_grad():
        latent = vae.encode(image[None, :, None])
    return VideoConditioning(width, height, frames, first_latent=latent.float().cpu())


def per_token_timesteps(t: torch.Tensor, lat_frames: int, lat_h: int, lat_w: int,
                        first_frame_known: bool) -> torch.Tensor:
    """Timesteps per token ``[B, F_lat * h/2 * w/2]`` from one per sample ``t`` [B] or one per
    latent frame [B, F_lat]; TI2V: 0 for the given first frame."""
    tokens_per_frame = (lat_h // PATCH) * (lat_w // PATCH)
    per_frame = t.float()[:, None].expand(-1, lat_frames) if t.dim() == 1 else t.float()
    out = per_frame.repeat_interleave(tokens_per_frame, dim=1)
    if first_frame_known:
        out[:, :tokens_per_frame] = 0
    return out
