"""Reading checkpoint files into state dicts, and telling what kind of model a file holds.

Everything the loaders share lives here: safetensors (memory-mapped), pickled ``.pth`` files
(always ``weights_only=True``), folders of sharded safetensors with an index json, prefix
stripping, and the clear errors a user sees for a truncated file, a wrong file type, or a file
that holds a different model than the loader expects.

No function here keeps a second copy of the weights: safetensors are read lazily from a memory
map and pickles are loaded with ``mmap=True``.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Union

import torch

from ..errors import CheckpointError

StateDict = dict  # dict[str, torch.Tensor]
Source = Union[str, os.PathLike, Mapping]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")




# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------

def load_state_dict(source: Source, warn_non_finite: bool = True) -> StateDict:
    """Return the tensors of ``source`` as a flat ``{name: tensor}`` dict.

    ``source`` may be a state dict (returned as a shallow copy), a ``.safetensors`` file, a
    pickled ``.pth``/``.pt``/``.ckpt``/``.bin`` file, a ``*.safetensors.index.json`` file, a
    folder holding one safetensors file or a sharded set with its index json, or a Wan ``.gguf``
    file (quantised tensors come back as ``wan_core.ops.gguf.QuantizedTensor``).
    A tensor holding NaN or infinite values draws a warning naming it (see ``non_finite_keys``)
    unless ``warn_non_finite`` is False (for callers that refuse such files themselves).
    """
    sd = _read_state_dict(source)
    bad = non_finite_keys(sd) if warn_non_finite else []
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        noun = "tensor {} holds" if len(bad) == 1 else "tensors {} hold"
        warnings.warn(f"{_source_name(source)}: {noun.format(', '.join(bad[:3]) + more)} NaN or "
                      "infinite values; the file is damaged or was saved from a diverged "
                      "model, and its output will be invalid", RuntimeWarning, stacklevel=2)
    return sd


def non_finite_keys(sd: Mapping) -> list:
    """Names of the float tensors of ``sd`` that hold a NaN or an infinity.

    Cheap: one sum per tensor (a NaN or inf makes the sum non-finite; only when the sum itself
    overflows is the tensor checked element by element); fp8 tensors by the byte patterns of
    their NaN / inf codes (two max reductions). Quantised GGUF tensors are not checked."""
    bad = []
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor) or value.device.type == "meta":
            continue
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if value.numel() == 0:
                continue
            top_int = int(value.view(torch.int8).max())
            top_uint = int(value.view(torch.uint8).max())
            limits = (127, 255) if value.dtype == torch.float8_e4m3fn else (124, 252)
            if top_int >= limits[0] or top_uint >= limits[1]:
                bad.append(key)
        elif value.is_floating_point():
            if not math.isfinite(float(value.sum())) and not bool(torch.isfinite(value).all()):
                bad.append(key)
    return bad


def _read_state_dict(source: Source) -> StateDict:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"file not found: {path}")
    if path.is_dir():
        return _load_folder(path)
    name = path.name.lower()
    if name.endswith(".index.json"):
        return _load_sharded(path)
    if name.endswith(".gguf"):
        from .gguf import read_gguf       # quantised tensors stay quantised (QuantizedTensor)

        return read_gguf(path)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return _load_safetensors(path)
    if name.endswith(PICKLE_SUFFIXES):
        return _load_pickle(path)
    # Unknown suffix: sniff the content.
    if _looks_like_safetensors(path):
        return _load_safetensors(path)
    if _looks_like_zip_or_pickle(path):
        return _load_pickle(path)
    raise CheckpointError(
        f"{path.name} is neither a safetensors file nor a PyTorch checkpoint; "
        "expected a .safetensors or .pth file")


SAFETENSORS_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"),
                                                     ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, attr)},
}


def load_meta_state_dict(source: Source) -> StateDict:
    """Names, shapes and dtypes of the tensors of ``source`` as meta tensors, reading no data.

    Safetensors files (and sharded sets) are described from their headers alone; other
    sources are opened the cheap way :func:`load_state_dict` does (GGUF and ``.pth`` are
    memory-mapped) and converted. Used to learn a model's configuration before loading it.
    """
    if isinstance(source, Mapping):
        files = []
    else:
        path = Path(source)
        if path.is_dir():           # the files _load_folder would read
            indexes = sorted(path.glob("*.safetensors.index.json"))
            singles = sorted(path.glob("*.safetensors"))
            path = indexes[0] if indexes else singles[0] if len(singles) == 1 else path
        if path.name.lower().endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                shards = None
            files = [path.parent / s for s in shards] if shards else []
        elif path.is_file() and path.name.lower().endswith(SAFETENSORS_SUFFIXES):
            files = [path]
        else:
            files = []
    if not files or not all(f.is_file() for f in files):
        return {k: (v.to("meta") if isinstance(v, torch.Tensor) else v)
                for k, v in _read_state_dict(source).items()}   # no value is looked at
    out: StateDict = {}
    for file in files:
        for key, info in read_safetensors_header(file).items():
            if key == "__metadata__":
                continue
            dtype = SAFETENSORS_TORCH_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{file.name}: tensor {key} has a dtype this pack cannot "
                                      f"read ({info.get('dtype')!r})")
            out[key] = torch.empty(info["shape"], dtype=dtype, device="meta")
    return out


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        return len(head) == 9 and head[8:9] == b"{"
    except OSError:
        return False


def _looks_like_zip_or_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return head in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header; raises CheckpointError for truncated files.

    Returns the header dict (tensor name -> {dtype, shape, data_offsets}, plus ``__metadata__``).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path.name} is empty or truncated ({size} bytes); "
                                  "download it again")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > 100_000_000 or 8 + header_len > size:
            # A cut download still starts with the '{"' of its JSON header; anything else is
            # some other file whose first 8 bytes read as a huge length.
            if header_len <= 100_000_000 and f.read(2) == b'{"':
                raise CheckpointError(
                    f"{path.name} is truncated: its header alone needs {8 + header_len} bytes "
                    f"but the file has {size}; download it again")
            raise CheckpointError(f"{path.name} is not a safetensors file "
                                  "(its first bytes are not a safetensors header)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name} is not a safetensors file (unreadable header)") from None
    end = _check_header(header, path)
    expected = 8 + header_len + end
    if size < expected:
        raise CheckpointError(
            f"{path.name} is truncated: expected {expected:,} bytes, found {size:,} "
            f"({100 * size / max(expected, 1):.1f}%); the download did not finish, fetch it again")
    return header


# safetensors dtype names -> bytes per element
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                      "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
                      "U8": 1, "BOOL": 1}


def _check_header(header, path: Path) -> int:
    """Validate the structure of a parsed safetensors header; return the end of its data."""
    def bad(why: str):
        return CheckpointError(f"{path.name} is not a valid safetensors file: {why}; the file is "
                               "damaged or was written by a broken tool")

    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise bad("'__metadata__' is not an object")
            continue
        if not isinstance(info, dict):
            raise bad(f"the entry of tensor '{name}' is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor '{name}' has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise bad(f"tensor '{name}' has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"tensor '{name}' has invalid data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPES[dtype]:
            raise bad(f"tensor '{name}' has {offsets[1] - offsets[0]} bytes of data for shape "
                      f"{shape} {dtype}")
        end = max(end, offsets[1])
    return end


def _load_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError, safe_open

    read_safetensors_header(path)
    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    except SafetensorError as e:   # anything the header check above did not catch
        raise CheckpointError(f"{path.name} cannot be read as safetensors: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return out


def _load_pickle(path: Path) -> StateDict:
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
    try:  # mmap needs the zip format; old (non-zip) files are read into memory
        with warnings.catch_warnings():   # torch's notes on pickle protocols: not for users
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines()
                 if "GLOBAL" in line or "Unsupported" in line][:1]
        raise CheckpointError(
            f"{path.name} contains Python objects other than tensors, so it was not loaded "
            f"(pickles are only read with weights_only=True for safety). Convert it to "
            f".safetensors, or use the official file."
            + (f" Details: {found[0]}" if found else "")) from None
    except RuntimeError as e:
        msg = str(e)
        if "magic number" in msg.lower():
            raise CheckpointError(f"{path.name} is not a PyTorch checkpoint (a plain pickle or "
                                  "another format); convert it to .safetensors") from None
        if "zip" in msg.lower() or "central directory" in msg.lower() or "eof" in msg.lower():
            raise CheckpointError(f"{path.name} is truncated or corrupt ({msg.splitlines()[0]}); "
                                  "download it again") from None
        raise
    except EOFError:
        raise CheckpointError(f"{path.name} is truncated; download it again") from None
    return _unwrap_pickled(obj, path)


def _unwrap_pickled(obj, path: Path) -> StateDict:
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            for key in ("state_dict", "model", "module", "model_state_dict"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
                if tensors:
                    return tensors
                break
        else:
            break
    raise CheckpointError(f"{path.name} holds no tensors that look like model weights")


def _load_sharded(index_path: Path) -> StateDict:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index_path.name} is not a sharded-checkpoint index "
                              "(no 'weight_map')") from None
    if not isinstance(weight_map, Mapping) or not all(isinstance(v, str)
                                                      for v in weight_map.values()):
        raise CheckpointError(f"{index_path.name}: 'weight_map' must map tensor names to "
                              "shard file names")
    out: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if shard.lower().endswith(".json") or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{index_path.name} names '{shard}' as a shard; shards must be "
                                  "safetensors files in the same folder (an index cannot point "
                                  "at an index)")
        if not shard_path.exists():
            raise CheckpointError(f"shard {shard} named in {index_path.name} is missing from "
                                  f"{index_path.parent}; download every shard")
        out.update(_read_state_dict(shard_path))
    return out


def _load_folder(folder: Path) -> StateDict:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return _load_sharded(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return _load_safetensors(files[0])
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors files")
    raise CheckpointError(f"{folder} holds several .safetensors files but no index json; "
                          "point at one file")


# --------------------------------------------------------------------------------------------
# Key layouts
# --------------------------------------------------------------------------------------------

def strip_prefix(sd: StateDict, prefixes: Iterable[str]) -> StateDict:
    """Remove the first of ``prefixes`` that every weight key starts with (markers excepted)."""
    keys = [k for k in sd if k not in MARKER_KEYS]
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return sd


def select_prefix(sd: StateDict, prefix: str) -> StateDict:
    """The tensors under ``prefix`` (with it removed), e.g. one model out of a combined file."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# Keys that mark a file's storage format rather than hold weights.
