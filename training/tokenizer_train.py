"""Train the demo text encoder's SentencePiece tokenizer on the caption vocabulary.

The result is the bytes of a SentencePiece ``.model`` file with umT5's special ids (pad 0,
eos 1, unk 2, no bos), ready to embed in the text encoder's safetensors file as a uint8
``spiece_model`` tensor, as ComfyUI's umT5 files do. BPE makes every caption word one piece;
byte fallback keeps any other prompt tokenizable (no ``<unk>``). Lower-casing is part of the
model's normaliser (A-Z only), so "A Red Circle" reads like "a red circle".

Training is deterministic: one thread, fixed random seed, the corpus in a fixed order.

    python -m training.tokenizer_train out/spiece.model
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

import torch

from .dataset import iter_combos

# An upper bound: BPE stops when no merge is left (455 pieces for the current captions:
# 256 bytes, 3 specials, letters, every caption word whole and the merges leading to them).
VOCAB_SIZE = 512


def caption_corpus() -> list[str]:
    """Every caption (all splits: the held-out prompts use only training words), sorted."""
    return sorted(combo.caption for combo in iter_combos("all"))


def train_tokenizer(vocab_size: int = VOCAB_SIZE, seed: int = 0) -> bytes:
    """Train on :func:`caption_corpus`; return the serialized SentencePiece model."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        # Only A-Z -> a-z: a tiny normaliser (the stock NFKC tables add 250 kB to the file).
        # The rules file's path is stored in the model, so it is given relative to its folder.
        rules = "lowercase.tsv"
        Path(tmp, rules).write_text(
            "".join(f"{c:X}\t{c + 32:X}\n" for c in range(ord("A"), ord("Z") + 1)))
        os.chdir(tmp)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(caption_corpus()), model_writer=model,
                model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
                byte_fallback=True, character_coverage=1.0, normalization_rule_tsv=rules,
                pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
                minloglevel=2)
        finally:
            os.chdir(cwd)
    return model.getvalue()


def as_spiece_tensor(model: bytes) -> torch.Tensor:
    """The uint8 ``spiece_model`` tensor embedded in ComfyUI-style text encoder files."""
    return torch.frombuffer(bytearray(model), dtype=torch.uint8).clone()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "spiece.model")
    data = train_tokenizer()
    out.write_bytes(data)
    print(f"wrote {out} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
