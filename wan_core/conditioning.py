"""What the DiT is conditioned on besides text: video size checks, image preparation, the I2V
mask + image latent (``y``), CLIP image tokens, the TI2V first-frame latent, and the VACE
control latent.

I2V / FLF2V / TI2V are built as the official Wan code builds them (wan/image2video.py and
wan/textimage2video.py); the tests compare the tensors with the official construction. The VACE
control latent (:func:`vace_context`) is built by the rules of the VACE pipeline (control video
split by the mask into an inactive and a reactive part, each VAE-encoded; the mask folded from
8x8 pixel blocks into 64 channels; reference images encoded as extra leading latent frames); the
tests compare it with diffusers' ``WanVACEPipeline``.

Shapes: latents are ``[B, C, F_lat, h, w]`` with ``F_lat = (frames - 1) // 4 + 1`` and
``h, w = height // s, width // s`` for the VAE's spatial stride ``s`` (8 for Wan 2.1, 16 for
Wan 2.2). Images are ``[3, H, W]`` in [-1, 1] unless stated otherwise.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

TEMPORAL_STRIDE = 4
PATCH = 2  # the DiT's spatial patch size; sizes must be multiples of VAE stride x PATCH
VACE_CHANNELS = 96  # inactive latent (16) + reactive latent (16) + folded 8x8 mask (64)

log = logging.getLogger("wan_core")


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
    ``vace``: VACE controls, ``((context, scale), ...)``: each context ``[1, 96, trim + F_lat,
    h, w]`` (see :func:`vace_context`), each scale a float or one per VACE block; their hints
    are summed (several chained controls).
    ``trim``: latent frames of VACE reference images at the start of the latent; the sampled
    latent has ``trim + F_lat`` frames and the first ``trim`` are dropped before decoding.
    """
    width: int
    height: int
    frames: int
    y: Optional[torch.Tensor] = None
    clip_fea: Optional[torch.Tensor] = None
    first_latent: Optional[torch.Tensor] = None
    vace: tuple = ()
    trim: int = 0
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
                        first_frame_known: bool, patch: int = PATCH) -> torch.Tensor:
    """Timesteps per token ``[B, F_lat * h/p * w/p]`` (``p`` = the DiT's spatial ``patch``)
    from one per sample ``t`` [B] or one per latent frame [B, F_lat]; TI2V: 0 for the given
    first frame."""
    tokens_per_frame = (lat_h // patch) * (lat_w // patch)
    per_frame = t.float()[:, None].expand(-1, lat_frames) if t.dim() == 1 else t.float()
    out = per_frame.repeat_interleave(tokens_per_frame, dim=1)
    if first_frame_known:
        out[:, :tokens_per_frame] = 0
    return out


# -------------------------------------------------------------------------------- VACE

_RANGE_SLACK = 1e-3  # rounding slack for [-1, 1] inputs (values are clamped into range after)


def _describe_range(x: torch.Tensor) -> str:
    if torch.isnan(x).any():
        return "NaN values"
    return f"values {x.min().item():.4g}..{x.max().item():.4g}"


def _check_signed_range(name: str, x: torch.Tensor, hint: str) -> None:
    """Raise unless ``x`` is finite and within [-1, 1] (up to rounding)."""
    if not torch.isfinite(x).all() or x.amin() < -1 - _RANGE_SLACK or x.amax() > 1 + _RANGE_SLACK:
        raise ValueError(f"{name} must be in [-1, 1]; got {_describe_range(x)}: {hint}")


def _check_vace_video(video: torch.Tensor, frames: int) -> None:
    """``video``: ``[B, 3, T, H, W]`` in [-1, 1] with ``T >= frames``."""
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"VACE control video must be [B, 3, T, H, W]; got {shape}: pass RGB "
                         f"frames with the channels second (a ComfyUI IMAGE [T, H, W, 3] becomes "
                         f"image.movedim(-1, 0)[None] * 2 - 1)")
    _check_signed_range("VACE control video", video.float(),
                        "an IMAGE in 0..1 must be mapped to [-1, 1] first (x * 2 - 1)")
    _check_frame_count("control video", video.shape[2], frames)


