"""umT5 files -> :class:`~wan_core.models.text_encoder.TextEncoder` (network + tokenizer).

Accepts the official ``models_t5_umt5-xxl-enc-bf16.pth``, ComfyUI / Hugging Face files
(``encoder.block.N.layer...``, prefixed variants), fp8 / scaled-fp8 files and GGUF quants
(llama.cpp ``t5encoder`` names; quantised Linear weights stay quantised, dequantised per call);
the tokenizer is the ``spiece_model`` tensor embedded in ComfyUI's files, the SentencePiece
model rebuilt from a GGUF's metadata, or a tokenizer file next to the weights.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ..models.text_encoder import TextEncoder, UMT5Config, UMT5Encoder
from ..models.tokenizer import TOKENIZER_DIRS, UMT5Tokenizer, tokenizer_file_in
from . import checkpoint as ckpt
from ..ops.gguf import QuantizedTensor
from .assign import build_from_state_dict
from .gguf import TEXT_ENCODER_ARCHS, gguf_sentencepiece, open_gguf, read_gguf


# Prefixes seen in combined or repackaged files; removed when every key carries one.
_PREFIXES = ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.", "text_encoder.",
             "transformer.", "model.", "t5.", "umt5.")
# Hugging Face (T5/UMT5 *EncoderModel, as ComfyUI stores it) -> official names.
_HF_RENAMES = (
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\."),
     r"blocks.\1.pos_embedding.embedding."),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\."), r"blocks.\1.attn.\2."),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\."), r"blocks.\1.norm1."),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\."), r"blocks.\1.ffn.gate.0."),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\."), r"blocks.\1.ffn.fc1."),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\."), r"blocks.\1.ffn.fc2."),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\."), r"blocks.\1.norm2."),
    (re.compile(r"^encoder\.final_layer_norm\."), "norm."),
)
# llama.cpp / GGUF (architecture t5encoder) -> Hugging Face names.
_GGUF_RENAMES = (
    (re.compile(r"^token_embd\."), "shared."),
    (re.compile(r"^enc\.output_norm\."), "encoder.final_layer_norm."),
    (re.compile(r"^enc\.blk\.(\d+)\.attn_norm\."), r"encoder.block.\1.layer.0.layer_norm."),
    (re.compile(r"^enc\.blk\.(\d+)\.attn_rel_b\."),
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (re.compile(r"^enc\.blk\.(\d+)\.attn_([qkvo])\."), r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_norm\."), r"encoder.block.\1.layer.1.layer_norm."),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_gate\."), r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_up\."), r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_down\."), r"encoder.block.\1.layer.1.DenseReluDense.wo."),
)
# The Linear weights of the official layout: GGUF-quantised ones stay quantised in them.
_LINEAR_WEIGHT = re.compile(r"^blocks\.\d+\.(attn\.[qkvo]|ffn\.gate\.0|ffn\.fc1|ffn\.fc2)\.weight$")
# Parts of full encoder-decoder files that the encoder does not use.
_UNUSED = re.compile(r"^(decoder\.|lm_head\.|head\.)")


def to_official_layout(sd: Mapping) -> dict:
    """Rename a umT5 encoder state dict to the official Wan names (views, no copies).

    Accepts the official layout, the Hugging Face / ComfyUI layout and prefixed variants of both.
    Decoder weights of full T5 files and the ``spiece_model`` tensor are dropped.
    """
    sd = ckpt.strip_prefix(dict(sd), _PREFIXES)
    out = {}
    for key, value in sd.items():
        if key == "spiece_model" or _UNUSED.match(key):
            continue
        if key.startswith(("shared.", "encoder.embed_tokens.")):
            # HF files hold the embedding as shared.* and often a tied copy as embed_tokens.*
            name = "token_embedding." + key.rsplit(".", 1)[1]
            if key.startswith("shared.") or name not in out:
                out[name] = value
            continue
        for pattern, repl in _HF_RENAMES:
            new, n = pattern.subn(repl, key)
            if n:
                key = new
                break
        if key.startswith("encoder.") and not key.startswith("encoder.block"):
            key = key[len("encoder."):]  # official full-model files: encoder.blocks...
        out[key] = value
    return out


def read_gguf_text_encoder(path) -> dict:
    """A umT5 GGUF (llama.cpp's ``t5encoder`` layout) -> Hugging Face names, with the tokenizer
    rebuilt from its metadata as a ``spiece_model`` uint8 tensor when the file carries one."""
    reader = open_gguf(path)           # parsed once for the tensors and the tokenizer
    sd = {}
    for key, value in read_gguf(path, expect=TEXT_ENCODER_ARCHS, what="a umT5 text encoder",
                                reader=reader).items():
        for pattern, repl in _GGUF_RENAMES:
            key, n = pattern.subn(repl, key)
            if n:
                break
        sd[key] = value
    spiece = gguf_sentencepiece(path, reader=reader)
    if spiece is not None:
        sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    return sd


def _read(source) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    if str(source).lower().endswith(".gguf"):
        return read_gguf_text_encoder(source)
    return ckpt.load_state_dict(source)


def _dequantize_non_linear(sd: dict, dtype: torch.dtype) -> dict:
    """GGUF-quantised embeddings and position biases, dequantised once into the compute
    ``dtype``; quantised Linear weights stay as they are (``ops.Linear`` dequantises them per
    call)."""
    return {k: (v.dequantize(dtype) if isinstance(v, QuantizedTensor)
                and not _LINEAR_WEIGHT.match(k) else v) for k, v in sd.items()}


def config_from_state_dict(sd: Mapping) -> UMT5Config:
    """Every dimension of the encoder from an official-layout state dict's shapes."""
    try:
        vocab, dim = sd["token_embedding.weight"].shape
        attn_dim = sd["blocks.0.attn.q.weight"].shape[0]
        ffn_dim = sd["blocks.0.ffn.fc1.weight"].shape[0]
        num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    except KeyError as e:
        raise ckpt.CheckpointError(
            f"umT5 weights are incomplete: missing {e.args[0]} "
            "(a truncated file, or another model's weights)") from None
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    num_layers = max(layers) + 1
    if num_layers > 1 and "blocks.1.pos_embedding.embedding.weight" not in sd:
        raise ckpt.CheckpointError(
            f"this is a T5 encoder (position bias only in its first layer, vocabulary {vocab}), "
            "such as t5xxl for Flux / SD3, not umT5-XXL. Wan needs the umT5-XXL encoder: "
            "umt5_xxl_fp8_e4m3fn_scaled.safetensors / umt5_xxl_fp16.safetensors (ComfyUI) or "
            "models_t5_umt5-xxl-enc-bf16.pth (official)")
    if attn_dim % num_heads:
        raise ckpt.CheckpointError(f"umT5 attention width {attn_dim} is not a multiple of the "
                                   f"{num_heads} heads read from the position-bias table")
    return UMT5Config(vocab_size=vocab, dim=dim, attn_dim=attn_dim, ffn_dim=ffn_dim,
                      num_heads=num_heads, num_layers=num_layers, num_buckets=num_buckets)


def _default_dtype(sd: Mapping) -> torch.dtype:
    """fp32 files compute in fp32; half-precision and fp8 files compute in bf16 (umT5's
    activations overflow fp16)."""
    dtype = sd["blocks.0.attn.q.weight"].dtype
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def load_umt5(source, dtype: Optional[torch.dtype] = None, device="cpu") -> UMT5Encoder:
    """Build the umT5 encoder network from a file or state dict (no tokenizer needed).

    fp8 linear weights stay fp8 in memory (scaled fp8 keeps its per-layer scale); everything is
    computed in ``dtype`` (default: fp32 for fp32 files, else bf16).
    """
    sd = ckpt.strip_prefix(_read(source), _PREFIXES)
    ckpt.require_kind(sd, "text_encoder", source)
    sd = to_official_layout(sd)
    dtype = dtype or _default_dtype(sd)
    sd = _dequantize_non_linear(sd, dtype)
    cfg = config_from_state_dict(sd)
    model = build_from_state_dict(lambda: UMT5Encoder(cfg), sd, dtype=dtype, device=device,
                                  source=source, what=f"the umT5 encoder ({cfg})")
    return model.eval().requires_grad_(False)


#


def find_tokenizer_near(checkpoint: Union[str, os.PathLike]) -> Path | None:
    """A tokenizer file in the checkpoint's folder or in the usual sub-folders next to it."""
    base = Path(checkpoint).parent
    for sub in TOKENIZER_DIRS:
        found = tokenizer_file_in(base / sub)
        if found is not None:
            return found
    return None


def missing_tokenizer_error(source_name: str, checkpoint: Union[str, os.PathLike, None]) -> ckpt.CheckpointError:
    where = Path(checkpoint).parent if checkpoint is not None else Path("<checkpoint folder>")
    return ckpt.CheckpointError(
        f"{source_name} holds umT5 weights but no tokenizer. Either use ComfyUI's repackaged file "
        f"(e.g. umt5_xxl_fp8_e4m3fn_scaled.safetensors, which embeds the tokenizer), or put the "
        f"umT5 tokenizer (spiece.model or tokenizer.json from google/umt5-xxl) in {where} or in "
        f"{where / 'google' / 'umt5-xxl'}, or pass tokenizer=<path> to load_text_encoder.")


def _resolve_tokenizer(tokenizer, spiece: Optional[torch.Tensor], source) -> UMT5Tokenizer:
    if isinstance(tokenizer, UMT5Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (bytes, bytearray)):
        return UMT5Tokenizer.from_spiece_bytes(tokenizer, origin="tokenizer bytes")
    if tokenizer is not None:
        return UMT5Tokenizer.from_file(tokenizer)
    if spiece is not None:
        return UMT5Tokenizer.from_spiece_tensor(spiece)
    path = None if isinstance(source, Mapping) else source
    if path is not None:
        found = find_tokenizer_near(path)
        if found is not None:
            return UMT5Tokenizer.from_file(found)
    raise missing_tokenizer_error(ckpt.source_name(source), path)


def load_text_encoder(path_or_state_dict, dtype: Optional[torch.dtype] = None, device="cpu",
                      tokenizer=None) -> TextEncoder:
    """Load a umT5 text encoder with its tokenizer.

    ``path_or_state_dict``: the official ``models_t5_umt5-xxl-enc-bf16.pth``, a ComfyUI / Hugging
    Face file (``umt5_xxl_fp16.safetensors``, ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``, ...),
    or a state dict in either layout. ``tokenizer``: a ``spiece.model`` / ``tokenizer.json`` path
    or folder, SentencePiece bytes, or a :class:`UMT5Tokenizer`; by default the ``spiece_model``
    tensor embedded in the file, else a tokenizer next to the file (also in ``google/umt5-xxl/``).
    ``dtype``: compute dtype (default fp32 for fp32 files, else bf16); fp8 weights stay fp8.
    """
    source = path_or_state_dict
    sd = ckpt.strip_prefix(_read(source), _PREFIXES)
    ckpt.require_kind(sd, "text_encoder", source)
    spiece = sd.pop("spiece_model", None)
    tok = _resolve_tokenizer(tokenizer, spiece, source)
    model = load_umt5(sd, dtype=dtype, device=device)
    if tok.vocab_size > model.config.vocab_size:
        raise ckpt.CheckpointError(
            f"the tokenizer ({tok.origin}) has {tok.vocab_size} tokens but the encoder's embedding "
            f"only {model.config.vocab_size}; this tokenizer belongs to another model")
    return TextEncoder(model, tok)
