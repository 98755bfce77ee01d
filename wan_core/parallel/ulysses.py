"""Ulysses sequence parallelism: each process holds 1/N of the video tokens.

Around self-attention an all-to-all swaps the sequence split for a head split, so every process
attends over the whole sequence for 1/N of the heads, and a second all-to-all swaps back. Tokens
that do not divide by N are padded at the end; the padding is dropped before attention (exact:
no pad key is ever attended) and from the gathered output. Everything else in a block (norms,
modulation, cross-attention to the text, the FFN) acts on each token alone and runs on the local
share unchanged. The DiT reaches this module through one hook, ``WanDiT.sequence_parallel``
(:class:`SequenceParallel`), whose ``shard(length)`` gives the per-forward :class:`TokenShard`.

Shapes: tokens ``[B, L, dim]`` -> local ``[B, S, dim]`` with ``S = ceil(L / N)``; attention
inputs ``[B, S, H, D]`` -> ``[B, N * S, H / N, D]`` -> (real tokens only) -> back.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models.attention import attention


class SequenceParallel:
    """The ``WanDiT.sequence_parallel`` hook for a process group of ``size`` ranks."""

    def __init__(self, group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def shard(self, length: int) -> "TokenShard":
        return TokenShard(self, length)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [N, ...] (chunk j goes to rank j) -> [N, ...] (chunk j came from rank j)."""
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        return out


class TokenShard:
    """This process's share of a ``length``-token sequence for one forward (see module doc)."""

    def __init__(self, parallel: SequenceParallel, length: int):
        self.parallel = parallel
        self.length = length
        self.size, self.rank = parallel.size, parallel.rank
        self.per_rank = math.ceil(length / self.size)
        self.padded = self.per_rank * self.size

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``x`` with ``length`` entries along ``dim`` -> this rank's ``per_rank`` entries
        (zero padding at the end of the sequence)."""
        if x.shape[dim] != self.length:
            raise ValueError(f"expected {self.length} tokens along dim {dim}, got "
                             f"{x.shape[dim]}")
        if self.padded > self.length:
            pad = [0, 0] * (x.dim() - 1 - dim) + [0, self.padded - self.length]
            x = F.pad(x, pad)
        return x.narrow(dim, self.rank * self.per_rank, self.per_rank)

    def split_index(self, index: torch.Tensor) -> torch.Tensor:
        """Per-token timestep rows ``[B, L]`` are split like the tokens; one row per sample
        ``[B, 1]`` serves every token as it is."""
        return index if index.shape[1] == 1 else self.split(index)

    def attend(self, q, k, v, backend: str) -> torch.Tensor:
        """Local q/k/v ``[B, S, H, D]`` -> attention over the whole sequence ``[B, S, H, D]``."""
        heads = q.shape[2]
        if heads % self.size:
            raise ValueError(f"{heads} attention heads do not divide over {self.size} "
                             "sequence-parallel ranks")
        q, k, v = (self._to_heads(t)[:, :self.length] for t in (q, k, v))
        out = attention(q, k, v, backend)                       # [B, L, H / N, D]
        out = F.pad(out, (0, 0, 0, 0, 0, self.padded - self.length))
        return self._to_sequence(out)

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, H, D] -> [B, N * S, H / N, D]: scatter heads, gather the sequence."""
        b, s, h, d = x.shape
        n = self.size
        chunks = x.reshape(b, s, n, h // n, d).permute(2, 0, 1, 3, 4)     # [N, B, S, H/N, D]
        got = self.parallel.all_to_all(chunks)                              # from rank j
        return got.permute(1, 0, 2, 3, 4).reshape(b, n * s, h // n, d)

    def _to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N * S, H / N, D] -> [B, S, H, D]: scatter the sequence, gather heads."""
        b, ns, hn, d = x.shape
        n = self.size
        chunks = x.reshape(b, n, ns // n, hn, d).permute(1, 0, 2, 3, 4)   # [N, B, S, H/N, D]
        got = self.parallel.all_to_all(chunks)                              # heads of rank j
        return got.permute(1, 2, 0, 3, 4).reshape(b, ns // n, n * hn, d)

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """Every rank's share ``[B, S, ...]`` -> the whole sequence ``[B, length, ...]``."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.parallel.group)
        return torch.cat(parts, dim=1)[:, :length]
