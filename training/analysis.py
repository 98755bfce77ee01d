"""Reading back what a generated demo clip shows: background, object colour, motion, shape.

Frames are ``[T, H, W, 3]``: uint8 (0..255) or float (0..1, ComfyUI's IMAGE convention); numpy
arrays or torch tensors. A dataset/VAE video ``[3, T, H, W]`` in [-1, 1] is converted with
:func:`video_to_frames`. The estimates are built to survive what a tiny model produces: blur
(half-maximum thresholds keep edges where they were), noise (a 3x3 box filter before any
threshold), washed-out colours (nearest named colour).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .dataset import (BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, ClipSpec, Combo, coverage,
                      parse_caption)

MIN_CONTRAST = 0.15     # an object must differ from the background by this much (RGB, 0..1)
BORDER = 2              # pixels of the frame edge used to estimate the background


@dataclass
class Analysis:
    """What :func:`analyse` read from a clip; names are ``None`` when no object was found."""
    background: str
    background_rgb: tuple
    colour: Optional[str]
    colour_rgb: Optional[tuple]
    direction: Optional[str]
    displacement: tuple     # (dx, dy) in pixels from the first to the last frame, y down
    shape: Optional[str]
    shape_iou: dict         # mean IoU of the object's mask with each shape's template
    object_frames: int      # frames in which an object was found


def as_frames(frames) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 or float 0..1 (numpy or torch) -> float32 numpy in 0..1."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().float().numpy() if frames.dtype != torch.uint8 \
            else frames.cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] (got shape {tuple(frames.shape)}); "
                         "convert a [3, T, H, W] video with video_to_frames")
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    return np.clip(frames.astype(np.float32), 0.0, 1.0)


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, T, H, W]`` (or ``[1, 3, T, H, W]``) in [-1, 1] -> float32 ``[T, H, W, 3]`` in 0..1."""
    if video.ndim == 5:
        video = video[0]
    return ((video.detach().cpu().float().permute(1, 2, 3, 0).numpy() + 1.0) / 2.0).clip(0, 1)


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 box filter over axes 1, 2 of [T, H, W, ...] with edge replication."""
    p = np.pad(x, [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 3), mode="edge")
    h, w = x.shape[1:3]
    return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    names = list(palette)
    ref = np.asarray([palette[n] for n in names], np.float32) / 255.0
    return names[int(np.argmin(((ref - rgb) ** 2).sum(axis=1)))]


def _template_iou(mask: np.ndarray, shape: str) -> float:
    """IoU of a binary mask [H, W] with ``shape`` drawn at the mask's centroid and area.

    Blur rounds corners but keeps area and centroid at the half-maximum level, so the right
    template still overlaps best."""
    h, w = mask.shape
    area = mask.sum() / (h * w)                       # fraction of the frame
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    if shape == "circle":
        half = np.sqrt(area / np.pi)
    elif shape == "square":
        half = np.sqrt(area) / 2
    else:                                             # triangle: centroid a third below centre
        half = np.sqrt(area / 2)
        cy -= half / 3
    template = coverage(shape, cx, cy, half, w) >= 0.5
    return float((template & mask).sum() / max((template | mask).sum(), 1))


def _contrast(x: np.ndarray):
    """``(background per frame [T, 3], distance of every denoised pixel from its frame's
    background [T, H, W], robust per-frame peak of that distance [T] (mean of the k largest:
    the object's contrast), frames where an object is present [T] bool)``."""
    t_len, h, w, _ = x.shape
    edges = (x[:, :BORDER], x[:, -BORDER:], x[:, :, :BORDER], x[:, :, -BORDER:])
    border = np.concatenate([e.reshape(t_len, -1, 3) for e in edges], axis=1)   # [T, N, 3]
    bg_per_frame = np.median(border, axis=1)                          # [T, 3]
    dist = np.linalg.norm(_box3(x) - bg_per_frame[:, None, None], axis=-1)    # [T, H, W]
    k = max(3, h * w // 400)
    peak = np.sort(dist.reshape(t_len, -1), axis=1)[:, -k:].mean(axis=1)      # [T]
    present = (peak >= MIN_CONTRAST) & (peak >= 0.4 * peak.max())
    return bg_per_frame, dist, peak, present


def _centre(dist: np.ndarray, peak: float) -> tuple[float, float]:
    """Contrast-weighted centroid (x, y) in pixels of the half-maximum region of one frame."""
    h, w = dist.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    wgt = dist * (dist >= 0.5 * peak)
    return float((wgt * xs).sum() / wgt.sum()), float((wgt * ys).sum() / wgt.sum())


def object_centres(frames) -> np.ndarray:
    """The object's centroid per frame, ``[T, 2]`` (x, y) in pixels (pixel i spans i - 0.5 ..
    i + 0.5, y down); NaN in frames where no object is found (as :func:`analyse` finds it)."""
    x = as_frames(frames)
    _, dist, peak, present = _contrast(x)
    out = np.full((x.shape[0], 2), np.nan, np.float32)
    for t in np.flatnonzero(present):
        out[t] = _centre(dist[t], peak[t])
    return out


def analyse(frames) -> Analysis:
    """Estimate background, object colour, direction and shape of a clip ``[T, H, W, 3]``."""
    x = as_frames(frames)
    t_len, h, w, _ = x.shape
    bg_per_frame, dist, peak, present = _contrast(x)
    bg_rgb = np.median(bg_per_frame, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    none = Analysis(background, tuple(bg_rgb.round(3)), None, None, None, (0.0, 0.0), None, {}, 0)
    if not present.any():
        return none

    core_pixels, centres, times = [], [], []
    iou = {name: 0.0 for name in SHAPES}
    for t in np.flatnonzero(present):
        mask = dist[t] >= 0.5 * peak[t]
        core = dist[t] >= 0.8 * peak[t]
        core_pixels.append(x[t][core])
        centres.append(_centre(dist[t], peak[t]))
        times.append(t)
        for name in SHAPES:
            iou[name] += _template_iou(mask, name) / present.sum()

    colour_rgb = np.median(np.concatenate(core_pixels), axis=0)
    colour = _nearest(colour_rgb, COLOURS)
    shape = max(iou, key=iou.get)

    direction, disp = None, (0.0, 0.0)
    if len(times) >= 2:
        tt = np.asarray(times, np.float32)
        c = np.asarray(centres, np.float32)
        slope = np.polyfit(tt, c, 1)[0]                               # px per frame, (x, y)
        disp = tuple(float(s) * (t_len - 1) for s in slope)
        axis = int(abs(slope[1]) > abs(slope[0]))
        step = [0, 0]
        step[axis] = 1 if slope[axis] > 0 else -1
        direction = next(n for n, d in DIRECTIONS.items() if tuple(d) == tuple(step))

    return Analysis(background, tuple(bg_rgb.round(3)), colour, tuple(colour_rgb.round(3)),
                    direction, disp, shape,
                    {k: round(v, 3) for k, v in iou.items()}, len(times))


def check_prompt(frames, spec: Union[ClipSpec, Combo, str]) -> dict:
    """Per-attribute agreement of a clip with what was asked (a spec, combo or caption).

    Returns ``{"colour", "direction", "background", "shape": bool, "prompt": bool}``, where
    ``prompt`` (the adherence figure) is colour, direction and background all right."""
    combo = parse_caption(spec) if isinstance(spec, str) else getattr(spec, "combo", spec)
    found = analyse(frames)
    ok = {attr: getattr(found, attr) == getattr(combo, attr)
          for attr in ("colour", "direction", "background", "shape")}
    ok["prompt"] = ok["colour"] and ok["direction"] and ok["background"]
    return ok


def psnr(a, b) -> float:
    """PSNR in dB of two frame stacks ``[..., H, W, 3]`` (uint8 or float 0..1), peak 1.0."""
    a, b = (as_frames(v if np.ndim(v) == 4 else v[None]) for v in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes (got {a.shape} and {b.shape})")
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


# --------------------------------------------------------------------------------------------
# Shape fidelity (issue 27): the three shapes fitted to every frame
# --------------------------------------------------------------------------------------------

FIT_SUPERSAMPLE = 2          # template anti-aliasing while fitting (4 renders the clips)


def object_map(frame: np.ndarray, bg_rgb: np.ndarray, fg_rgb: np.ndarray) -> np.ndarray:
    """How much each pixel of one frame ``[H, W, 3]`` looks like the object: the projection of
    ``pixel - background`` on ``object - background``, clipped to 0..1 (``[H, W]``; a rendered
    clip gives exactly its anti-aliased coverage)."""
    axis = np.asarray(fg_rgb, np.float32) - np.asarray(bg_rgb, np.float32)
    m = ((frame - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6)
    return np.clip(m, 0.0, 1.0)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def _template(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    n = size * FIT_SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    y, x = coords[:, None], coords[None, :]
    u, v = (x - cx) / half, (y - cy) / half
    if shape == "circle":
        inside = u * u + v * v <= 1.0
    elif shape == "square":
        inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    else:
        inside = (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    return inside.reshape(size, FIT_SUPERSAMPLE, size, FIT_SUPERSAMPLE).mean(axis=(1, 3))


def fit_shape(m: np.ndarray, shape: str) -> tuple[float, tuple]:
    """Best soft IoU of ``shape`` with an object map ``m`` [H, W] (square frames), its centre
    and size fitted: ``(iou, (cx, cy, half))`` in fractions of the frame. Starts from the map's
    moments and refines centre and size by a shrinking coordinate search."""
    size = m.shape[0]
    total = float(m.sum())
    if total <= 0:
        return 0.0, (0.5, 0.5, 0.1)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    cx = float((m * (xs + 0.5)).sum() / total) / size
    cy = float((m * (ys + 0.5)).sum() / total) / size
    area = total / size ** 2
    half = {"circle": np.sqrt(area / np.pi), "square": np.sqrt(area) / 2,
            "triangle": np.sqrt(area / 2)}[shape]
    if shape == "triangle":
        cy -= half / 3                                # the box centre sits above the centroid
    best = (_soft_iou(m, _template(shape, cx, cy, half, size)), (cx, cy, half))
    step = 1.0 / size
    while step >= 0.24 / size:
        improved = True
        while improved:
            improved = False
            cx, cy, half = best[1]
            for cand in ((cx + step, cy, half), (cx - step, cy, half), (cx, cy + step, half),
                         (cx, cy - step, half), (cx, cy, half + step / 2),
                         (cx, cy, max(half - step / 2, 1.0 / size))):
                iou = _soft_iou(m, _template(shape, *cand, size))
                if iou > best[0] + 1e-6:
                    best, improved = (iou, cand), True
        step /= 2
    return best


def shape_fidelity(frames, shape: str, background=None, colour=None) -> dict:
    """Per-frame shape fits of a clip ``[T, H, W, 3]`` asked to show ``shape``.

    The object map uses the named ``background`` / ``colour`` RGB when given (the prompt's),
    else the estimates of :func:`analyse`. Returns ``{"right": share of object frames whose best
    fit is ``shape``, "fit": mean soft IoU of ``shape``'s fit, "frames": object frames,
    "per_shape": mean IoU of each shape}``; frames without an object count as wrong with fit 0."""
    x = as_frames(frames)
    bg_per_frame, _, _, present = _contrast(x)
    found = analyse(x) if colour is None or background is None else None
    bg = np.asarray(BACKGROUNDS[background], np.float32) / 255 if background else \
        np.asarray(found.background_rgb, np.float32)
    fg = np.asarray(COLOURS[colour], np.float32) / 255 if colour else \
        np.asarray(found.colour_rgb if found.colour_rgb else bg, np.float32)
    right, fits, per_shape = 0, [], {name: [] for name in SHAPES}
    for t in range(x.shape[0]):
        if not present[t]:
            fits.append(0.0)
            continue
        m = object_map(x[t], bg, fg)
        ious = {name: fit_shape(m, name)[0] for name in SHAPES}
        for name in SHAPES:
            per_shape[name].append(ious[name])
        right += max(ious, key=ious.get) == shape
        fits.append(ious[shape])
    return {"right": right / x.shape[0], "fit": float(np.mean(fits)),
            "frames": int(present.sum()),
            "per_shape": {k: float(np.mean(v)) if v else 0.0 for k, v in per_shape.items()}}
