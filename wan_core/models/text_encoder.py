"""umT5 text encoder (the encoder half of umT5-XXL).

umT5 is a T5 encoder whose every layer owns a relative-position bias table (plain T5 has one
table in layer 0, shared by all layers; such files are refused with a clear error). Each layer:
    x = x + attn(rms_norm(x))      # no 1/sqrt(d) scaling; logits += position bias + key mask
    x = x + ffn(rms_norm(x))       # fc2(gelu_tanh(gate(x)) * fc1(x))
followed by a final RMS norm. Module names follow the official Wan checkpoint
(``models_t5_umt5-xxl-enc-bf16.pth``), so that file loads without renaming; the Hugging Face /
ComfyUI layout (``encoder.block.N.layer...``) is renamed on load (``wan_core.loading.text_encoder``).

:class:`TextEncoder` (network + tokenizer + prompt cache): ``encode(prompts) -> list[Tensor [L_i, dim]]``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import Linear
from .tokenizer import UMT5Tokenizer

# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class UMT5Config:
    vocab_size: int
    dim: int          # model width (4096 for umT5-XXL)
    attn_dim: int     # num_heads * head_dim (may differ from dim in T5 models)
    ffn_dim: int
    num_heads: int
    num_layers: int
    num_buckets: int
    max_distance: int = 128
    eps: float = 1e-6


def _embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding``; built on the meta device (by the loaders, which assign the weights)
    it skips the random init, whose first ``normal_`` on meta costs ~1.3 s of lazy imports."""
    if torch.empty(0).device.type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


class RMSNorm(nn.Module):
    """T5 layer norm: x / rms(x) * weight, the statistics in float32, no mean, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device=None) -> torch.Tensor:
    """Bidirectional T5 bucket index for every (query i, key j) pair: [L, L] int64.

    Half the buckets hold keys after the query. Within a half, the first half of the buckets are
    exact distances; larger distances share log-spaced buckets up to ``max_distance``.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # key minus query
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, far)


class RelativePositionBias(nn.Module):
    """Learned per-head bias for every bucket of relative distance: [num_buckets, heads]."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = _embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        """Bias to add to the attention logits: [1, heads, L, L]."""
        idx = relative_position_buckets(length, self.num_buckets, self.max_distance,
                                        self.embedding.weight.device)
        return self.embedding(idx).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, dim: int, attn_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, attn_dim, bias=False)
        self.k = Linear(dim, attn_dim, bias=False)
        self.v = Linear(dim, attn_dim, bias=False)
        self.o = Linear(attn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; bias [B or 1, heads, L, L] (position bias + key mask) -> [B, L, dim]."""
        b, n = x.shape[0], self.num_heads
        q, k, v = (proj(x).view(b, -1, n, proj.out_features // n).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        # T5 folds the 1/sqrt(d) factor into its weights, hence scale=1.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, -1, self.o.in_features))


class GatedFeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate = nn.Sequential(Linear(dim, ffn_dim, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = Linear(dim, ffn_dim, bias=False)
        self.fc2 = Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # umT5 activations can overflow fp16; the official code clamps them the same way.
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class EncoderBlock(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg.dim, cfg.attn_dim, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = GatedFeedForward(cfg.dim, cfg.ffn_dim)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads, cfg.max_distance)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; key_mask [B, 1, 1, L] (0 or -inf-like for padding) -> [B, L, dim]."""
        bias = self.pos_embedding(x.shape[1]).float() + key_mask
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """Token ids [B, L] (+ mask [B, L], 1 = real token) -> hidden states [B, L, dim]."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.config = cfg
        self.token_embedding = _embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        if mask is None:
            key_mask = x.new_zeros(1, 1, 1, ids.shape[1], dtype=torch.float32)
        else:
            # Padded keys get the most negative float: they receive no attention weight.
            key_mask = torch.zeros(mask.shape, dtype=torch.float32, device=x.device)
            key_mask = key_mask.masked_fill(mask.to(x.device) == 0, torch.finfo(x.dtype).min)
            key_mask = key_mask[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# Text encoder = tokenizer + network + cache
# --------------------------------------------------------------------------------------------


class TextEncoder:
    """umT5 with its tokenizer: ``encode(prompts) -> list[Tensor [L_i, dim]]``.

    ``L_i`` counts the real tokens of prompt i including ``</s>`` (<= 512), as the official Wan
    encoder returns them; the DiT zero-pads to 512 itself. Results are kept in a small LRU cache
    keyed by the prompt (this object owns the weights, so the key is (prompt, weights)); a
    re-queued prompt costs nothing. The network may live on the CPU while the outputs go to the
    GPU: ``encode(prompts, device="cuda")``.
    """

    def __init__(self, model: UMT5Encoder, tokenizer: UMT5Tokenizer, cache_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    @property
    def config(self) -> UMT5Config:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.token_embedding.weight.dtype

    def to(self, device) -> "TextEncoder":
        """Move the network to ``device`` (e.g. GPU for encoding, back to CPU to free VRAM)."""
        self.model.to(device)
        return self

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def encode_ids(self, ids: Sequence[Sequence[int]]) -> list:
        """Token id lists -> hidden states, one [len(ids_i), dim] tensor each (one padded batch)."""
        if not ids:
            return []
        longest = max(len(x) for x in ids)
        batch = torch.zeros(len(ids), longest, dtype=torch.long)  # padding ids are masked out
        mask = torch.zeros(len(ids), longest, dtype=torch.long)
        for i, x in enumerate(ids):
            batch[i, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
            mask[i, : len(x)] = 1
        out = self.model(batch.to(self.device), mask.to(self.device))
        return [out[i, : len(x)] for i, x in enumerate(ids)]

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]], device=None) -> list:
        """Prompts -> list of [L_i, dim] tensors on ``device`` (default: the encoder's device)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            for prompt, emb in zip(todo, self.encode_ids(self.tokenizer.batch(todo))):
                self._cache[prompt] = emb.clone()
        out = []
        for p in prompts:
            self._cache.move_to_end(p)
            out.append(self._cache[p].to(device or self.device, copy=True))
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    __call__ = encode


