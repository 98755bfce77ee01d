"""Context windows: sample a latent longer than the model was trained on as overlapping
temporal windows of the model's length.

At every step each window of latent frames is evaluated as a clip of its own (its RoPE
positions start at 0, as the anchors do), with its own slice of the frame-aligned conditioning
(the I2V mask + image latent, VACE controls) and its own step-cache state, and the windows'
velocities are blended where they overlap with weights that sum to 1 on every frame. The solver
then steps the whole latent. Only one window is in the model at a time, so the peak memory is
that of one window (plus the long latent itself, which is small).

Windows are counted in latent frames: ``frames`` pixel frames (4n+1) make ``(frames - 1) / 4 +
1`` latent frames and ``overlap`` pixel frames (a multiple of 4) ``overlap / 4``.

- schedule ``static``: the same windows every step, the first at frame 0, the last ending at the
  last frame, the others a stride (window - overlap) apart;
- schedule ``uniform``: on odd steps the grid of inner windows moves by half a stride, so no
  window edge stays at one frame for the whole run (the step cache needs ``static``: it keeps
  one state per window);
- blend ``linear``: full weight inside a window, ramping down over the overlap at an edge shared
  with another window; ``pyramid``: a triangle peaking at the window's centre.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

SCHEDULES = ("static", "uniform")
BLENDS = ("linear", "pyramid")
TEMPORAL_STRIDE = 4
# Model inputs laid out on the latent's frame axis (dim 2), sliced per window; the others
# (text, CLIP tokens, scales) are shared by every window.
FRAME_INPUTS = ("y", "vace_context")


@dataclass(frozen=True)
class ContextWindows:
    """Context-window settings (pixel frames): ``frames`` per window (4n+1, the model's
    length: 81 for Wan 2.1 / 2.2 14B, 121 for TI2V-5B), ``overlap`` between windows (a
    multiple of 4, below ``frames``), ``schedule`` and ``blend`` (see the module docstring)."""

    frames: int = 81
    overlap: int = 16
    schedule: str = "static"
    blend: str = "linear"

    def __post_init__(self):
        if not isinstance(self.frames, int) or self.frames < 5 or (self.frames - 1) % 4:
            raise ValueError(f"context window frames must be 4n+1 and at least 5 (got "
                             f"{self.frames}); e.g. 81")
        if not isinstance(self.overlap, int) or self.overlap < 0 or self.overlap % 4:
            raise ValueError(f"context overlap must be a multiple of 4 frames, 0 or more (got "
                             f"{self.overlap}); e.g. 16")
        if self.overlap >= self.frames - 1:
            raise ValueError(f"context overlap ({self.overlap} frames) must be smaller than the "
                             f"window ({self.frames} frames) minus 1; e.g. 16 for 81")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"context schedule must be one of {', '.join(SCHEDULES)} (got "
                             f"{self.schedule!r})")
        if self.blend not in BLENDS:
            raise ValueError(f"context blend must be one of {', '.join(BLENDS)} (got "
                             f"{self.blend!r})")

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // TEMPORAL_STRIDE + 1

    @property
    def latent_overlap(self) -> int:
        return self.overlap // TEMPORAL_STRIDE

    def windows(self, total: int, step: int = 0) -> list:
        """``[(start, length)]`` of the windows covering ``total`` latent frames at ``step``."""
        return plan_windows(total, self.latent_frames, self.latent_overlap,
                            shift=self.schedule == "uniform" and step % 2 == 1)


def plan_windows(total: int, length: int, overlap: int, shift: bool = False) -> list:
    """Windows of ``length`` latent frames covering ``[0, total)``: the first starts at 0, the
    last ends at ``total``, inner ones are ``length - overlap`` apart (moved by half of that
    with ``shift``). One window when the latent is no longer than one."""
    if total <= length:
        return [(0, total)]
    stride = length - overlap
    last = total - length
    offset = stride // 2 if shift else 0
    starts = {0, last}
    start = stride - offset if shift else stride
    while start < last:
        starts.add(start)
        start += stride
    ordered = sorted(starts)
    # A shifted grid may leave a gap after the first window: close it.
    filled = [ordered[0]]
    for s in ordered[1:]:
        while s - filled[-1] > stride:
            filled.append(filled[-1] + stride)
        filled.append(s)
    return [(s, length) for s in sorted(set(filled))]


def window_weights(start: int, length: int, total: int, overlap: int,
                   blend: str) -> torch.Tensor:
    """Unnormalised blend weights ``[length]`` (float64) of a window's frames."""
    i = torch.arange(length, dtype=torch.float64)
    if blend == "pyramid":
        return torch.minimum(i + 1, length - i)
    ramp = float(overlap + 1)
    left = torch.ones(length, dtype=torch.float64) if start == 0 else \
        ((i + 1) / ramp).clamp(max=1.0)
    right = torch.ones(length, dtype=torch.float64) if start + length >= total else \
        ((length - i) / ramp).clamp(max=1.0)
    return torch.minimum(left, right)


