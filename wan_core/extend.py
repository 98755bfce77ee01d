"""Long videos by extension: continue a clip from its last frame(s), one segment after another.

Each new segment is a normal generation of ``frames`` frames conditioned on the end of the clip
so far; its first ``overlap`` frames stand for the given ones and are dropped when the segment
is appended, so every segment adds ``frames - overlap`` frames and segments chain to any length.

Methods (chosen from the model unless given):

- ``i2v``: an image-to-video model (Wan 2.1 I2V with CLIP vision, Wan 2.2 I2V-A14B experts, the
  demo's I2V) continues from the clip's last frame: ``overlap`` 1 is the official I2V
  conditioning. A larger ``overlap`` marks the clip's last ``overlap`` frames as given in the I2V
  mask and image latent (as a batch of start images does in ComfyUI's WanImageToVideo), which
  shows the model the motion so far (on the demo, overlap 9 gives smaller seams than 1). With
  ``end_image`` the last segment is first-last-frame (FLF2V: it also ends on the image).
  TI2V-5B continues from its given first latent frame (overlap 1, no end image).
- ``vace``: a VACE model gets the clip's last ``overlap`` frames as its control video, kept
  (mask black), and grey frames masked white to generate after them; with ``end_image`` the
  last segment's last control frame is the image, kept. Several kept frames carry the motion
  over the seam, not only the picture.

Colour drift: a segment's rendition of the frames it was given can be slightly brighter,
darker or tinted. It is measured over the overlap (mean and standard deviation per channel of
the given frames against the segment's own first ``overlap`` frames) and, with
``colour_match``, corrected: the whole segment is mapped per channel by
``(x - mean_new) * gain + mean_old`` with ``gain = std_old / std_new`` (limited to
[``1/MAX_GAIN``, ``MAX_GAIN``]; 1 where the segment's overlap is flat), then clipped to [-1, 1].

Videos here are ``[3, T, H, W]`` in [-1, 1] (float32), as ``vae.decode`` gives them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .conditioning import (VideoConditioning, build_i2v_conditioning, build_ti2v_conditioning,
                           build_vace_conditioning, check_video_size, i2v_mask, prepare_image)
from .pipeline import generate, unwrap_options, vae_stride_for
from .sampling import SEED_MAX

log = logging.getLogger(__name__)

METHODS = ("i2v", "vace")
MAX_GAIN = 2.0          # colour matching never scales a channel's contrast by more than this
FLAT_STD = 1e-3         # an overlap this flat (per channel) keeps its contrast (gain 1)


class ExtendError(ValueError):
    """A setting that makes extension impossible; the message says what to change."""


# ----------------------------------------------------------------------------- colour drift

@dataclass(frozen=True)
class ColourStats:
    """Per-channel mean and standard deviation (population) of some frames."""
    mean: tuple
    std: tuple


def colour_stats(frames: torch.Tensor) -> ColourStats:
    """``frames`` ``[3, T, H, W]`` -> mean and std per channel over all of T, H, W."""
    flat = frames.detach().double().reshape(frames.shape[0], -1)
    return ColourStats(tuple(flat.mean(1).tolist()), tuple(flat.std(1, unbiased=False).tolist()))


@dataclass(frozen=True)
class ColourDrift:
    """How a segment's overlap differs from the frames it was given: ``mean`` the difference of
    the channel means (new - old), ``gain`` the contrast correction ``std_old / std_new``
    (limited, see :func:`colour_correction`)."""
    mean: tuple
    gain: tuple

    @property
    def size(self) -> float:
        """One number: the largest mean shift or contrast change of a channel (0 = none)."""
        return max(max(abs(m) for m in self.mean), max(abs(g - 1.0) for g in self.gain))


def colour_correction(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """``(gain, mean_new, mean_old)`` per channel (``[3, 1, 1, 1]`` float32) that map the
    statistics of ``new`` onto those of ``old`` (both ``[3, k, H, W]``)."""
    a, b = colour_stats(old), colour_stats(new)
    gains = [1.0 if s_new < FLAT_STD else min(MAX_GAIN, max(1.0 / MAX_GAIN, s_old / s_new))
             for s_old, s_new in zip(a.std, b.std)]
    shape = (-1, 1, 1, 1)
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32).view(shape)   # noqa: E731
    return as_tensor(gains), as_tensor(b.mean), as_tensor(a.mean)


def colour_drift(old: torch.Tensor, new: torch.Tensor) -> ColourDrift:
    """The drift of ``new`` (a segment's first frames) from ``old`` (the frames it was given)."""
    gain, mean_new, mean_old = colour_correction(old, new)
    return ColourDrift(tuple((mean_new - mean_old).flatten().tolist()),
                       tuple(gain.flatten().tolist()))


def match_colour(segment: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``segment`` with its colours mapped so that ``new`` (its part over the overlap) gets the
    per-channel mean and std of ``old``; clipped to [-1, 1]."""
    gain, mean_new, mean_old = (v.to(segment.device) for v in colour_correction(old, new))
    return ((segment.float() - mean_new) * gain + mean_old).clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------- seams

def frame_changes(video: torch.Tensor) -> torch.Tensor:
    """Mean absolute change between consecutive frames of ``[3, T, H, W]``: ``[T - 1]``."""
    v = video.detach().float()
    return (v[:, 1:] - v[:, :-1]).abs().mean(dim=(0, 2, 3))


def seam_ratios(video: torch.Tensor, starts) -> tuple[list, float]:
    """At each segment boundary (``starts``: index of the first frame of each appended
    segment) the change from the frame before, divided by the median change between
    consecutive frames inside segments. Returns ``(ratios, median)``."""
    changes = frame_changes(video)
    seams = {s - 1 for s in starts}          # change i is between frames i and i + 1
    inside = torch.stack([c for i, c in enumerate(changes) if i not in seams])
    median = float(inside.median())
    return [float(changes[s - 1]) / max(median, 1e-12) for s in starts], median


# ----------------------------------------------------------------------------- checks

def model_method(config) -> Optional[str]:
    """The extension method a model supports (``vace``, ``i2v``) or None (text-to-video)."""
    if getattr(config, "is_vace", False):
        return "vace"
    if config.model_type in ("i2v", "flf2v", "ti2v"):
        return "i2v"
    return None


def check_extend(config, width: int, height: int, *, segments: int, frames: int, overlap: int,
                 clip_frames: Optional[int] = None, method: Optional[str] = None,
                 end_image: bool = False, clip_vision: bool = False) -> str:
    """Check an extension before any model runs; returns the method. ``config``: the DiT's
    config (a :class:`MoEModel`'s is its high-noise expert's); ``clip_frames``: the length of
    the clip to extend, when known. Raises :class:`ExtendError` (a ValueError)."""
    for name, value, low in (("segments", segments, 1), ("frames per segment", frames, 2),
                             ("overlap", overlap, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ExtendError(f"{name} must be a whole number of at least {low} (got {value!r})")
    if method is not None and method not in METHODS:
        raise ExtendError(f"extension method must be one of {', '.join(METHODS)} "
                          f"(got {method!r})")
    found = model_method(config)
    name = f"{getattr(config, 'variant', config.model_type)} ({config.model_type})"
    if found is None:
        raise ExtendError(f"extension needs an image-to-video model (Wan 2.1 I2V, Wan 2.2 "
                          f"I2V-A14B, TI2V-5B) or a VACE model; this is {name}")
    if method is not None and method != found:
        wanted = "a VACE model" if method == "vace" else "an image-to-video model"
        raise ExtendError(f"extension method {method} needs {wanted}; this is {name}")
    check_video_size(width, height, frames, vae_stride_for(config.out_dim))
    if overlap >= frames:
        raise ExtendError(f"overlap must be below the frames per segment, so that each segment "
                          f"adds frames (got overlap {overlap} for {frames}-frame segments)")
    if clip_frames is not None and overlap > clip_frames:
        raise ExtendError(f"overlap is {overlap} frames but the clip to extend has only "
                          f"{clip_frames}")
    if found == "i2v":
        if config.model_type == "ti2v" and overlap != 1:
            raise ExtendError(f"TI2V-5B continues from one given frame: overlap must be 1 (got "
                              f"{overlap}); an I2V or VACE model keeps several frames")
        if config.model_type == "ti2v" and end_image:
            raise ExtendError("TI2V-5B takes only a start image: extend without an end image, or "
                              "with an I2V or VACE model")
        if config.model_type == "flf2v" and not (end_image and segments == 1):
            raise ExtendError("a Wan 2.1 FLF2V model needs an end image for every segment: "
                              "extend with an I2V model (an end image then ends the last "
                              "segment), or extend by one segment with an end image")
        if getattr(config, "has_image_branch", False) and not clip_vision:
            raise ExtendError("this Wan 2.1 I2V / FLF2V model needs CLIP vision for each "
                              "segment's start image: connect a CLIP vision model "
                              "(clip_vision_h)")
    return found


# ----------------------------------------------------------------------------- extension

@dataclass
class SegmentReport:
    """What happened to one appended segment: its seed, the frames it added, its colour drift
    over the overlap before and after correction, where it starts in the whole clip."""
    index: int
    seed: int
    added: int
    start: int
    drift: ColourDrift
    drift_after: ColourDrift
    extra: dict = field(default_factory=dict)


def _device_of(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def segment_conditioning(method: str, config, vae, clip: torch.Tensor, width: int, height: int,
                         frames: int, overlap: int, end_image: Optional[torch.Tensor] = None,
                         clip_vision=None, vace_scale=1.0) -> VideoConditioning:
    """The conditioning of the next segment after ``clip`` ``[3, T, H, W]`` in [-1, 1]."""
    device = _device_of(vae)
    if method == "vace":
        control = torch.zeros(1, 3, frames, height, width, device=device)
        mask = torch.ones(1, 1, frames, height, width, device=device)
        control[0, :, :overlap] = clip[:, -overlap:].to(device)
        mask[:, :, :overlap] = 0.0
        if end_image is not None:
            control[0, :, -1] = prepare_image(end_image, width, height).to(device)
            mask[:, :, -1] = 0.0
        return build_vace_conditioning(vae, width, height, frames, video=control, mask=mask,
                                       strength=vace_scale)
    if config.model_type == "ti2v":
        return build_ti2v_conditioning(vae, clip[:, -1].to(device), width, height, frames)
    return i2v_continuation(vae, clip[:, -overlap:].to(device), width, height, frames,
                            None if end_image is None else end_image.to(device), clip_vision)


def i2v_continuation(vae, given: torch.Tensor, width: int, height: int, frames: int,
                     end: Optional[torch.Tensor] = None, clip_vision=None) -> VideoConditioning:
    """I2V conditioning that continues ``given`` ``[3, k, H, W]`` (the clip's last k frames,
    at the video's size): the I2V mask marks pixel frames ``0 .. k-1`` (and the last one with
    ``end``) as known and the image latent encodes them in place, as a batch of start images
    does in ComfyUI's WanImageToVideo. k = 1 is exactly the official I2V (FLF2V with ``end``)
    conditioning (:func:`wan_core.conditioning.build_i2v_conditioning`); CLIP vision sees the
    last given frame (and ``end``)."""
    k = given.shape[1]
    if k == 1:
        return build_i2v_conditioning(vae, given[:, 0], width, height, frames, end=end,
                                      clip_vision=clip_vision)
    stride = vae.config.stride[1]
    check_video_size(width, height, frames, stride)
    end = None if end is None else prepare_image(end, width, height).to(given)
    video = torch.zeros(1, 3, frames, height, width, dtype=given.dtype, device=given.device)
    video[0, :, :k] = given
    known = tuple(range(k))
    if end is not None:
        video[0, :, -1] = end
        known += (frames - 1,)
    mask = i2v_mask(frames, height // stride, width // stride, known)
    with torch.no_grad():
        latent = vae.encode(video)[0].float().cpu()
    clip_fea = None
    if clip_vision is not None:
        images = [given[:, -1]] + ([] if end is None else [end])
        with torch.no_grad():
            tokens = torch.cat([clip_vision.encode(img[None], value_range=(-1.0, 1.0))
                                for img in images])
        clip_fea = tokens.reshape(1, -1, tokens.shape[-1]).float().cpu()
    return VideoConditioning(width, height, frames, y=torch.cat([mask, latent])[None],
                             clip_fea=clip_fea)


def extend_video(model, vae, context, negative_context, video: torch.Tensor, *, segments: int,
                 frames: int = 81, overlap: int = 1, method: Optional[str] = None,
                 end_image: Optional[torch.Tensor] = None, clip_vision=None, steps: int = 50,
                 guide_scale: float = 5.0, shift: float = 5.0, solver: str = "unipc",
                 seed: int = 0, colour_match: bool = True, vace_scale=1.0, callback=None,
                 cancel=None, device: Optional[torch.device] = None, cache=None, tile=None,
                 prepare: Optional[Callable[[str], None]] = None,
                 segment_prompts: Optional[Sequence] = None,
                 report: Optional[list] = None) -> torch.Tensor:
    """Append ``segments`` segments to ``video`` and return the whole clip.

    model / context / negative_context / steps / guide_scale / shift / solver / cache /
    device: as :func:`wan_core.pipeline.generate` takes them (a :class:`MoEModel` pair, LoRAs,
    a step cache all work). video: the clip to continue, ``[3, T, H, W]`` in [-1, 1]; its size
    is the size of every segment (valid for the model). frames: frames per segment (4n+1);
    overlap: the clip's last frames each segment is conditioned on (1: the official I2V
    conditioning; TI2V-5B takes only 1), dropped from the segment when it is appended.
    end_image: ``[3, H, W]`` in [-1, 1], where the last segment ends. seed: segment k
    (0-based) uses ``seed + k``.
    callback(step, total, x, x0): progress over all segments (total = segments x steps);
    cancel: as for ``generate``. prepare(what): called with ``"model"`` before each segment is
    sampled and ``"vae"`` before the VAE runs (a host moves the model it needs onto the
    device). segment_prompts: ``[(context, negative_context), ...]`` to give segments their own
    prompts (segment k takes entry k, the last entry the remaining segments); None: every
    segment takes ``context`` / ``negative_context``. report: a list that receives one
    :class:`SegmentReport` per segment.

    Returns ``[3, T + segments * (frames - overlap), H, W]`` float32 on the CPU.
    """
    if video.dim() != 4 or video.shape[0] != 3:
        raise ExtendError(f"the clip to extend must be [3, T, H, W] in [-1, 1]; got "
                          f"{tuple(video.shape)}")
    inner = unwrap_options(model)[0]
    config = inner.config
    _, clip_frames, height, width = video.shape
    method = check_extend(config, width, height, segments=segments, frames=frames,
                          overlap=overlap, clip_frames=clip_frames, method=method,
                          end_image=end_image is not None, clip_vision=clip_vision is not None)
    clip = video.detach().float().cpu().clamp(-1.0, 1.0)
    total = segments * steps
    for k in range(segments):
        last = k == segments - 1
        segment_seed = (int(seed) + k) % (SEED_MAX + 1)
        if prepare is not None:
            prepare("vae")
        with torch.no_grad():
            cond = segment_conditioning(method, config, vae, clip, width, height, frames, overlap,
                                        end_image if last else None, clip_vision, vace_scale)
        if prepare is not None:
            prepare("model")
        offset = k * steps

        def step(i, n, x, x0, offset=offset):
            if callback is not None:
                callback(offset + i, total, x, x0)

        if segment_prompts:
            context, negative_context = segment_prompts[min(k, len(segment_prompts) - 1)]
        latent = generate(model, context, negative_context, cond, steps=steps,
                          guide_scale=guide_scale, shift=shift, solver=solver, seed=segment_seed,
                          callback=step, cancel=cancel, device=device, cache=cache)
        if prepare is not None:
            prepare("vae")
        with torch.no_grad():
            segment = vae.decode(latent.to(_device_of(vae)), tile=tile)[0].float().cpu()
        old, new = clip[:, -overlap:], segment[:, :overlap]
        drift = colour_drift(old, new)
        if colour_match:
            segment = match_colour(segment, old, new)
        after = colour_drift(old, segment[:, :overlap])
        start = clip.shape[1]
        clip = torch.cat([clip, segment[:, overlap:]], dim=1)
        log.info("extend: segment %d of %d (seed %d) added %d frames; colour drift %.4f -> "
                 "%.4f", k + 1, segments, segment_seed, frames - overlap, drift.size, after.size)
        if report is not None:
            report.append(SegmentReport(k + 1, segment_seed, frames - overlap, start, drift,
                                        after))
    return clip


def fit_video(video: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``[3, T, H, W]`` scaled to cover ``width x height`` (bilinear, antialiased when it
    shrinks) and centre-cropped there; unchanged when it already has that size."""
    _, t, h, w = video.shape
    if (h, w) == (height, width):
        return video
    scale = max(width / w, height / h)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    frames = video.float().permute(1, 0, 2, 3)                 # [T, 3, H, W]
    frames = F.interpolate(frames, size=(rh, rw), mode="bilinear", align_corners=False,
                           antialias=scale < 1)
    top, left = (rh - height) // 2, (rw - width) // 2
    frames = frames[:, :, top:top + height, left:left + width]
    return frames.permute(1, 0, 2, 3).contiguous().clamp(-1.0, 1.0)