def _check_vace_mask(mask: torch.Tensor, frames: int) -> None:
    """``mask``: ``[B, 1, T, H, W]`` in [0, 1] with ``T >= frames``."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 5 or mask.shape[1] != 1:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"VACE mask must be single-channel [B, 1, T, H, W]; got {shape}: pass "
                         f"one channel (a ComfyUI MASK [T, H, W] becomes mask[None, None])")
    m = mask.float()
    if torch.isnan(m).any() or m.amin() < 0 or m.amax() > 1:
        raise ValueError(f"VACE mask values must be in 0..1; got {_describe_range(m)}: clamp it "
                         f"to 0..1 (1 = generate/edit here, 0 = keep the control video)")
    _check_frame_count("mask", mask.shape[2], frames)


def _check_frame_count(what: str, count: int, frames: int) -> None:
    if count < frames:
        below = nearest_valid_frames(count)[0]
        raise ValueError(f"VACE {what} has {count} frames but frames is {frames}: give at least "
                         f"{frames} frames, or set frames to {below} (4n+1, at most {count})")


def _fit_frames(what: str, x: torch.Tensor, frames: int) -> torch.Tensor:
    """Keep the first ``frames`` frames of ``x`` [B, C, T, H, W], warning when some are dropped."""
    if x.shape[2] > frames:
        log.warning("VACE %s has %d frames but frames is %d: using the first %d",
                    what, x.shape[2], frames, frames)
        x = x[:, :, :frames]
    return x


def _fit_size(what: str, x: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    """Resize ``x`` [B, C, T, H, W] to cover ``width x height`` and centre-crop it there, with a
    warning (never silently). ``mode``: ``bilinear`` (video) or ``nearest-exact`` (mask)."""
    b, c, t, h, w = x.shape
    if (h, w) == (height, width):
        return x
    log.warning("VACE %s is %dx%d (width x height) but the output is %dx%d: resized to cover it "
                "and centre-cropped", what, w, h, width, height)
    scale = max(width / w, height / h)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    flat = x.float().permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    extra = {"align_corners": False} if mode == "bilinear" else {}
    flat = F.interpolate(flat, size=(rh, rw), mode=mode, **extra)
    top, left = (rh - height) // 2, (rw - width) // 2
    flat = flat[:, :, top:top + height, left:left + width]
    return flat.reshape(b, t, c, height, width).permute(0, 2, 1, 3, 4)


def _check_reference_images(reference_images, lat_frames: int, frames: int) -> list:
    refs = [] if reference_images is None else list(reference_images)
    if len(refs) > lat_frames:
        raise ValueError(f"{len(refs)} VACE reference images given but at most {lat_frames} are "
                         f"allowed for {frames} frames (one per latent frame): pass fewer "
                         f"reference images or more frames")
    for i, ref in enumerate(refs):
        if not isinstance(ref, torch.Tensor) or ref.dim() != 3 or ref.shape[0] != 3:
            shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise ValueError(f"VACE reference image {i} must be [3, h, w]; got {shape}: pass one "
                             f"RGB image per list entry (a ComfyUI IMAGE [1, h, w, 3] becomes "
                             f"image[0].movedim(-1, 0) * 2 - 1)")
        _check_signed_range(f"VACE reference image {i}", ref.float(),
                            "an IMAGE in 0..1 must be mapped to [-1, 1] first (x * 2 - 1)")
    return refs


def fit_reference_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A VACE reference image scaled to fit inside ``width x height`` (aspect kept, bilinear) and
    centred on a white canvas: ``[3, h, w]`` in [-1, 1] -> ``[3, height, width]`` (float32)."""
    _, h, w = image.shape
    scale = min(height / h, width / w)
    fit_h, fit_w = max(1, int(h * scale)), max(1, int(w * scale))
    image = image.float().clamp(-1, 1)[None]
    if (fit_h, fit_w) != (h, w):
        image = F.interpolate(image, size=(fit_h, fit_w), mode="bilinear", align_corners=False)
    canvas = torch.ones(3, height, width)
    top, left = (height - fit_h) // 2, (width - fit_w) // 2
    canvas[:, top:top + fit_h, left:left + fit_w] = image[0]
    return canvas


def fold_vace_mask(mask: torch.Tensor, stride: int, lat_frames: int) -> torch.Tensor:
    """Fold a pixel mask ``[T, H, W]`` into ``[stride**2, lat_frames, H/stride, W/stride]``.

    Channel ``i * stride + j`` holds pixel ``(i, j)`` of every ``stride x stride`` block (row
    offset major); time is then resampled to ``lat_frames`` by nearest-exact (frame
    ``floor((k + 0.5) * T / lat_frames)`` for latent frame ``k``).
    """
    t, h, w = mask.shape
    lh, lw = h // stride, w // stride
    blocks = mask.reshape(t, lh, stride, lw, stride)           # t, row, i, col, j
    channels = blocks.permute(2, 4, 0, 1, 3).reshape(stride * stride, t, lh, lw)
    return F.interpolate(channels[None], size=(lat_frames, lh, lw), mode="nearest-exact")[0]