def blend_plan(windows: Sequence, total: int, overlap: int, blend: str) -> list:
    """``[(start, length, weights [length])]`` with weights normalised so that every frame's
    weights over the windows covering it sum to 1."""
    raw = [window_weights(s, n, total, overlap, blend) for s, n in windows]
    norm = torch.zeros(total, dtype=torch.float64)
    for (s, n), w in zip(windows, raw):
        norm[s:s + n] += w
    if bool((norm <= 0).any()):
        raise ValueError("context windows leave a frame uncovered")
    return [(s, n, w / norm[s:s + n]) for (s, n), w in zip(windows, raw)]


def slice_inputs(inputs: Mapping, start: int, length: int, prefix: int) -> dict:
    """A window's model inputs: frame-aligned ones (``FRAME_INPUTS``) cut to frames
    ``[start, start + length)`` of the video part, after the ``prefix`` leading frames (VACE
    reference frames) which every window keeps."""
    out = {}
    for key, value in inputs.items():
        if key in FRAME_INPUTS and value is not None:
            out[key] = _slice(value, start, length, prefix)
        else:
            out[key] = value
    return out


def _slice(value, start: int, length: int, prefix: int):
    if isinstance(value, (list, tuple)):
        return [_slice(v, start, length, prefix) for v in value]
    head = value[:, :, :prefix]
    body = value[:, :, prefix + start:prefix + start + length]
    return torch.cat([head, body], dim=2) if prefix else body


def windowed_velocity_fn(settings: ContextWindows, total: int, prefix: int,
                         make_window_fn: Callable[[int, int], Callable]) -> Callable:
    """``velocity_fn(x, t)`` over a latent of ``prefix + total`` frames from per-window ones.

    ``make_window_fn(start, length)`` returns the velocity function of one window (made once
    per window and kept: its step cache and expert state are its own); it is called with the
    window's latent ``[B, C, prefix + length, h, w]``. The prefix frames (VACE reference
    images) are in every window; their velocity is the windows' mean."""
    functions: dict = {}
    step = [0]

    def velocity_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        windows = settings.windows(total, step[0])
        step[0] += 1
        plan = blend_plan(windows, total, settings.latent_overlap, settings.blend)
        out = torch.zeros_like(x, dtype=torch.float32)
        for start, length, weights in plan:
            key = (start, length)
            if key not in functions:
                functions[key] = make_window_fn(start, length)
            window = _slice(x, start, length, prefix)
            v = functions[key](window, t).float()
            w = weights.to(device=x.device, dtype=torch.float32).view(1, 1, -1, 1, 1)
            out[:, :, prefix + start:prefix + start + length] += v[:, :, prefix:] * w
            if prefix:
                out[:, :, :prefix] += v[:, :, :prefix] / len(plan)
        return out

    return velocity_fn


def context_windows_for(value) -> Optional[ContextWindows]:
    """None, a :class:`ContextWindows`, or a mapping of its fields."""
    if value is None or isinstance(value, ContextWindows):
        return value
    if isinstance(value, Mapping):
        return ContextWindows(**value)
    raise TypeError(f"context_windows must be None or ContextWindows (got "
                    f"{type(value).__name__})")
