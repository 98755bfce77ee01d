"""Checks the command line runs before it loads any model: output path, device, images, model
files (from their headers only), and a rough memory estimate.

Each check raises ``UsageError`` (a ValueError) whose message names the problem and the fix;
the CLI prints it as one ``error: ...`` line and exits with status 2.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

import torch

from .conditioning import latent_frames
from .loading.checkpoint import (load_meta_state_dict, require_kind,
                                 source_name, strip_prefix)

GB = 1e9


class UsageError(ValueError):
    """A command-line value that cannot work; the message says what to use instead."""


# ------------------------------------------------------------------------------ output files

def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(path, option: str, *, formats: Optional[Iterable[str]] = None,
                      inputs: Iterable = (), overwrite: bool = False) -> Path:
    """Refuse an output that cannot be written or would destroy something.

    ``formats``: accepted suffixes (without dot). ``inputs``: ``(option, path)`` pairs of the
    run's input files, which are never overwritten. An existing file is replaced only with
    ``overwrite``; the folder (or its nearest existing parent) must be writable."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    if formats is not None:
        fmt = path.suffix.lower().lstrip(".")
        if fmt not in formats:
            raise UsageError(f"{option} {path}: unsupported format '{path.suffix or '(none)'}'; "
                             f"use {', '.join('.' + f for f in formats)}")
    for other_option, other in inputs:
        if other is not None and _same_file(path, Path(other)):
            raise UsageError(f"{option} {path} is the input file of {other_option}; "
                             "choose another output name (inputs are never overwritten)")
    if path.exists() and not overwrite:
        raise UsageError(f"{option} {path} already exists; pass --overwrite to replace it, or "
                         "choose another name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the folder {folder} is not writable")
    return path


def check_distinct_outputs(*outputs) -> None:
    """``(option, path)`` pairs of the outputs of one run must name different files."""
    seen = {}
    for option, path in outputs:
        if path is None:
            continue
        key = os.path.abspath(path)
        if key in seen:
            raise UsageError(f"{seen[key]} and {option} name the same file {path}")
        seen[key] = option


# ------------------------------------------------------------------------------ device, images

