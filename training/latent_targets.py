"""A linear latent for the demo clips: principal components of 8x8 patches, as the VAE's target.

Why: trained end to end from scratch, the tiny Wan-VAE collapses towards the mean image in its
first steps (TRAINING.md, "Diagnosis"): its random encoder gives a small, nearly
input-independent latent, and the decoder's RMS norms drown that signal under the constant
part the biases learn. Given an *informative, unit-scale* latent, the same decoder learns
normally. A principal-component basis of the Wan latent's own footprint is such a latent, and a
good one on this data: 16 components of the 8x8x3 patches of a first frame keep 30.6 dB, of the
4x8x8x3 patches of later chunks 27.8 dB (held-out clips, linear reconstruction).

The latent is Wan-shaped: ``[B, 16, 1 + n, H/8, W/8]`` for ``1 + 4n`` frames; latent frame 0
holds the first frame (basis ``first``), every later latent frame one 4-frame chunk (basis
``chunk``), each component divided by its standard deviation (unit variance, what the DiT
trains on). The encoder is fitted to it, the decoder learns to invert it
(``train_vae.run_encoder_fit`` / ``run_decoder_fit``).
"""
from __future__ import annotations

import torch

PATCH, TEMPORAL = 8, 4


def _patches(video: torch.Tensor) -> torch.Tensor:
    """``[B, 3, T, H, W]`` -> ``[B, H/8, W/8, 3*T*64]`` (channel, frame, row, column order)."""
    b, c, t, h, w = video.shape
    p = video.reshape(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)
    return p.permute(0, 3, 5, 1, 2, 4, 6).reshape(b, h // PATCH, w // PATCH, c * t * PATCH * PATCH)


def _unpatch(p: torch.Tensor, frames: int) -> torch.Tensor:
    """Inverse of :func:`_patches`: ``[B, h, w, 3*T*64]`` -> ``[B, 3, T, 8h, 8w]``."""
    b, h, w, _ = p.shape
    v = p.reshape(b, h, w, 3, frames, PATCH, PATCH).permute(0, 3, 4, 1, 5, 2, 6)
    return v.reshape(b, 3, frames, h * PATCH, w * PATCH)


def _fit_one(patches: torch.Tensor, z_dim: int) -> dict:
    """Mean ``[D]``, orthonormal basis ``[D, z]`` (sign fixed: largest entry positive) and the
    components' standard deviations ``[z]`` of ``patches [N, D]``."""
    mean = patches.mean(0)
    centred = patches - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    basis = vh[:z_dim].T.contiguous()
    sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    basis = basis * sign
    std = s[:z_dim] / (patches.shape[0] - 1) ** 0.5
    return {"mean": mean, "basis": basis, "std": std}


def fit_basis(clips: torch.Tensor, z_dim: int = 16) -> dict:
    """Bases from ``clips [N, 3, 1 + 4n, H, W]`` in [-1, 1]: ``{"first": ..., "chunk": ...}``."""
    first = _patches(clips[:, :, :1]).reshape(-1, 3 * PATCH * PATCH)
    later = torch.cat([_patches(clips[:, :, s:s + TEMPORAL])
                       for s in range(1, clips.shape[2], TEMPORAL)]).reshape(-1, 3 * TEMPORAL * PATCH * PATCH)
    return {"first": _fit_one(first.double(), z_dim), "chunk": _fit_one(later.double(), z_dim)}


def _frame_groups(frames: int):
    if (frames - 1) % TEMPORAL:
        raise ValueError(f"{frames} frames: the latent needs 1 + 4n frames")
    yield "first", slice(0, 1)
    for s in range(1, frames, TEMPORAL):
        yield "chunk", slice(s, s + TEMPORAL)


def encode(video: torch.Tensor, basis: dict) -> torch.Tensor:
    """``[B, 3, 1 + 4n, H, W]`` -> unit-variance latent ``[B, z, 1 + n, H/8, W/8]`` (float32)."""
    out = []
    for name, part in _frame_groups(video.shape[2]):
        b = basis[name]
        coeff = (_patches(video[:, :, part].double()) - b["mean"]) @ b["basis"] / b["std"]
        out.append(coeff.permute(0, 3, 1, 2).unsqueeze(2))
    return torch.cat(out, 2).float()


def decode(latent: torch.Tensor, basis: dict) -> torch.Tensor:
    """Linear reconstruction ``[B, z, 1 + n, h, w]`` -> ``[B, 3, 1 + 4n, 8h, 8w]`` (checks only)."""
    frames = []
    for i in range(latent.shape[2]):
        name, count = ("first", 1) if i == 0 else ("chunk", TEMPORAL)
        b = basis[name]
        coeff = latent[:, :, i].double().permute(0, 2, 3, 1) * b["std"]
        frames.append(_unpatch(coeff @ b["basis"].T + b["mean"], count))
    return torch.cat(frames, 2).float()


def spectral_weights(basis: dict) -> torch.Tensor:
    """Per-channel gains ``[z]`` that turn the unit-variance latent into the one the DiTs are
    trained on: component c scaled by ``sqrt(std_c)`` (of the 4-frame chunks), overall rms 1.

    Whitened, the fine-detail components (raw std 45x below the first) count as much as the
    background colour, both in the flow-matching loss and under the noise: a T2V DiT trained
    1350 steps on the whitened latent still drew wrong backgrounds. Half-whitened, the coarse
    components (background, object colour and position) keep 2-6x the amplitude of the fine
    ones, so they survive to higher noise and are decided first, as in natural latents."""
    root = basis["chunk"]["std"].float().sqrt()
    return root / root.square().mean().sqrt()
