"""Weight deltas of LoRA-style adapters, computed in float32 from their factors.

Every adapter kind is one :class:`WeightPatch`: ``delta(shape, device)`` returns the full
float32 delta for a weight of ``shape``, already multiplied by its scale
(``strength * alpha / rank``). ``wan_core.ops.Linear`` adds the deltas of its ``patches`` at
call time; other parameters (biases, norms, modulation, the patch embedding) are small and get
the delta merged once into a new tensor by ``wan_core.loading.lora``.

Factor tensors are non-persistent buffers, kept in the file's dtype (usually bf16), so a
patched model holds the adapter at its file size and moves it with ``.to(device)``.

Kinds (``W`` the weight, ``s`` the scale):
  * :class:`LowRank`: LoRA, ``s * up @ down`` (up ``[out, r]``, down ``[r, in, *kernel]``);
  * :class:`Full`: a full delta, ``s * diff`` (LightX2V ``.diff`` / ``.diff_b`` / ``.diff_m``);
  * :class:`Kronecker`: LoKr, ``s * kron(w1, w2)``, each factor whole or low-rank (``a @ b``);
  * :class:`Hadamard`: LoHa, ``s * (w1a @ w1b) * (w2a @ w2b)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightPatch(nn.Module):
    """A delta for one weight: ``delta(shape, device) -> float32 tensor of shape``."""

    low_rank = False     # True: a Linear applies it to its activations (add_to_output)

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def _keep(self, **tensors: Optional[torch.Tensor]) -> None:
        for name, value in tensors.items():
            self.register_buffer(name, value, persistent=False)

    def full(self, device) -> torch.Tensor:
        """The unscaled delta in float32, in the factors' natural shape."""
        raise NotImplementedError

    def expected_numel(self) -> int:
        """How many elements the delta has (checked against the target before any work)."""
        raise NotImplementedError

    def delta(self, shape, device=None) -> torch.Tensor:
        """The scaled float32 delta, reshaped to ``shape`` (a fresh tensor)."""
        d = self.full(device)
        if d.numel() != math.prod(shape):
            raise ValueError(f"delta of shape {tuple(d.shape)} does not fit a weight of shape "
                             f"{tuple(shape)}")
        return d.reshape(shape).mul_(self.scale)


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def _product(a: torch.Tensor, b: torch.Tensor, device) -> torch.Tensor:
    """``a.flatten(1) @ b.flatten(1)`` in float32: ``[rows_a, cols_b]``."""
    return _f32(a, device).flatten(1) @ _f32(b, device).flatten(1)


class LowRank(WeightPatch):
    """LoRA: ``scale * up @ down``; up ``[out, r]`` (or ``[out, r, 1, ...]``), down ``[r, in...]``.

    On a Linear it never builds the ``[out, in]`` delta: ``add_to_output`` adds
    ``scale * (x @ down^T) @ up^T`` in the activations' dtype (2 r (in + out) multiply-adds per
    token instead of rebuilding the weight)."""

    low_rank = True

    def __init__(self, up: torch.Tensor, down: torch.Tensor, scale: float):
        super().__init__(scale)
        self._keep(up=up, down=down)

    def add_to_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + scale * (x @ down^T) @ up^T`` for a Linear's input x ``[..., in]``, output y."""
        down = self.down.to(device=x.device, dtype=x.dtype).flatten(1)
        up = self.up.to(device=x.device, dtype=x.dtype).flatten(1)
        update = F.linear(F.linear(x, down), up)
        if torch.is_grad_enabled():
            return y + update * self.scale
        return y.add_(update, alpha=self.scale)

    def full(self, device=None) -> torch.Tensor:
        return _product(self.up, self.down, device)

    def expected_numel(self) -> int:
        return self.up.shape[0] * self.down[0].numel()


class Full(WeightPatch):
    """A full delta tensor (LightX2V ``diff`` files): ``scale * diff``."""

    def __init__(self, diff: torch.Tensor, scale: float):
        super().__init__(scale)
        self._keep(diff=diff)

    def full(self, device=None) -> torch.Tensor:
        return _f32(self.diff, device).clone()

    def expected_numel(self) -> int:
        return self.diff.numel()


class Kronecker(WeightPatch):
    """LoKr: ``scale * kron(w1, w2)``; each factor given whole (``w1``) or as ``w1_a @ w1_b``."""

    def __init__(self, scale: float, w1=None, w1_a=None, w1_b=None, w2=None, w2_a=None,
                 w2_b=None):
        super().__init__(scale)
        self._keep(w1=w1, w1_a=w1_a, w1_b=w1_b, w2=w2, w2_a=w2_a, w2_b=w2_b)

    def _factor(self, whole, a, b, device) -> torch.Tensor:
        return _f32(whole, device) if whole is not None else _product(a, b, device)

    def full(self, device=None) -> torch.Tensor:
        w1 = self._factor(self.w1, self.w1_a, self.w1_b, device)
        w2 = self._factor(self.w2, self.w2_a, self.w2_b, device)
        if w2.dim() > 2:                      # convolution kernels: w1 spans out x in only
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1, w2)

    def expected_numel(self) -> int:
        def rows_cols(whole, a, b):
            return tuple(whole.shape[:2]) if whole is not None else (a.shape[0], b[0].numel())
        (r1, c1), (r2, c2) = rows_cols(self.w1, self.w1_a, self.w1_b), \
            rows_cols(self.w2, self.w2_a, self.w2_b)
        kernel = math.prod(self.w2.shape[2:]) if self.w2 is not None and self.w2.dim() > 2 else 1
        return r1 * r2 * c1 * c2 * kernel


class Hadamard(WeightPatch):
    """LoHa: ``scale * (w1_a @ w1_b) * (w2_a @ w2_b)``."""

    def __init__(self, w1_a, w1_b, w2_a, w2_b, scale: float):
        super().__init__(scale)
        self._keep(w1_a=w1_a, w1_b=w1_b, w2_a=w2_a, w2_b=w2_b)

    def full(self, device=None) -> torch.Tensor:
        return _product(self.w1_a, self.w1_b, device).mul_(_product(self.w2_a, self.w2_b, device))

    def expected_numel(self) -> int:
        return self.w1_a.shape[0] * self.w1_b[0].numel()
