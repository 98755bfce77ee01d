"""The Wan 2.1 / 2.2 diffusion transformer (DiT).

Parameter names follow the official checkpoints (``blocks.N.self_attn.q.weight``,
``head.head.weight``, ``img_emb.proj.0.weight`` ...), so official state dicts load as they are;
other layouts are renamed by ``wan_core.loading.dit_layouts`` first (loader: ``wan_core.loading.dit``).

Numerics follow the official model: the sinusoidal time embedding and the RoPE angles are built
in float64, time embedding / modulation / norms / residual stream are float32, and the large
linears and attention run in the compute dtype (``dit.compute_dtype``: fp32, bf16 or fp16).
Differences from the official code that do not change results:
  * no padding of the video tokens to a fixed ``seq_len`` (the official pad keys are masked);
  * timesteps are embedded once per distinct value instead of once per token, then gathered
    (one shared value, the usual CFG batch, folds into LayerNorm's affine);
  * RoPE multiplies by complex64 rotations (angles built in float64) instead of complex128;
  * the patch embedding is the equivalent matmul over flattened patches;
  * text padding is embedded and attended once per sample (``TextContext``): the zero pad rows
    (and any all-zero text row) all become the same key and value, and softmax attention over
    n copies of one key equals attention over one copy whose logit gets + log(n).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, cross_attention_backend, resolve_backend, supports_bias
from .configs import DiTConfig
from ..ops import Linear

Context = Union[torch.Tensor, Sequence[torch.Tensor]]

FFN_CHUNK_TOKENS = 4096   # tokens per FFN call; bounds the [B, L, ffn_dim] intermediate
COLLAPSE_TEXT_PADDING = True   # one biased pad key instead of hundreds of identical ones


# --------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned scale; computed in float32, returns x.dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * self.weight.float()                  # float32, a new tensor
        if torch.is_grad_enabled():
            return (out * inverse_rms(x, self.eps)).to(x.dtype)
        return out.mul_(inverse_rms(x, self.eps)).to(x.dtype)


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, float32 [..., 1], in one reduction pass
    (a differentiable form when gradients are tracked: the norm's gradient is undefined at 0)."""
    if torch.is_grad_enabled():
        return torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps))


class AffineLayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in float32 (``norm3`` and ``img_emb`` norms)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(),
                            self.eps)


def plain_layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters (``norm1``, ``norm2``, ``head.norm``), in float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t [N] -> [N, dim] float64: cos of t * 10000^(-i/half) then sin, as the official model."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


# --------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------