def vace_context(vae, frames: int, height: int, width: int, video: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None,
                 reference_images: Optional[Sequence[torch.Tensor]] = None
                 ) -> tuple[torch.Tensor, int]:
    """The VACE control latent ``c`` and the number of leading reference frames ``trim``.

    ``video``: ``[B, 3, T, H, W]`` in [-1, 1] (default: grey, all zeros). ``mask``:
    ``[B, 1, T, H, W]`` in [0, 1], 1 where the video is to be generated/edited (default: all
    ones). A video or mask with more than ``frames`` frames is cut to the first ``frames``, one of
    another size is resized to cover ``width x height`` and centre-cropped (each with a logged
    warning). ``reference_images``: ``[3, h, w]`` tensors in [-1, 1] of any size (a list, or one
    ``[N, 3, h, w]`` tensor), the same for every sample; each is fitted inside the frame on a
    white canvas.

    Returns ``c`` ``[B, 96, trim + F_lat, height/8, width/8]`` (float32, CPU, normalised latent
    space) and ``trim = len(reference_images)``. Channels: ``0:16`` the latent of
    ``video * (1 - m)``, ``16:32`` the latent of ``video * m`` (``m = mask > 0.5``), ``32:96`` the
    mask itself (not binarised) folded from 8x8 pixel blocks and resampled to ``F_lat`` frames.
    Reference frames come first, in the order given: their latent in ``0:16``, zeros elsewhere.
    """
    stride, z_dim = vae.config.stride[1], vae.config.z_dim
    if (stride, z_dim) != (8, 16):
        raise ValueError(f"VACE needs the Wan 2.1 VAE (16 latent channels, stride 8); got a VAE "
                         f"with {z_dim} channels and stride {stride}: load wan_2.1_vae")
    check_video_size(width, height, frames, stride)
    lat_frames = latent_frames(frames)
    if video is not None:
        _check_vace_video(video, frames)
    if mask is not None:
        _check_vace_mask(mask, frames)
    if video is not None and mask is not None and mask.shape[0] not in (1, video.shape[0]):
        raise ValueError(f"VACE control video batch {tuple(video.shape)} and mask batch "
                         f"{tuple(mask.shape)} differ: give one mask per video, or a single mask")
    refs = _check_reference_images(reference_images, lat_frames, frames)

    batch = video.shape[0] if video is not None else mask.shape[0] if mask is not None else 1
    if video is None:
        video = torch.zeros(batch, 3, frames, height, width)
    video = _fit_size("control video", _fit_frames("control video", video, frames),
                      width, height, "bilinear").float().clamp(-1, 1)
    if mask is None:
        mask = torch.ones(batch, 1, frames, height, width)
    mask = _fit_size("mask", _fit_frames("mask", mask, frames), width, height, "nearest-exact")
    mask = mask.float().expand(batch, -1, -1, -1, -1)

    with torch.no_grad():
        ref_latents = [vae.encode(fit_reference_image(r, width, height)[None, :, None])
                       .float().cpu()[0] for r in refs]                  # each [16, 1, h, w]
        contexts = []
        for v, m in zip(video, mask):
            keep = (m > 0.5).float()
            inactive = vae.encode((v * (1 - keep))[None]).float().cpu()[0]
            reactive = vae.encode((v * keep)[None]).float().cpu()[0]
            latent = torch.cat([inactive, reactive], dim=0)              # [32, F_lat, h, w]
            folded = fold_vace_mask(m[0], stride, lat_frames)           # [64, F_lat, h, w]
            if ref_latents:
                lead = torch.cat([torch.cat([r, torch.zeros_like(r)]) for r in ref_latents], dim=1)
                latent = torch.cat([lead, latent], dim=1)
                folded = torch.cat([folded.new_zeros(folded.shape[0], len(refs),
                                                     *folded.shape[2:]), folded], dim=1)
            contexts.append(torch.cat([latent, folded], dim=0))
    return torch.stack(contexts), len(refs)


def _vace_strength(strength) -> Union[float, tuple]:
    """A finite float, or a non-empty sequence of finite floats (one per VACE block)."""
    values = (strength,) if isinstance(strength, (int, float)) else strength
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"VACE strength must be a number or a list of numbers (one per VACE "
                         f"block); got {strength!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"VACE strength must be finite (e.g. 1.0); got {strength!r}")
    return values[0] if isinstance(strength, (int, float)) else values


def build_vace_conditioning(vae, width: int, height: int, frames: int,
                            video: Optional[torch.Tensor] = None,
                            mask: Optional[torch.Tensor] = None,
                            reference_images: Optional[Sequence[torch.Tensor]] = None,
                            strength=1.0,
                            previous: Optional[VideoConditioning] = None) -> VideoConditioning:
    """A VACE control (see :func:`vace_context`) as a VideoConditioning with
    ``vace = ((c, strength),)`` and ``trim`` = the number of reference images.

    ``strength``: a float, or one float per VACE block. ``previous``: an earlier result of this
    function to add this control to (as chained WanVaceToVideo nodes); the result keeps its
    controls and appends this one. Its size, frames and reference-frame count must match.
    """
    strength = _vace_strength(strength)
    trim = 0 if reference_images is None else len(reference_images)
    if previous is not None:
        if (previous.width, previous.height, previous.frames) != (width, height, frames):
            raise ValueError(
                f"VACE control is {width}x{height}, {frames} frames but the previous "
                f"conditioning is {previous.width}x{previous.height}, {previous.frames} frames: "
                f"chained VACE controls must share width, height and frames")
        if previous.trim != trim:
            raise ValueError(
                f"VACE control has {trim} reference images but the previous conditioning has "
                f"{previous.trim}: chained VACE controls must use the same number of reference "
                f"images (pass the same reference images to each control)")
    c, trim = vace_context(vae, frames, height, width, video, mask, reference_images)
    if previous is None:
        return VideoConditioning(width, height, frames, vace=((c, strength),), trim=trim)
    return replace(previous, vace=tuple(previous.vace) + ((c, strength),), trim=trim,
                   extra=dict(previous.extra))
