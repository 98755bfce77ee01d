"""Stage ``text``: a tiny umT5 encoder with the demo SentencePiece tokenizer.

The encoder (umT5 architecture: every layer owns its relative-position bias) is pretrained
briefly with an auxiliary readout that has to recover the four caption attributes (shape,
object colour, direction, background) from *every* token state (:class:`Readout`). A random
frozen encoder mixes up object and background colours ("red" can be either) and keeps each
word's meaning in its own token; this makes the context explicit and spreads it. The
readout is thrown away; the DiTs are trained on the frozen encoder's output.
Only training captions are used; the held-out captions measure the probe accuracy.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan_core.models.text_encoder import UMT5Config, UMT5Encoder
from wan_core.models.tokenizer import UMT5Tokenizer
from . import dataset
from .tokenizer_train import train_tokenizer
from .training import cosine_lr, finished_already, train_loop

DIM, HEADS, FFN, LAYERS, BUCKETS = 128, 2, 256, 2, 32
ATTRIBUTES = (("shape", dataset.SHAPES), ("colour", tuple(dataset.COLOURS)),
              ("direction", tuple(dataset.DIRECTIONS)), ("background", tuple(dataset.BACKGROUNDS)))


class Readout(nn.Module):
    """Every real token's state predicts all four attributes (one classifier per attribute on a
    shared hidden layer), so that each token carries the whole caption: the DiT's
    cross-attention (one head in the demo DiTs, and sharp) then finds every attribute in
    whichever token it reads. (A readout with one learned query per attribute, tried first,
    left the direction in the direction word's token only, and the DiTs never learnt to use it.)"""

    def __init__(self, dim: int):
        super().__init__()
        self.hidden = nn.Linear(dim, dim)
        self.heads = nn.ModuleList(nn.Linear(dim, len(names)) for _, names in ATTRIBUTES)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> list:
        """states [B, L, D], mask [B, L] -> per attribute, logits [B, L, classes]."""
        h = F.gelu(self.hidden(states))
        return [head(h) for head in self.heads]


def token_loss(logits: list, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every real token's prediction of every attribute ``y [B, 4]``."""
    real = mask.bool()
    return sum(F.cross_entropy(o[real], y[:, i, None].expand_as(mask)[real])
               for i, o in enumerate(logits))


class Probe(nn.Module):
    def __init__(self, encoder: UMT5Encoder):
        super().__init__()
        self.encoder = encoder
        self.readout = Readout(encoder.config.dim)

    def forward(self, ids, mask):
        return self.readout(self.encoder(ids, mask), mask)


def tokenize(tok: UMT5Tokenizer, captions: list[str]):
    ids = tok.batch(captions)
    n = max(len(x) for x in ids)
    batch = torch.zeros(len(ids), n, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return batch, mask


def labels(combos) -> torch.Tensor:
    return torch.tensor([[names.index(getattr(c, attr)) for attr, names in ATTRIBUTES]
                         for c in combos])


def accuracy(probe: Probe, tok, combos) -> float:
    """Share of captions whose every real token predicts all four attributes right."""
    ids, mask = tokenize(tok, [c.caption for c in combos])
    with torch.no_grad():
        out = probe(ids, mask)
    y = labels(combos)
    right = torch.stack([(o.argmax(-1) == y[:, i, None]) | (mask == 0)
                         for i, o in enumerate(out)], -1)
    return float(right.flatten(1).all(1).float().mean())


def run(out: Path, steps: int, seed: int, resume: bool) -> dict:
    stage = Path(out) / "text"
    done = finished_already(stage, steps, resume)
    if done is not None:
        return done
    spiece = train_tokenizer()
    tok = UMT5Tokenizer.from_spiece_bytes(spiece)
    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=tok.vocab_size, dim=DIM, attn_dim=DIM, ffn_dim=FFN,
                     num_heads=HEADS, num_layers=LAYERS, num_buckets=BUCKETS)
    probe = Probe(UMT5Encoder(cfg))
    train = list(dataset.iter_combos("train"))
    heldout = list(dataset.iter_combos("heldout"))
    ids, mask = tokenize(tok, [c.caption for c in train])
    y = labels(train)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.01)

    def loss_fn(step):
        g = torch.Generator().manual_seed(seed * 10**6 + step)
        pick = torch.randint(len(train), (64,), generator=g)
        return token_loss(probe(ids[pick], mask[pick]), y[pick], mask[pick]), {}

    result = train_loop(stage, probe, opt, loss_fn, steps,
                        lambda s: cosine_lr(s, steps, 1e-3, 20), resume=resume, seed=seed,
                        save_every=100, log_every=50)
    probe.eval()
    acc_train, acc_held = accuracy(probe, tok, train), accuracy(probe, tok, heldout)
    print(f"text: probe accuracy (all four attributes) train {acc_train:.3f}, "
          f"held-out {acc_held:.3f}", flush=True)
    result.update(encoder=probe.encoder.state_dict(), config=cfg, spiece=spiece,
                  probe_accuracy={"train": acc_train, "heldout": acc_held})
    torch.save(result, stage / "done.pt")
    return result