def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to the (time, height, width) axes."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(grid: tuple[int, int, int], head_dim: int, device, theta: float = 10000.0):
    """Rotations cos + i sin [L, 1, head_dim // 2] (complex64) for a (F, H, W) token grid.

    Angles are built in float64 from per-axis frequencies theta^(-2i/d_axis).
    """
    f, h, w = grid
    parts = []
    for n, d in zip(grid, rope_axis_dims(head_dim)):
        inv = 1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        parts.append(torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv[None])
    angles = torch.cat([
        parts[0][:, None, None, :].expand(f, h, w, -1),
        parts[1][None, :, None, :].expand(f, h, w, -1),
        parts[2][None, None, :, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    return torch.complex(torch.cos(angles).float(), torch.sin(angles).float())


def rms_norm_rope(x: torch.Tensor, norm: "RMSNorm", heads: int,
                  rotations: torch.Tensor) -> torch.Tensor:
    """RMSNorm (float32) then RoPE on channel pairs (2i, 2i+1) of every head:
    x [B, L, dim] -> [B, L, heads, head_dim] in x.dtype, stored head-major ([B, heads, L, hd]
    in memory, which SDPA's CPU kernel reads faster).

    A pair is rotated as the complex number x_2i + i x_2i+1 times cos + i sin. The per-token
    RMS factor commutes with the rotation, so it is folded into the small rotation table
    ([B, 1, L, head_dim/2]): three passes over the big tensor (norm, weight, rotation).
    """
    if not rotations.is_complex():                 # compiled blocks (``Positions.rotations``)
        return _rms_norm_rope_real(x, norm, heads, rotations)
    b, n, d = x.shape
    if torch.is_grad_enabled():                    # same maths without out= / in-place writes
        h = x.float().view(b, n, heads, -1) * norm.weight.float().view(heads, -1)
        pairs = torch.view_as_complex(h.unflatten(-1, (-1, 2)).contiguous())
        pairs = pairs * (rotations * inverse_rms(x, norm.eps)[..., None])
        return torch.view_as_real(pairs).flatten(-2).to(x.dtype)
    out = torch.empty(b, heads, n, d // heads, device=x.device, dtype=torch.float32)
    torch.mul(x.view(b, n, heads, -1).transpose(1, 2), norm.weight.float().view(heads, 1, -1),
              out=out)
    pairs = torch.view_as_complex(out.unflatten(-1, (-1, 2)))
    pairs.mul_((rotations * inverse_rms(x, norm.eps)[..., None]).transpose(1, 2))
    return out.to(x.dtype).transpose(1, 2)


def _rms_norm_rope_real(x: torch.Tensor, norm: "RMSNorm", heads: int,
                        cos_sin: torch.Tensor) -> torch.Tensor:
    """:func:`rms_norm_rope` with the rotation spelled in real arithmetic, the form
    ``torch.compile`` fuses into one kernel (Inductor generates no code for complex tensors):
    ``cos_sin`` [L, 1, head_dim/2, 2] is ``view_as_real`` of the rotation table. Same result
    up to float rounding; same head-major memory layout."""
    b, n, _ = x.shape
    h = x.float().view(b, n, heads, -1) * norm.weight.float().view(heads, -1)
    re, im = h.unflatten(-1, (-1, 2)).unbind(-1)                  # [B, L, heads, hd/2]
    r = inverse_rms(x, norm.eps)[..., None]                       # [B, L, 1, 1]
    cos, sin = cos_sin[..., 0] * r, cos_sin[..., 1] * r           # [B, L, 1, hd/2]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)
    return out.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Attention layers
# --------------------------------------------------------------------------------------------

class Positions:
    """What self-attention needs besides its input: the RoPE rotations of the tokens this
    process holds (``rotations`` [L, 1, head_dim/2] complex64) and how to attend
    (``attend(q, k, v, backend)``; :func:`attention` over the local tokens, or the all-to-all
    attention over the whole sequence of ``wan_core.parallel``'s sequence parallelism)."""

    def __init__(self, rotations: torch.Tensor, attend=attention):
        self.complex_rotations = rotations
        self.real_rotations = torch.view_as_real(rotations)     # a view: [L, 1, hd/2, 2]
        self.attend = attend

    @property
    def rotations(self) -> torch.Tensor:
        """The complex table; inside a compiled block (``wan_core.models.block_compile``) its
        real view, which :func:`rms_norm_rope` then rotates with real arithmetic."""
        if torch.compiler.is_compiling():
            return self.real_rotations
        return self.complex_rotations


class LocalTokens:
    """Every token on this process: the identity :meth:`WanDiT.sequence_parallel` hook. A
    sequence-parallel hook (``wan_core.parallel``) has the same methods: ``split`` a token
    tensor to this process's share, ``split_index`` per-token rows, ``attend`` over the whole
    sequence, ``gather`` the shares of an output back to ``length`` tokens."""

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x

    def split_index(self, index: torch.Tensor) -> torch.Tensor:
        return index

    def attend(self, q, k, v, backend):
        return attention(q, k, v, backend)

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        return x


LOCAL_TOKENS = LocalTokens()


class SelfAttention(nn.Module):
    """Self-attention with q/k RMSNorm over the full dim and 3-axis RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, positions: Positions, backend: str) -> torch.Tensor:
        """x [B, L, dim] (compute dtype) -> [B, L, dim]."""
        heads = self.num_heads
        q = rms_norm_rope(self.q(x), self.norm_q, heads, positions.rotations)
        k = rms_norm_rope(self.k(x), self.norm_k, heads, positions.rotations)
        v = self.v(x).unflatten(-1, (heads, -1))
        out = positions.attend(q, k, v, backend)
        del q, k, v
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    """Cross-attention to the text tokens; with ``image_branch`` (2.1 I2V / FLF2V) a second,
    decoupled attention to the CLIP image tokens is added before the output projection."""

    def __init__(self, dim: int, num_heads: int, eps: float, image_branch: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        if image_branch:
            self.k_img = Linear(dim, dim)
            self.v_img = Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, text: "TextContext",
                context_img: Optional[torch.Tensor], backend: str) -> torch.Tensor:
        """x [B, L, dim]; text tokens [B, M, dim]; context_img [B, L_img, dim] or None."""
        heads = self.num_heads
        backend = cross_attention_backend(backend)
        q = self.norm_q(self.q(x)).unflatten(-1, (heads, -1))
        k = self.norm_k(self.k(text.tokens)).unflatten(-1, (heads, -1))
        v = self.v(text.tokens).unflatten(-1, (heads, -1))
        out = attention(q, k, v, backend, bias=text.bias)
        if context_img is not None and hasattr(self, "k_img"):
            k = self.norm_k_img(self.k_img(context_img)).unflatten(-1, (heads, -1))
            v = self.v_img(context_img).unflatten(-1, (heads, -1))
            out = out + attention(q, k, v, backend)
        return self.o(out.flatten(2))


class TextContext:
    """Embedded prompts for cross-attention, each pad token kept once.

    ``tokens`` [B, M, dim] (compute dtype): row i holds sample i's real tokens, then, when the
    sample is shorter than ``text_len``, one pad token (the embedding of a zero row) standing
    for all its pad tokens, then filler up to M. ``bias`` [B, 1, 1, M] float32 adds
    log(pad count) to the pad token's logit and -inf to the filler; None when every key is a
    plain token (no padding, or padding expanded to full length).
    """

    def __init__(self, tokens: torch.Tensor, bias: Optional[torch.Tensor]):
        self.tokens = tokens
        self.bias = bias

    @classmethod
    def embed(cls, items: Sequence[torch.Tensor], text_len: int, embedding: nn.Module,
              dtype: torch.dtype, collapse: bool) -> "TextContext":
        """items: B tensors [L_i, text_dim] (all-zero rows count as padding). With
        ``collapse`` False the pad token is repeated to ``text_len`` keys (no bias)."""
        real = []
        for u in items:
            nonzero = u.ne(0).any(-1)
            real.append(u if bool(nonzero.all()) else u[nonzero])
        counts = [r.shape[0] for r in real]
        m = max(n + (n < text_len) for n in counts)
        batch, device = len(real), real[0].device
        padded = torch.zeros(batch, m, real[0].shape[-1], device=device, dtype=dtype)
        for row, r in zip(padded, real):
            row[: r.shape[0]] = r
        tokens = embedding(padded)
        if all(n == text_len for n in counts):
            return cls(tokens, None)
        if not collapse:          # every pad key spelled out: gather the pad token again
            index = torch.tensor([list(range(n)) + [n] * (text_len - n) for n in counts],
                                 device=device)
            return cls(tokens[torch.arange(batch, device=device)[:, None], index], None)
        bias = torch.full((batch, 1, 1, m), float("-inf"), device=device)
        for i, n in enumerate(counts):
            bias[i, ..., :n] = 0.0
            if n < text_len:
                bias[i, ..., n] = math.log(text_len - n)
        return cls(tokens, bias)


# --------------------------------------------------------------------------------------------
# Timestep modulation
# --------------------------------------------------------------------------------------------

class TimeModulation:
    """The shared time projection ``e0`` [N, 6, dim] for N distinct timesteps, and for every
    token (or every sample) the row it uses.

    ``index`` is [B, 1] for one timestep per sample or [B, L] for per-token timesteps; a block
    asks for one of its six shift/scale/gate vectors at a time, gathered to [B, 1 or L, dim],
    or [1, 1, dim] when there is a single distinct timestep (the usual CFG batch).
    """

    def __init__(self, e0: torch.Tensor, index: torch.Tensor):
        self.e0 = e0
        self.index = index

    def for_block(self, modulation: torch.Tensor) -> "BlockModulation":
        return BlockModulation(modulation.float() + self.e0, self.index)


class BlockModulation:
    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        self.table = table      # [N, 6, dim] float32
        self.index = index      # [B, 1] or [B, L]

    def __getitem__(self, i: int) -> torch.Tensor:
        return gather_rows(self.table[:, i], self.index)


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table [N, dim] -> [B, 1 or L, dim] by index, or [1, 1, dim] when N == 1."""
    return table[None] if table.shape[0] == 1 else table[index]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    """LayerNorm(x) * (1 + scale) + shift, in float32."""
    if shift.shape[:2] == (1, 1):      # one vector for all tokens: LayerNorm's own affine
        d = x.shape[-1]
        return F.layer_norm(x.float(), (d,), scale.reshape(d) + 1, shift.reshape(d), eps)
    return torch.addcmul(shift, plain_layer_norm(x, eps), scale + 1)


def feed_forward(ffn: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Linear, GELU(tanh) in place, Linear: one [.., ffn_dim] intermediate instead of two."""
    fc1, act, fc2 = ffn
    h = fc1(x)
    if torch.is_grad_enabled():
        return fc2(act(h))
    return fc2(torch.ops.aten.gelu_(h, approximate=act.approximate))


def _add_gated(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor] = None):
    """x + y * gate (x float32), in place when no gradients are being tracked."""
    if torch.is_grad_enabled():
        return x + y * gate if gate is not None else x + y
    if gate is None:
        return x.add_(y)
    return x.addcmul_(y, gate)


# --------------------------------------------------------------------------------------------
# Block, head, image embedding
# --------------------------------------------------------------------------------------------

class WanBlock(nn.Module):
    """One transformer block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = AffineLayerNorm(d, cfg.eps)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps, cfg.has_image_branch)
        self.ffn = nn.Sequential(Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))

    # ``compile=True`` (``wan_core.models.block_compile``): the ``run`` compiled once and
    # shared by every block of this class; None runs it eagerly.
    compiled = None

    def forward(self, x, time: TimeModulation, positions: Positions, text: TextContext,
                context_img, backend: str):
        """x [B, L, dim] float32 residual stream -> updated x (:meth:`run`, compiled or not)."""
        if self.compiled is not None:
            return self.compiled(self, x, time, positions, text, context_img, backend)
        return self.run(x, time, positions, text, context_img, backend)

    def run(self, x, time: TimeModulation, positions: Positions, text: TextContext,
            context_img, backend: str):
        """The block's computation; may update ``x`` in place (eagerly, without gradients)."""
        cdt = text.tokens.dtype
        mod = time.for_block(self.modulation[0])
        h = modulate(x, mod[0], mod[1], self.eps).to(cdt)
        y = self.self_attn(h, positions, backend)
        del h
        x = _add_gated(x, y, mod[2])
        y = self.cross_attn(self.norm3(x).to(cdt), text, context_img, backend)
        x = _add_gated(x, y)
        h = modulate(x, mod[3], mod[4], self.eps).to(cdt)
        gate = mod[5]
        if torch.is_grad_enabled() or h.shape[1] <= FFN_CHUNK_TOKENS:
            return _add_gated(x, feed_forward(self.ffn, h), gate)
        # Token chunks bound the [B, L, ffn_dim] intermediate (1.2 GB in fp32 for 1.3B at
        # 480P / 81 frames) without changing results: the FFN acts on each token alone.
        for start in range(0, h.shape[1], FFN_CHUNK_TOKENS):
            part = slice(start, start + FFN_CHUNK_TOKENS)
            g = gate[:, part] if gate.shape[1] > 1 else gate
            x[:, part].addcmul_(feed_forward(self.ffn, h[:, part]), g)
        return x


class VaceBlock(WanBlock):
    """A VACE block: a text-to-video transformer block run over the control stream ``c``.

    Block 0 has ``before_proj``, which adds the projected control tokens to the embedded noisy
    latent ``x0`` first; every VACE block has ``after_proj``, which turns its output into the
    hint added to the main stream after the main block the plan pairs it with."""

    def __init__(self, cfg: DiTConfig, first: bool):
        super().__init__(cfg)
        if first:
            self.before_proj = Linear(cfg.dim, cfg.dim)
        self.after_proj = Linear(cfg.dim, cfg.dim)

    def forward(self, c, time: TimeModulation, positions: Positions, text: TextContext,
                backend: str, x0: Optional[torch.Tensor] = None):
        """c [B, L, dim] float32 control stream (block 0: the patch-embedded control, with
        ``x0`` [B, L, dim] the patch-embedded noisy latent) -> (new c, hint [B, L, dim])."""
        if self.compiled is not None:
            return self.compiled(self, c, time, positions, text, backend, x0)
        return self.run(c, time, positions, text, backend, x0)

    def run(self, c, time: TimeModulation, positions: Positions, text: TextContext,
            backend: str, x0: Optional[torch.Tensor] = None):
        cdt = text.tokens.dtype
        if x0 is not None:
            c = self.before_proj(c.to(cdt)).float().add_(x0)
        c = super().run(c, time, positions, text, None, backend)
        return c, self.after_proj(c.to(cdt)).float()


class VaceControl:
    """One control input of a VACE forward: the control stream ``c`` [B, L, dim] (float32,
    advanced block by block) and ``scales`` [n_vace_blocks] float32 (one per hint)."""

    def __init__(self, c: torch.Tensor, scales: torch.Tensor):
        self.c = c
        self.scales = scales


class Head(nn.Module):
    """Final modulated LayerNorm and projection to patch pixels (float32)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; e [N, dim] time embedding; index [B, 1 or L] -> [B, L, out*patch]."""
        table = self.modulation[0].float() + e[:, None]          # [N, 2, dim]
        shift, scale = gather_rows(table[:, 0], index), gather_rows(table[:, 1], index)
        return self.head(modulate(x, shift, scale, self.eps))


class ImageEmbedding(nn.Module):
    """CLIP tokens [B, L_img, 1280] -> [B, L_img, dim]: LayerNorm, Linear, GELU, Linear,
    LayerNorm. FLF2V adds the learned ``emb_pos`` [1, 514, 1280] first."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        c, d = cfg.image_dim, cfg.dim
        self.proj = nn.Sequential(AffineLayerNorm(c, 1e-5), Linear(c, c), nn.GELU(),
                                  Linear(c, d), AffineLayerNorm(d, 1e-5))
        if cfg.image_pos_tokens:
            self.emb_pos = nn.Parameter(torch.zeros(1, cfg.image_pos_tokens, c))

    def forward(self, clip_fea: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = clip_fea.float()
        if hasattr(self, "emb_pos"):
            n = self.emb_pos.shape[1]
            if x.shape[0] * x.shape[1] % n:
                raise ValueError(f"FLF2V expects {n} CLIP tokens per sample (start and end "
                                 f"frame), got clip_fea of shape {tuple(clip_fea.shape)}")
            x = x.reshape(-1, n, x.shape[-1]) + self.emb_pos.float()
        norm_in, fc1, act, fc2, norm_out = self.proj
        x = act(fc1(norm_in(x).to(dtype)))
        return norm_out(fc2(x)).to(dtype)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class WanDiT(nn.Module):
    """Wan diffusion transformer for every 2.1 / 2.2 variant (see ``DiTConfig``).

    ``dit(x, t, context, clip_fea=None, y=None)`` returns the velocity [B, out_dim, F, H, W]
    in float32.
    """

    def __init__(self, cfg: DiTConfig, compute_dtype: torch.dtype = torch.float32,
                 attention_backend: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.compute_dtype = compute_dtype
        self.attention_backend = attention_backend
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, cfg.patch_size, cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            Linear(d, d))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, d), nn.SiLU(), Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.has_image_branch:
            self.img_emb = ImageEmbedding(cfg)
        if cfg.vace_layers:
            self.vace_patch_embedding = nn.Conv3d(cfg.vace_in_dim, d, cfg.patch_size,
                                                  cfg.patch_size)
            self.vace_blocks = nn.ModuleList(VaceBlock(cfg, first=i == 0)
                                             for i in range(len(cfg.vace_layers)))
        self._rope_cache: dict = {}
        # Sequence parallelism (``wan_core.parallel``): ``shard(length)`` -> an object with
        # LocalTokens' methods for one forward; None keeps every token on this process.
        self.sequence_parallel = None

    def set_attention_backend(self, backend: str) -> None:
        resolve_backend(backend)
        self.attention_backend = backend

    def block_sequence(self) -> list:
        """The transformer blocks in the order a forward with a VACE control runs them (a VACE
        block just before the main block its hint follows; block streaming prefetches in this
        order); for other models ``list(self.blocks)``."""
        order = []
        for i, block in enumerate(self.blocks):
            if i in self.config.vace_layers:
                order.append(self.vace_blocks[self.config.vace_layers.index(i)])
            order.append(block)
        return order

    # -- inputs ------------------------------------------------------------------------------

    def embed_patches(self, x: torch.Tensor, conv: Optional[nn.Conv3d] = None
                      ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x [B, C, F, H, W] -> tokens [B, L, dim] float32 and the token grid (f, h, w), with
        ``conv`` (default: the patch embedding; VACE: ``vace_patch_embedding``)."""
        conv = conv if conv is not None else self.patch_embedding
        b, c, f, h, w = x.shape
        pt, ph, pw = self.config.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size (F={f}, H={h}, W={w}) must be divisible by the patch "
                             f"size {self.config.patch_size}")
        grid = (f // pt, h // ph, w // pw)
        patches = x.reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, math.prod(grid), -1)
        weight = conv.weight.float().flatten(1)
        bias = conv.bias.float()
        return F.linear(patches.float(), weight, bias), grid

    def embed_time(self, t: torch.Tensor, batch: int, tokens: int):
        """t [B] or [B, L] -> (e [N, dim], e0 [N, 6, dim], index [B, 1 or L]) in float32."""
        t = torch.as_tensor(t, device=self.patch_embedding.weight.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() == 1:
            if t.shape[0] != batch:
                raise ValueError(f"t has {t.shape[0]} timesteps for a batch of {batch}")
            values, index = torch.unique(t, return_inverse=True)
            index = index[:, None]
        elif t.dim() == 2:
            if tuple(t.shape) != (batch, tokens):
                raise ValueError(f"per-token t must be [B, L] = [{batch}, {tokens}], "
                                 f"got {list(t.shape)}")
            values, index = torch.unique(t, return_inverse=True)
        else:
            raise ValueError(f"t must be [B] or [B, L], got shape {list(t.shape)}")
        sin = sinusoidal_embedding(values.reshape(-1), self.config.freq_dim).float()
        e = self.time_embedding(sin)
        e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))
        return e, e0, index

    def embed_text(self, context: Context, batch: int) -> TextContext:
        """Project the prompts as if zero-padded to ``text_len`` tokens (``TextContext``)."""
        n = self.config.text_len
        if isinstance(context, torch.Tensor):
            if context.dim() == 2:
                context = context[None]
            items = list(context)
        else:
            items = list(context)
        if len(items) != batch:
            raise ValueError(f"got {len(items)} text contexts for a batch of {batch}")
        dev = self.patch_embedding.weight.device
        for u in items:
            if u.shape[-1] != self.config.text_dim:
                raise ValueError(f"text embeddings must have {self.config.text_dim} channels "
                                 f"(umT5-XXL), got {u.shape[-1]}")
            if u.shape[0] > n:
                raise ValueError(f"text has {u.shape[0]} tokens; at most {n} are supported")
        collapse = COLLAPSE_TEXT_PADDING and supports_bias(
            cross_attention_backend(self.attention_backend), dev, self.compute_dtype)
        return TextContext.embed([u.to(dev) for u in items], n, self.text_embedding,
                                 self.compute_dtype, collapse)

    def vace_controls(self, vace_context, vace_scale, batch: int, grid: tuple,
                      tokens: int) -> list:
        """The control inputs of a VACE forward as :class:`VaceControl` s.

        vace_context: one control latent [B or 1, vace_in_dim, F, H, W] (F <= the latent's
        frames: later frames get no control, as in the official model), or a list of them
        (several controls, hints summed). vace_scale: for one control a float or one value per
        VACE block; for a list, one such entry per control (or one float for all)."""
        cfg = self.config
        if not cfg.vace_layers:
            raise ValueError("this model has no VACE weights: load a Wan VACE model, or attach "
                             "a VACE module to this base model (load_dit(base, vace_module=...))")
        single = torch.is_tensor(vace_context)
        contexts = [vace_context] if single else list(vace_context)
        if not contexts:
            return []
        if single or not isinstance(vace_scale, (list, tuple)):
            scales = [vace_scale] * len(contexts)
        else:
            scales = list(vace_scale)
            if len(scales) != len(contexts):
                raise ValueError(f"{len(contexts)} VACE controls need {len(contexts)} scales "
                                 f"(or one float), got {len(scales)}")
        device = self.vace_patch_embedding.weight.device
        controls = []
        for context, scale in zip(contexts, scales):
            if context.dim() != 5 or context.shape[1] != cfg.vace_in_dim:
                raise ValueError(f"a VACE control latent is [B, {cfg.vace_in_dim}, F, H, W]; "
                                 f"got {list(context.shape)}")
            if context.shape[0] not in (1, batch):
                raise ValueError(f"the VACE control has batch {context.shape[0]}, the latent "
                                 f"{batch}")
            c, c_grid = self.embed_patches(context.to(device), self.vace_patch_embedding)
            if c_grid[1:] != grid[1:] or c_grid[0] > grid[0]:
                raise ValueError(f"the VACE control latent {list(context.shape[2:])} does not "
                                 f"fit the latent's frames x height x width (token grid {grid}); "
                                 "build it for the same size and frame count")
            if c.shape[1] < tokens:     # fewer frames: zero tokens after them (official)
                c = F.pad(c, (0, 0, 0, tokens - c.shape[1]))
            controls.append(VaceControl(c.expand(batch, -1, -1).contiguous(),
                                        self._vace_scales(scale, device)))
        return controls

    def _vace_scales(self, scale, device) -> torch.Tensor:
        n = len(self.config.vace_layers)
        values = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if values.numel() == 1:
            values = values.expand(n)
        if values.numel() != n or not bool(torch.isfinite(values).all()):
            raise ValueError(f"vace_scale must be a finite float or {n} finite values (one per "
                             f"VACE block); got {scale!r}")
        return values.to(device)

    def rope(self, grid: tuple[int, int, int], device):
        key = (grid, str(device))
        if key not in self._rope_cache:
            if max(grid) > self.config.rope_max_len:
                raise ValueError(f"token grid {grid} exceeds {self.config.rope_max_len} "
                                 "positions per axis")
            self._rope_cache = {key: rope_tables(grid, self.config.head_dim, device)}
        return self._rope_cache[key]

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Context,
                clip_fea: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, vace_context=None,
                vace_scale=1.0) -> torch.Tensor:
        """Velocity prediction.

        x [B, C, F, H, W] latent; t [B] (0..1000) or per-token [B, L]; context
        [B, L_txt, text_dim] or a list of [L_i, text_dim] (L_txt <= text_len; zero-padded to
        text_len as in the official model; all-zero rows count as padding, so a prompt given
        unpadded or zero-padded gives the same result); clip_fea
        [B, 257, 1280] (I2V) or [B, 514, 1280] (FLF2V); y [B, C_y, F, H, W] concatenated to x
        on channels (I2V mask + image latent); vace_context / vace_scale: VACE models' control
        latent [B, 96, F, H, W] (or a list of them) and scale (see :meth:`vace_controls`);
        None runs the plain model. Returns [B, out_dim, F, H, W] float32.
        """
        cfg = self.config
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            hint = " (I2V models need y: 4 mask + 16 latent channels)" if cfg.in_dim > x.shape[1] else ""
            raise ValueError(f"the model takes {cfg.in_dim} input channels, got {x.shape[1]}{hint}")
        b = x.shape[0]
        tokens, grid = self.embed_patches(x)
        del x
        length = tokens.shape[1]
        e, e0, index = self.embed_time(t, b, length)
        text = self.embed_text(context, b)
        context_img = None
        if clip_fea is not None and cfg.has_image_branch:
            context_img = self.img_emb(clip_fea.to(tokens.device), self.compute_dtype)
            if context_img.shape[0] != b:
                raise ValueError(f"clip_fea gives {context_img.shape[0]} images for a batch "
                                 f"of {b}")
        shard = LOCAL_TOKENS if self.sequence_parallel is None else \
            self.sequence_parallel.shard(length)
        positions = Positions(shard.split(self.rope(grid, tokens.device), dim=0), shard.attend)
        controls = [] if vace_context is None else self.vace_controls(
            vace_context, vace_scale, b, grid, length)
        for control in controls:
            control.c = shard.split(control.c)
        tokens, index = shard.split(tokens), shard.split_index(index)
        time = TimeModulation(e0, index)
        backend = self.attention_backend
        for i, block in enumerate(self.blocks):
            k = self.config.vace_layers.index(i) if controls and i in self.config.vace_layers \
                else None
            hint = None
            if k is not None:
                vace_block = self.vace_blocks[k]
                for control in controls:
                    control.c, h = vace_block(control.c, time, positions, text, backend,
                                              x0=tokens if k == 0 else None)
                    h = h.mul_(control.scales[k])
                    hint = h if hint is None else hint.add_(h)
            tokens = block(tokens, time, positions, text, context_img, backend)
            if hint is not None:
                tokens = _add_gated(tokens, hint)
        out = shard.gather(self.head(tokens, e, index), length)
        del tokens
        return self.unpatchify(out, grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, out_dim * pt*ph*pw] -> [B, out_dim, F, H, W] float32."""
        b = x.shape[0]
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = x.float().reshape(b, f, h, w, pt, ph, pw, self.config.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, -1, f * pt, h * ph, w * pw)


#
