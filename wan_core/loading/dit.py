"""Wan DiT files -> :class:`~wan_core.models.dit.WanDiT`: key layout, variant and dtype."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..models.attention import resolve_backend
from ..models.block_compile import compile_blocks
from ..models.configs import ConfigError, detect_dit_config
from ..models.dit import WanDiT
from ..ops import is_fp8
from .assign import assign_state_dict, convert_tensors
from .checkpoint import (CheckpointError, load_meta_state_dict, load_state_dict,
                         read_safetensors_header, require_kind, source_name)
from .dit_layouts import LayoutError, to_official_layout

_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype) -> Optional[torch.dtype]:
    """None, a torch float dtype, or one of 'fp32', 'bf16', 'fp16' (and long names)."""
    if dtype is None or dtype == "auto" or dtype == "default":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute dtype must be float32, bfloat16 or float16, not {dtype}")
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use 'fp32', 'bf16' or 'fp16'") from None


def stored_dtype(sd) -> torch.dtype:
    """The dtype most of the matrix weights are stored in."""
    counts: dict = {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.dim() >= 2:
            counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def default_compute_dtype(stored: torch.dtype) -> torch.dtype:
    """fp32 / bf16 / fp16 files compute in their own dtype; fp8 (and others) in bf16."""
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


def _read_metadata(source) -> dict:
    """Extra config for the head count: safetensors ``__metadata__`` or a config.json next to
    a sharded checkpoint / inside a model folder."""
    if not isinstance(source, (str, bytes)) and not hasattr(source, "__fspath__"):
        return {}
    path = Path(source)
    meta: dict = {}
    if path.is_file() and path.suffix in (".safetensors", ".sft"):
        meta.update(read_safetensors_header(path).get("__metadata__") or {})
    folder = path if path.is_dir() else path.parent if path.name.endswith(".index.json") else None
    if folder is not None and (folder / "config.json").is_file():
        try:
            meta.update(json.loads((folder / "config.json").read_text()))
        except (ValueError, OSError):
            pass
    return meta


def _stored_weight_dtype(weight_dtype) -> Optional[torch.dtype]:
    """None (keep the file's), or fp8 to store bf16 / fp16 / fp32 Linear weights as fp8."""
    if weight_dtype is None or weight_dtype in ("default", "auto"):
        return None
    names = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
    name = names.get(str(weight_dtype), str(weight_dtype).replace("torch.", ""))
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not is_fp8(dtype):
        raise ValueError(f"weight_dtype must be 'fp8_e4m3fn' or 'fp8_e5m2' (or None to keep the "
                         f"file's), got {weight_dtype!r}; set the compute dtype with dtype=")
    return dtype


def describe_dit(sd: dict, source, dtype=None, num_heads: Optional[int] = None):
    """``(state dict in the official layout, DiTConfig, compute dtype)`` for a DiT state dict
    (real or meta tensors: only names, shapes and dtypes are looked at)."""
    compute = parse_dtype(dtype)
    require_kind(sd, "dit", source)
    try:
        sd = to_official_layout(sd)
        cfg = detect_dit_config(sd, num_heads=num_heads, metadata=_read_metadata(source))
    except (ConfigError, LayoutError) as e:
        raise CheckpointError(f"{source_name(source)}: {e}") from None
    return sd, cfg, compute or default_compute_dtype(stored_dtype(sd))


def attach_vace_module(sd: dict, module: dict, source, module_source) -> dict:
    """The state dict of a base model with a separate VACE module's weights added (the
    wrapper's ``Wan2_1-VACE_module_*`` files: only ``vace_*`` tensors, any layout). Both are
    renamed to the official layout first; a module for another model size, a module that
    holds other weights, or a base that already has VACE weights is refused."""
    base, name = to_official_layout(sd), source_name(module_source)
    module = to_official_layout(module)
    other = [k for k in module if not k.startswith("vace_")]
    if other:
        raise CheckpointError(f"{name} is not a VACE module: besides vace_* weights it holds "
                              f"{', '.join(other[:3])}; give a VACE module file (or load a "
                              "whole VACE model as the diffusion model)")
    if "vace_patch_embedding.weight" not in module:
        raise CheckpointError(f"{name} has no vace_patch_embedding; it is not a complete VACE "
                              "module")
    if any(k.startswith("vace_") for k in base):
        raise CheckpointError(f"{source_name(source)} already has VACE weights; load it alone "
                              f"(without {name})")
    dim = tuple(base["patch_embedding.weight"].shape)[0] if "patch_embedding.weight" in base \
        else None
    module_dim = tuple(module["vace_patch_embedding.weight"].shape)[0]
    if dim is not None and dim != module_dim:
        sizes = {1536: "1.3B", 5120: "14B"}
        raise CheckpointError(
            f"{name} is a VACE module for a dim-{module_dim} model "
            f"({sizes.get(module_dim, 'custom')}) but {source_name(source)} has dim {dim} "
            f"({sizes.get(dim, 'custom')}); use the module made for this base model size")
    return {**base, **module}


def read_dit(source, vace_module=None, meta: bool = False) -> dict:
    """The state dict of a DiT file (values, or meta tensors read from headers with
    ``meta``), with a separate VACE module's weights attached when given."""
    read = load_meta_state_dict if meta else load_state_dict
    sd = read(source)
    if vace_module is None:
        return sd
    require_kind(sd, "dit", source)
    return attach_vace_module(sd, read(vace_module), source, vace_module)


COMPUTE_MODES = (None, "default", "fp8")


def enable_compute(model: WanDiT, compute) -> WanDiT:
    """``compute='fp8'``: multiply the fp8-stored Linears in fp8 (``wan_core.ops.fp8``); one
    warning and the bf16 path where no weight is stored in fp8, or (at the first call) where
    the device cannot multiply in fp8."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be None or 'fp8' (got {compute!r})")
    if compute != "fp8":
        return model
    from ..ops.fp8 import set_fp8_compute

    if set_fp8_compute(model) == 0:
        warnings.warn("compute='fp8': no Linear weight of this model is stored in fp8 "
                      "(e4m3); use an fp8 / fp8_scaled file or weight_dtype='fp8_e4m3fn'. The "
                      "model multiplies in bf16", stacklevel=3)
    return model


def load_dit(source, dtype=None, device="cpu", attention: str = "sdpa",
             num_heads: Optional[int] = None, weight_dtype=None, vace_module=None,
             compute=None, compile: bool = False) -> WanDiT:
    """Load a Wan DiT from a file, folder, index json or state dict.

    dtype: compute dtype ('fp32', 'bf16', 'fp16' or a torch dtype); None keeps the file's
    dtype for fp32/bf16/fp16 files and computes fp8 files in bf16. fp8 matrix weights stay
    fp8 in memory and are cast one layer at a time. weight_dtype: 'fp8_e4m3fn' / 'fp8_e5m2'
    stores the Linear weights of a wider file in fp8 (half the memory of bf16); None keeps the
    file's. num_heads: only needed for custom models whose dim is not a multiple of 128 and
    whose file carries no ``num_heads`` metadata. vace_module: a separate VACE module file (or
    state dict) attached to this base model (makes a VACE model; see
    :func:`attach_vace_module`). compute: 'fp8' multiplies the fp8-stored Linears in fp8
    (``torch._scaled_mm``, the activation quantised per token; :func:`enable_compute`).
    compile: run the transformer blocks through one ``torch.compile`` of the block, shared by
    all of them (``wan_core.models.block_compile``; compiled at the first forward, one warning
    and the eager model where compiling fails). The model is built on the meta device and the
    loaded tensors are assigned to it.
    """
    resolve_backend(attention)
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be None or 'fp8' (got {compute!r})")
    mode = compute
    stored = _stored_weight_dtype(weight_dtype)
    sd, cfg, compute = describe_dit(read_dit(source, vace_module), source, dtype, num_heads)
    with torch.device("meta"):
        model = WanDiT(cfg, compute, attention)
    missing = sorted(set(model.state_dict()) - set(sd))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{source_name(source)} is missing {len(missing)} tensor(s) of the "
                              f"detected {cfg.variant} ({cfg.model_type}): "
                              f"{', '.join(missing[:5])}{more}; the file is incomplete or "
                              "damaged, download it again")
    convert_tensors(sd, model, compute, device, linear_dtype=stored)
    try:
        assign_state_dict(model, sd, dtype=None, device=device)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise CheckpointError(f"{source_name(source)} does not match the detected "
                              f"{cfg.variant} ({cfg.model_type}) architecture: "
                              f"{' '.join(lines[:4])[:600]}") from None
    del sd
    model = enable_compute(model.eval().requires_grad_(False), mode)
    if compile:
        compile_blocks(model)
    return model