MARKER_KEYS = frozenset({"scaled_fp8", "spiece_model"})

# --------------------------------------------------------------------------------------------
# What kind of model is this?
# --------------------------------------------------------------------------------------------

KIND_NAMES = {
    "dit": "a Wan diffusion model (DiT)",
    "vae": "a Wan VAE",
    "text_encoder": "a umT5 text encoder",
    "clip_vision": "a CLIP vision encoder",
    "lora": "a LoRA",
    "unknown": "not a model this pack recognises",
}
KIND_LOADERS = {
    "dit": "load_dit / the 'WanCore Load Diffusion Model' node (models/diffusion_models)",
    "vae": "load_vae / the 'WanCore Load VAE' node (models/vae)",
    "text_encoder": "load_text_encoder / the 'WanCore Load Text Encoder' node (models/text_encoders)",
    "clip_vision": "load_clip_vision / the 'WanCore Load CLIP Vision' node (models/clip_vision)",
    "lora": "a LoRA loader (models/loras)",
}

_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def identify(sd: Mapping) -> str:
    """Guess which kind of model a state dict holds, from its key names only.

    Returns one of ``dit``, ``vae``, ``text_encoder``, ``clip_vision``, ``lora``, ``unknown``.
    """
    keys = list(sd.keys())
    if any(".lora_A." in k or ".lora_down." in k or ".lora_up." in k or ".lora_B." in k
           for k in keys[:2000]):
        return "lora"
    ks = set(keys)
    for p in ("",) + _DIT_PREFIXES:
        if {p + "patch_embedding.weight", p + "head.head.weight"} <= ks or \
                p + "condition_embedder.time_embedder.linear_1.weight" in ks:
            return "dit"
    if any(k.startswith(("encoder.block.0.layer.0.SelfAttention", "blocks.0.attn.q."))
           for k in keys) or "shared.weight" in ks or "token_embedding.weight" in ks:
        if not any(k.startswith("visual.") for k in keys):
            return "text_encoder"
    if any(k.startswith(("vision_model.embeddings.", "visual.", "embeddings.patch_embedding"))
           for k in keys):
        return "clip_vision"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        return "vae"
    # Wan VAE keys under a repackaging prefix (e.g. "first_stage_model.decoder.middle...").
    if any(k.endswith("decoder.middle.0.residual.0.gamma") or k.endswith("decoder.mid_block.resnets.0.norm1.gamma")
           for k in keys):
        return "vae"
    return "unknown"


