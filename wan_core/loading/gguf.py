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


def open_gguf(path: Path):
    """The ``gguf`` package's memory-mapped reader of ``path``, after checking the magic."""
    path = Path(path)
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


def read_gguf(source, expect=("wan",), what: str = "a Wan diffusion model",
              reader=None) -> dict:
    """``{name: torch.Tensor | QuantizedTensor}`` of a GGUF file whose architecture is one of
    ``expect`` (a name or a tuple of names).

    Plain F32 / F16 / BF16 tensors are torch tensors over the memory-mapped file (read-only:
    convert before writing); quantised ones are :class:`QuantizedTensor`. ``reader``: the file
    already opened with :func:`open_gguf`.
    """
    path = Path(source)
    reader = reader or open_gguf(path)
    arch = architecture(reader)
    expect = (expect,) if isinstance(expect, str) else tuple(expect)
    if arch not in expect:
        if arch in TEXT_ENCODER_ARCHS:
            hint = "it is a umT5 text-encoder GGUF: load it with the text encoder loader"
        elif arch == "wan":
            hint = "it is a Wan diffusion-model GGUF: load it with the diffusion model loader"
        else:
            hint = f"it holds a '{arch}' model (e.g. an LLM, Flux or SD GGUF), not {what}"
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


# -- the SentencePiece tokenizer of a T5 / umT5 GGUF ------------------------------------------------

def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def gguf_sentencepiece(source, reader=None) -> bytes | None:
    """The SentencePiece model (serialized ``ModelProto``) rebuilt from a T5 / umT5 GGUF's
    ``tokenizer.ggml.*`` metadata, or None when the file carries no T5 tokenizer.

    llama.cpp's converter stores the pieces, their scores and types (numbered as SentencePiece
    numbers them), the special ids, the whitespace options and the normaliser's precompiled
    character map: everything a unigram SentencePiece model needs to tokenise identically.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    path = Path(source)
    reader = reader or open_gguf(path)
    if _field(reader, "tokenizer.ggml.model") != "t5":
        return None
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or not len(tokens) == len(scores) == len(types):
        raise CheckpointError(f"{path.name}: its tokenizer metadata is incomplete "
                              f"({len(tokens)} tokens, {len(scores)} scores, {len(types)} types)")
    model = spm_pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        entry = model.pieces.add()
        entry.piece, entry.score, entry.type = piece, float(score), int(kind)
    trainer = model.trainer_spec
    trainer.model_type = spm_pb.TrainerSpec.UNIGRAM
    trainer.vocab_size = len(tokens)
    for name, key in (("unk_id", "unknown_token_id"), ("eos_id", "eos_token_id"),
                      ("pad_id", "padding_token_id"), ("bos_id", "bos_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        setattr(trainer, name, -1 if value is None else int(value))
    normalizer = model.normalizer_spec
    normalizer.name = "gguf"
    charsmap = reader.fields.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap is not None:
        normalizer.precompiled_charsmap = bytes(np.asarray(charsmap.contents(), dtype=np.uint8))
    for name, key in (("add_dummy_prefix", "add_space_prefix"),
                      ("remove_extra_whitespaces", "remove_extra_whitespaces")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        setattr(normalizer, name, True if value is None else bool(value))
    normalizer.escape_whitespaces = True
    return model.SerializeToString()
