"""Stage ``text``: a tiny umT5 encoder with the demo SentencePiece tokenizer.

The encoder (umT5 architecture: every layer owns its relative-position bias) is pretrained
briefly with an auxiliary readout that has to recover the four caption attributes (shape,
object colour, direction, background) from the token states the way the DiT's
cross-attention sees them: learned queries attending the tokens, no positions. A random frozen
encoder mixes up object and background colours ("red" can be either); this makes the context
explicit. The readout is thrown away; the DiTs are trained on the frozen encoder's output.
Only training captions are used; the held-out captions measure the probe accuracy.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..text_encoder import UMT5Config, UMT5Encoder
from ..tokenizer import UMT5Tokenizer
from . import dataset
from .tokenizer_train import train_tokenizer
from .training import cosine_lr, finished, train_loop

DIM, HEADS, FFN, LAYERS, BUCKETS = 128, 2, 256, 2, 32
ATTRIBUTES = (("shape", dataset.SHAPES), ("colour", tuple(dataset.COLOURS)),
              ("direction", tuple(dataset.DIRECTIONS)), ("background", tuple(dataset.BACKGROUNDS)))


class Readout(nn.Module):
    """Four learned queries attend the token states; one classifier per attribute."""

    def __init__(self, dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(len(ATTRIBUTES), dim) * 0.1)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.heads = nn.ModuleList(nn.Linear(dim, len(names)) for _, names in ATTRIBUTES)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> list:
        k, v = self.key(states), self.value(states)                       # [B, L, D]
        logits = torch.einsum("qd,bld->bql", self.queries, k) / k.shape[-1] ** 0.5
        logits = logits.masked_fill(mask[:, None, :] == 0, float("-inf"))
        pooled = torch.einsum("bql,bld->bqd", logits.softmax(-1), v)       # [B, 4, D]
        return [head(F.gelu(pooled[:, i])) for i, head in enumerate(self.heads)]


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
    ids, mask = tokenize(tok, [c.caption for c in combos])
    with torch.no_grad():
        out = probe(ids, mask)
    y = labels(combos)
    right = torch.stack([o.argmax(-1) == y[:, i] for i, o in enumerate(out)], 1)
    return float(right.all(1).float().mean())


def run(out: Path, steps: int, seed: int, resume: bool) -> dict:
    stage = Path(out) / "text"
    done = finished(stage)
    if done is not None and resume:
        print("text: finished already", flush=True)
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
        out = probe(ids[pick], mask[pick])
        loss = sum(F.cross_entropy(o, y[pick, i]) for i, o in enumerate(out))
        return loss, {}

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