def check_device(text: Optional[str]) -> torch.device:
    """``--device`` -> torch.device; refuses devices this PyTorch build cannot use."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: this PyTorch ({torch.__version__}) has no CUDA "
                             "GPU available; use --device cpu or install a CUDA build")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"--device {text}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UsageError(f"--device {text}: unsupported device type; use cpu or cuda")
    return device


def read_image(path, option: str) -> torch.Tensor:
    """Load an input image now (cheap), so a bad file fails before the models load."""
    from .video_io import load_image

    try:
        return load_image(path)
    except (ValueError, OSError) as e:
        raise UsageError(f"{option}: {e}") from None


# ------------------------------------------------------------------------------ model files

def header_state_dict(path, kind: str = "dit") -> Optional[dict]:
    """What a model file holds, read the cheap way: a safetensors file (or sharded set) as meta
    tensors from its header, a GGUF through its memory map (a GGUF of another kind than
    ``kind`` is refused here, naming the right loader); None for other formats (checked when
    loaded)."""
    path = Path(path)
    name = path.name.lower()
    if path.is_file() and name.endswith(".gguf"):
        if kind == "text_encoder":
            from .loading.text_encoder import read_gguf_text_encoder

            return read_gguf_text_encoder(path)
        from .loading.checkpoint import KIND_NAMES
        from .loading.gguf import read_gguf

        # Only DiTs and text encoders come as GGUF: anything else is refused by its kind.
        return read_gguf(path, expect=("wan",) if kind == "dit" else (),
                         what=KIND_NAMES.get(kind, kind))
    if not (path.is_file() and name.endswith((".safetensors", ".sft", ".index.json"))):
        return None
    return load_meta_state_dict(path)


def peek_dit_config(path, vace_module=None):
    """The DiT config of a model file (with a separate VACE module attached, when given) read
    the cheap way (None for formats known only once loaded)."""
    from .loading.dit import attach_vace_module, describe_dit

    sd = header_state_dict(path)
    if sd is not None and vace_module is not None:
        require_kind(sd, "dit", path)
        module = header_state_dict(vace_module)
        sd = None if module is None else attach_vace_module(sd, module, path, vace_module)
    return None if sd is None else describe_dit(sd, path)[1]


def peek_vae_latent_channels(path) -> Optional[int]:
    """The latent channels (16: Wan 2.1 VAE, 48: Wan 2.2 VAE) from a safetensors header."""
    from .loading.vae import VAE_PREFIXES, diffusers_to_official, infer_config, is_diffusers_layout

    sd = header_state_dict(path, "vae")
    if sd is None:
        return None
    sd = strip_prefix(sd, VAE_PREFIXES)
    require_kind(sd, "vae", path)
    if is_diffusers_layout(sd):
        sd = diffusers_to_official(sd)
    return infer_config(sd, path).z_dim


def check_vae_matches(dit_channels: int, vae_channels: int, dit_name, vae_name) -> None:
    if dit_channels == vae_channels:
        return
    wanted = {48: "the Wan 2.2 VAE (wan2.2_vae.safetensors)",
              16: "the Wan 2.1 VAE (wan_2.1_vae.safetensors)"}.get(dit_channels,
                                                                   f"a {dit_channels}-channel VAE")
    raise UsageError(f"{source_name(dit_name)} works on {dit_channels}-channel latents but "
                     f"{source_name(vae_name)} makes {vae_channels}; use {wanted}")


def check_kind(path, kind: str) -> None:
    """Refuse a safetensors file that holds another kind of model (header only)."""
    sd = header_state_dict(path, kind)
    if sd is not None:
        require_kind(sd, kind, path)


# ------------------------------------------------------------------------------ memory

def total_memory(device: torch.device) -> Optional[int]:
    """Physical memory of ``device`` in bytes (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(width: int, height: int, frames: int, *, latent_channels: int = 16,
                    dim: Optional[int] = None, ffn_dim: Optional[int] = None,
                    cfg_batch: int = 2, weights: int = 0) -> dict:
    """A rough lower bound of the peak memory of one generation, in bytes.

    ``sampling``: the DiT's activations of one forward (hidden states, q/k/v, FFN) in float32
    for the CFG batch; ``video``: the decoded video and its frame copies in float32 / uint8;
    ``weights``: as given (file sizes). Attention is assumed memory-efficient (linear in the
    token count), so real peaks are higher, never lower."""
    stride = 16 if latent_channels == 48 else 8
    tokens = latent_frames(frames) * (height // stride // 2) * (width // stride // 2)
    sampling = 0
    if dim is not None:
        sampling = cfg_batch * tokens * (6 * dim + (ffn_dim or 4 * dim)) * 4
    pixels = frames * height * width * 3
    video = pixels * (4 + 4 + 1)     # decoded float32, frames float32, uint8
    return {"sampling": sampling, "video": video, "weights": weights,
            "total": weights + max(sampling, video)}


def check_memory(estimate: dict, device: torch.device, what: str) -> str:
    """Refuse when the estimate cannot fit the machine; return a one-line summary."""
    ram = total_memory(torch.device("cpu"))
    gpu = total_memory(device) if device.type == "cuda" else None
    if device.type == "cuda":
        if gpu is not None and estimate["sampling"] > gpu:
            raise UsageError(f"{what} needs at least {estimate['sampling'] / GB:,.1f} GB of GPU "
                             f"memory to sample, the GPU has {gpu / GB:.1f} GB; use a smaller "
                             "--size or fewer --frames")
        host_need = estimate["video"]
    else:
        host_need = estimate["total"]
    if ram is not None and host_need > ram:
        raise UsageError(f"{what} needs at least {host_need / GB:,.1f} GB of memory, this "
                         f"machine has {ram / GB:.1f} GB; use a smaller --size or fewer --frames")
    return f"estimated peak memory: at least {estimate['total'] / GB:.1f} GB"


def file_size(path) -> int:
    """Bytes of a model file, or of the files of a model folder."""
    if path is None:
        return 0
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return 0
