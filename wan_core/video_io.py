"""Writing and reading video files (mp4 / webm through PyAV, animated webp through Pillow).

Frames are ``[T, H, W, 3]`` float in 0..1 (ComfyUI's IMAGE layout) or uint8.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FORMATS = ("mp4", "webm", "webp")


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[T, H, W, 3]`` float 0..1 (or uint8) -> uint8 numpy array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        if frames.dtype != torch.uint8:
            frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
        frames = frames.numpy()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3]; got {frames.shape}")
    return np.ascontiguousarray(frames)


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """A decoded video ``[3, T, H, W]`` in [-1, 1] -> frames ``[T, H, W, 3]`` in 0..1."""
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).contiguous()


def frames_to_video(frames: torch.Tensor) -> torch.Tensor:
    """Frames ``[T, H, W, 3]`` in 0..1 -> a video ``[3, T, H, W]`` in [-1, 1]."""
    return (frames.float() * 2 - 1).permute(3, 0, 1, 2).contiguous()


def write_video(path: str | Path, frames, fps: float = 16.0, quality: int = 19) -> Path:
    """Write frames to ``path``; the container follows the suffix (.mp4, .webm, .webp).

    ``quality``: CRF for mp4 (H.264) and webm (VP9), lower is better; webp uses 100 - quality*2.
    mp4 needs even width/height (H.264 4:2:0); odd sizes are padded by one pixel.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"unsupported video format '{fmt}'; use one of {', '.join(FORMATS)}")
    data = to_uint8_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "webp":
        from PIL import Image

        images = [Image.fromarray(f) for f in data]
        images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                       duration=max(1, round(1000 / fps)), quality=max(1, 100 - 2 * quality),
                       lossless=False)
        return path
    import av

    if fmt == "mp4":
        pad_h, pad_w = data.shape[1] % 2, data.shape[2] % 2
        if pad_h or pad_w:
            data = np.pad(data, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    codec, options = ("libx264", {"crf": str(quality), "preset": "medium"}) if fmt == "mp4" \
        else ("libvpx-vp9", {"crf": str(quality + 12), "b": "0"})
    from fractions import Fraction

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = data.shape[2], data.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = options
        for frame in data:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode a video file to ``([T, H, W, 3] uint8, fps)``."""
    path = Path(path)
    if path.suffix.lower() == ".webp":
        from PIL import Image, ImageSequence

        with Image.open(path) as img:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)]
            duration = img.info.get("duration", 62.5)
        return np.stack(frames), 1000.0 / duration
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 16)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack(frames), fps


def load_image(path: str | Path) -> torch.Tensor:
    """An image file -> ``[3, H, W]`` float32 in [-1, 1] (RGB)."""
    from PIL import Image

    with Image.open(path) as img:
        data = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(data).permute(2, 0, 1) * 2 - 1
