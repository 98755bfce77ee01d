"""GGUF files -> state dicts whose quantised tensors stay quantised (memory-mapped).

Wan DiT GGUF files (city96, QuantStack) carry ``general.architecture = "wan"`` and the official
tensor names; 1-D, small, modulation and patch-embedding tensors are F32/F16, block Linears are
quantised (often mixed: Q4_K with Q6_K v-projections). Read with the ``gguf`` package's
memory-mapped reader: plain tensors become torch tensors over the mapped file, quantised ones
:class:`~wan_core.ops.gguf.QuantizedTensor` (raw bytes + type + logical shape), which the
loaders hand to ``wan_core.ops.Linear`` to be dequantised per call. Nothing is copied here.

Every check runs before a model is built: a truncated file, another architecture, a type this
build cannot dequantise (named), a text-encoder GGUF given to the DiT loader.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..ops.gguf import QTYPES, QuantizedTensor, qtype_name

GGUF_MAGIC = b"GGUF"
PLAIN = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
# What other architectures are, for the error message.
TEXT_ENCODER_ARCHS = ("t5", "t5encoder", "umt5")


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError(f"{path.name} is a GGUF file; reading it needs the 'gguf' package "
                              "(pip install gguf)") from None
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path.name} is not a GGUF file (no GGUF header)")
    try:
        return GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises assorted errors for damaged files
        raise CheckpointError(f"{path.name} is a damaged or truncated GGUF file ({e}); "
                              "download it again") from None


def architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        return "unknown"
    try:
        return str(field.contents())
    except Exception:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def read_gguf(source, expect: str = "wan", what: str = "a Wan diffusion model") -> dict:
    """``{name: torch.Tensor | QuantizedTensor}`` of a GGUF file of architecture ``expect``.

    Plain F32 / F16 / BF16 tensors are torch tensors over the memory-mapped file (read-only:
    convert before writing); quantised ones are :class:`QuantizedTensor`.
    """
    path = Path(source)
    reader = _reader(path)
    arch = architecture(reader)
    if arch != expect:
        hint = ("it is a umT5 text-encoder GGUF: load it with the text encoder loader"
                if arch in TEXT_ENCODER_ARCHS else
                f"it holds a '{arch}' model (e.g. an LLM, Flux or SD GGUF), not {what}")
        raise CheckpointError(f"{path.name}: {hint}")
    size = path.stat().st_size
    out = {}
    for tensor in reader.tensors:
        qtype = int(tensor.tensor_type)
        if qtype not in QTYPES:
            supported = ", ".join(n for n, _, _ in QTYPES.values())
            raise CheckpointError(
                f"{path.name}: tensor {tensor.name} is {qtype_name_full(qtype)}, a GGUF type "
                f"this pack cannot dequantise (supported: {supported}); use another quant "
                "of the model")
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(f"{path.name} is truncated (tensor {tensor.name} ends past the "
                                  "end of the file); download it again")
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        with warnings.catch_warnings():       # the map is read-only; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.asarray(tensor.data).reshape(-1).view(np.uint8))
        if qtype in PLAIN:
            out[tensor.name] = raw.view(PLAIN[qtype]).reshape(shape)
        else:
            out[tensor.name] = QuantizedTensor(raw.reshape(shape[0] if len(shape) > 1 else 1, -1),
                                               qtype, shape)
    return out


def qtype_name_full(qtype: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(qtype).name
    except (ImportError, ValueError):
        return qtype_name(qtype)