# Tensors outside the blocks that every Wan DiT has (official names).
_DIT_TOP_TENSORS = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
                    "time_projection.1.weight", "head.head.weight", "head.modulation")


def _missing_dit_tensors(sd: Mapping) -> list:
    """For a state dict with official Wan DiT block keys (any known prefix): the top-level
    DiT tensors it lacks; [] when it has no such blocks (it is some other model)."""
    for prefix in ("",) + _DIT_PREFIXES:
        if any(k.startswith(prefix + "blocks.0.self_attn.") for k in sd):
            return [t for t in _DIT_TOP_TENSORS if prefix + t not in sd]
    return []


def _is_vace_module(sd: Mapping) -> bool:
    """Only VACE weights (``vace_*``, under any known prefix)."""
    for prefix in ("",) + _DIT_PREFIXES + ("transformer.",):
        if sd and all(k.startswith(prefix + "vace_") for k in sd):
            return True
    return False


def require_kind(sd: Mapping, wanted: str, source: Source | None = None) -> None:
    """Raise a CheckpointError naming what the file is when it is not a ``wanted`` model."""
    kind = identify(sd)
    if kind == wanted:
        return
    name = _source_name(source)
    if kind == "unknown" and wanted == "dit" and _is_vace_module(sd):
        raise CheckpointError(
            f"{name} is a VACE module (only vace_* weights): it needs a base Wan 2.1 T2V model "
            "of the same size; load the base model with it as its VACE module "
            "(load_dit(base, vace_module=...), the loader node's vace_module input, or "
            "--vace-module)")
    if kind == "unknown" and wanted == "dit":
        missing = _missing_dit_tensors(sd)
        if missing:
            raise CheckpointError(
                f"{name} holds Wan diffusion-model blocks but is missing "
                f"{', '.join(missing)}: the file is incomplete or damaged; download it again")
    if kind == "unknown":
        sample = ", ".join(list(sd.keys())[:6])
        raise CheckpointError(
            f"{name} does not look like {KIND_NAMES[wanted]}: unknown key layout "
            f"({len(sd)} tensors; first keys: {sample})")
    raise CheckpointError(
        f"{name} is {KIND_NAMES[kind]}, not {KIND_NAMES[wanted]}; "
        f"load it with {KIND_LOADERS[kind]}")


def _source_name(source) -> str:
    if source is None or isinstance(source, Mapping):
        return "this state dict"
    return f"'{Path(source).name}'"


def source_name(source) -> str:
    """A short human name for a checkpoint source, for error messages."""
    return _source_name(source)
