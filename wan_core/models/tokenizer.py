"""The umT5 tokenizer: prompt cleaning as the official Wan code does it, then SentencePiece ids.

Wan tokenizes a prompt by (1) fixing it with ``ftfy.fix_text``, unescaping HTML entities twice
and collapsing every run of whitespace to one space, then (2) running the umT5 SentencePiece
model and appending the end-of-sequence token ``</s>``, (3) truncating to 512 ids (511 pieces +
``</s>``). This module does the same with no network access and no ``transformers`` import.

The vocabulary comes from one of:
  * the ``spiece_model`` uint8 tensor that ComfyUI embeds in its umT5 safetensors files,
  * a ``spiece.model`` file (SentencePiece), or
  * a ``tokenizer.json`` file (Hugging Face ``tokenizers``; needs the ``tokenizers`` package).

``ftfy`` is optional: when it is not installed an equivalent subset of its fixes is applied
(everything except repairing mojibake, which typed prompts do not contain).
"""
from __future__ import annotations

import html
import logging
import os
import re
import unicodedata
from pathlib import Path
from typing import Sequence, Union

import torch

from ..errors import CheckpointError

logger = logging.getLogger("wan_core")

MAX_TOKENS = 512
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
# Folders, relative to a checkpoint's folder, where a tokenizer is looked for. The official
# Wan releases ship it as google/umt5-xxl/ next to models_t5_umt5-xxl-enc-bf16.pth.
TOKENIZER_DIRS = ("", "google/umt5-xxl", "umt5-xxl", "tokenizer", "umt5_tokenizer")


# --------------------------------------------------------------------------------------------
# Text cleaning
# --------------------------------------------------------------------------------------------

_ANSI_ESCAPE = re.compile(r"\033\[((?:\d|;)*)([a-zA-Z])")
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_CONTROL_CHARS = re.compile(
    "[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufff9-\ufffc\ufeff]")
# Latin ligatures (U+FB00..U+FB06) and the half/fullwidth forms block, which ftfy rewrites to
# their plain equivalents; NFKC of exactly these characters gives the same result.
_WIDTH_OR_LIGATURE = re.compile("[\ufb00-\ufb06\u3000\uff01-\uff5e\uff61-\uffdc\uffe8-\uffee]")
_WHITESPACE = re.compile(r"\s+")


def _fix_text_subset(text: str) -> str:
    """The parts of ``ftfy.fix_text`` that matter for typed prompts, without ftfy."""
    text = _ANSI_ESCAPE.sub("", text)
    text = _WIDTH_OR_LIGATURE.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)
    text = _DOUBLE_QUOTES.sub('"', _SINGLE_QUOTES.sub("'", text))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARS.sub("", text)
    return unicodedata.normalize("NFC", text)


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        return _fix_text_subset(text)
    return ftfy.fix_text(text)


def clean_prompt(text: str) -> str:
    """Official Wan prompt cleaning ('whitespace' mode): fix text, unescape HTML twice, collapse
    whitespace runs to single spaces and strip both ends."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

class UMT5Tokenizer:
    """Prompt -> token ids (``list[int]``, ending with ``</s>``, at most ``max_tokens`` long).

    Build with :meth:`from_spiece_bytes`, :meth:`from_file` or :func:`find_tokenizer`.
    """

    def __init__(self, encode_fn, eos_id: int, pad_id: int, vocab_size: int, origin: str,
                 max_tokens: int = MAX_TOKENS):
        self._encode_fn = encode_fn  # cleaned text -> list[int] without special tokens
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.origin = origin
        self.max_tokens = max_tokens

    def __repr__(self) -> str:
        return f"UMT5Tokenizer(vocab_size={self.vocab_size}, from {self.origin})"

    # --- constructors --------------------------------------------------------------------
    @classmethod
    def from_spiece_bytes(cls, data: bytes, origin: str = "embedded spiece_model"):
        """From the bytes of a SentencePiece ``.model`` file."""
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(bytes(data))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
            raise CheckpointError(f"the SentencePiece model ({origin}) cannot be read: {e}") from None
        eos = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id("</s>")
        pad = sp.pad_id() if sp.pad_id() >= 0 else 0
        return cls(lambda text: sp.encode(text), eos, pad, sp.get_piece_size(), origin)

    @classmethod
    def from_spiece_tensor(cls, tensor: torch.Tensor):
        """From the uint8 ``spiece_model`` tensor ComfyUI embeds in its umT5 files."""
        return cls.from_spiece_bytes(tensor.detach().cpu().contiguous().numpy().tobytes())

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]):
        """From a ``spiece.model`` / ``*.model`` SentencePiece file or a ``tokenizer.json``."""
        path = Path(path)
        if path.is_dir():
            found = tokenizer_file_in(path)
            if found is None:
                raise CheckpointError(f"{path} holds neither tokenizer.json nor spiece.model")
            path = found
        if path.suffix == ".json":
            return cls._from_tokenizer_json(path)
        return cls.from_spiece_bytes(path.read_bytes(), origin=str(path))

    @classmethod
    def _from_tokenizer_json(cls, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise CheckpointError(
                f"reading {path.name} needs the 'tokenizers' package (pip install tokenizers); "
                "or put the SentencePiece file spiece.model next to it instead") from None
        tok = Tokenizer.from_file(str(path))
        eos = tok.token_to_id("</s>")
        pad = tok.token_to_id("<pad>")
        if eos is None:
            raise CheckpointError(f"{path} has no '</s>' token; it is not a umT5 tokenizer")

        def encode(text: str) -> list:
            return tok.encode(text, add_special_tokens=False).ids

        return cls(encode, eos, 0 if pad is None else pad, tok.get_vocab_size(), str(path))

    # --- use ----------------------------------------------------------------------------
    def __call__(self, prompt: str) -> list:
        """Token ids of one prompt: cleaned, SentencePiece pieces, then ``</s>``; truncated to
        ``max_tokens`` (keeping ``</s>`` last) with a warning."""
        ids = list(self._encode_fn(clean_prompt(prompt)))
        if len(ids) + 1 > self.max_tokens:
            logger.warning(
                "prompt is %d tokens long; umT5 reads at most %d, so it was cut after %d tokens: "
                "%.60r...", len(ids) + 1, self.max_tokens, self.max_tokens - 1, prompt)
            ids = ids[: self.max_tokens - 1]
        return ids + [self.eos_id]

    def batch(self, prompts: Sequence[str]) -> list:
        return [self(p) for p in prompts]


def tokenizer_file_in(folder: Path) -> Path | None:
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


