"""Writing and reading video files (mp4 / webm through PyAV, animated webp through Pillow).

Frames are ``[T, H, W, 3]`` float in 0..1 (ComfyUI's IMAGE layout) or uint8.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from pathlib import Path

import numpy as np
import torch

FORMATS = ("mp4", "webm", "webp")
# Largest image load_image accepts (pixels): far above any video size, far below a
# decompression bomb (Pillow's own limit warns at ~89 M pixels and refuses at twice that).
MAX_IMAGE_PIXELS = 64 * 2**20


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = True):
    """Yield a temporary path in ``path``'s folder; on success it is renamed to ``path``.

    Whatever stops the writer (an error, Ctrl-C) removes the temporary file, so ``path`` is
    either left as it was or replaced by a complete file, never by a partial one. With
    ``overwrite=False`` an existing ``path`` raises FileExistsError (and stays untouched).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:   # O_EXCL with mode 0o666: a fresh name, permissions as for any new file
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.part"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    mode = os.stat(tmp).st_mode & 0o777
    try:
        yield Path(tmp)
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} appeared while it was being written; not replaced")
        os.chmod(tmp, mode)    # a writer that replaced the file (safetensors) made it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[T, H, W, 3]`` float 0..1 (or uint8) -> uint8 numpy array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        if frames.is_floating_point() and not bool(torch.isfinite(frames).all()):
            raise ValueError("the frames contain NaN or infinite values (the model produced "
                             "invalid output); nothing was written")
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


def write_video(path: str | Path, frames, fps: float = 16.0, quality: int = 19,
                overwrite: bool = True) -> Path:
    """Write frames to ``path``; the container follows the suffix (.mp4, .webm, .webp).

    ``quality``: CRF for mp4 (H.264) and webm (VP9), lower is better; webp uses 100 - quality*2.
    mp4 needs even width/height (H.264 4:2:0); odd sizes are padded by one pixel.
    The file is written to a temporary name beside ``path`` and renamed when complete (an
    interrupted write leaves nothing behind). The encoders run single-threaded with bit-exact
    container settings, so the same frames always give the same bytes, on any machine.
    ``overwrite=False``: raise FileExistsError rather than replace an existing file.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"unsupported video format '{fmt}'; use one of {', '.join(FORMATS)}")
    if not (isinstance(fps, (int, float)) and np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number (got {fps!r})")
    data = to_uint8_frames(frames)
    if data.shape[0] == 0:
        raise ValueError("no frames to write")
    with atomic_output(path, overwrite) as tmp:
        _encode(tmp, fmt, data, fps, quality)
    return path


def _encode(path: Path, fmt: str, data: np.ndarray, fps: float, quality: int) -> None:
    if fmt == "webp":
        from PIL import Image

        images = [Image.fromarray(f) for f in data]
        images[0].save(path, format="WEBP", save_all=True, append_images=images[1:], loop=0,
                       duration=max(1, round(1000 / fps)), quality=max(1, 100 - 2 * quality),
                       lossless=False)
        return
    import av

    if fmt == "mp4":
        pad_h, pad_w = data.shape[1] % 2, data.shape[2] % 2
        if pad_h or pad_w:
            data = np.pad(data, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    # mbtree off: with x264's macroblock tree on, the same frames gave different bytes in one
    # process after a VP9 write at some sizes (heights 48, 80, 112 px seen; 64, 128, 144 not),
    # as if it read memory left by earlier frees (tests/test_bad_input.py). Off, the files are
    # larger at a given CRF but also better (demo clip: 1.9x the bytes, +1.1 dB).
    codec, options = ("libx264", {"crf": str(quality), "preset": "medium", "mbtree": "0"}) \
        if fmt == "mp4" else ("libvpx-vp9", {"crf": str(quality + 12), "b": "0"})
    from fractions import Fraction

    # fflags=+bitexact: no creation date or random ids in the container (webm); one encoder
    # thread: x264's output depends on its thread count, which would follow the CPU count.
    with av.open(str(path), mode="w", format=fmt, options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = data.shape[2], data.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = options
        stream.codec_context.thread_count = 1
        for frame in data:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode a video file to ``([T, H, W, 3] uint8, fps)``."""
    path = Path(path)
    if path.suffix.lower() == ".webp":
        from PIL import Image, ImageSequence

        with Image.open(path) as img:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)]
            duration = img.info.get("duration") or 62.5     # 0 or missing: 16 fps
        return np.stack(frames), 1000.0 / duration
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 16)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack(frames), fps


def load_image(path: str | Path) -> torch.Tensor:
    """An image file -> ``[3, H, W]`` float32 in [-1, 1] (RGB).

    Raises ValueError (FileNotFoundError for a missing file) with a readable message for a
    folder, a file that is not an image, a truncated image, or an image above
    ``MAX_IMAGE_PIXELS`` (a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError("too many pixels")
                data = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image Pillow can read (png, jpg, webp, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{path} is too large an image (more than {MAX_IMAGE_PIXELS:,} pixels, "
                         "possibly a decompression bomb); resize it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path} is truncated or damaged and cannot be read as an image "
                         f"({e})") from None
    return torch.from_numpy(data).permute(2, 0, 1) * 2 - 1


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


def load_video(path: str | Path) -> torch.Tensor:
    """A video file (mp4, webm, webp, mkv, ...) -> ``[3, T, H, W]`` float32 in [-1, 1].

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for one that
    cannot be decoded or holds no frames."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a video file")
    try:
        frames, _ = read_video(path)
    except (OSError, ValueError, IndexError, SyntaxError) as e:
        raise ValueError(f"{path} cannot be read as a video ({e}); give an mp4, webm or "
                         "animated webp") from None
    if frames.shape[0] == 0:
        raise ValueError(f"{path} holds no frames")
    return frames_to_video(torch.from_numpy(frames).float() / 255.0)


def load_mask(path: str | Path) -> torch.Tensor:
    """A mask file -> ``[1, T, H, W]`` float32 in 0..1 (white = 1): a video of masks, or one
    image (T = 1) that stands for every frame. Colour masks are read as their luminance."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image = load_image(path)                          # [3, H, W] in [-1, 1]
        video = image[:, None]
    else:
        video = load_video(path)
    rgb = (video + 1) / 2
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return luma[None].clamp(0, 1)
